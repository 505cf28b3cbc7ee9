"""events - the events, their payloads and their signature.

An event is ``{"type": ..., "timestamp": ..., "data": {...}}``; ``data`` names the
message (``queue_id``) and, for a recipient's events, the recipient, its state's
status and the mode it went by; ``delivered`` adds the TLS version, cipher and how
the server was verified.  Nothing of a message's content is ever in one.

Signature (Standard Webhooks, https://www.standardwebhooks.com): headers
``webhook-id`` (the event's id, the same on every retry), ``webhook-timestamp``
(seconds, when this try was sent) and ``webhook-signature``: ``v1,`` and the base64
HMAC-SHA256 of ``id.timestamp.body`` under the endpoint's secret (``whsec_`` and
its base64).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hmac
import itertools
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import WEBHOOK_EVENTS, Config
from gateway.errors import ConfigError
from gateway.model import Envelope, Purpose, RecipientState

SECRET_PREFIX = "whsec_"  # noqa: S105 - the scheme's prefix, not a secret

# a recipient's new state -> its event
_OF_STATE = {
    RecipientState.DELIVERED: "delivered",
    RecipientState.DEFERRED: "deferred",
    RecipientState.BOUNCED: "bounced",
    RecipientState.EXPIRED: "bounced",
    RecipientState.HELD: "held",
}


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("does not start with whsec_")
    key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    if len(key) < 24:
        raise ValueError("the key is shorter than 24 bytes")
    return key


def signature(key: hmac.HMAC, event_id: str, timestamp: int, body: bytes) -> str:
    """``key``: an HMAC-SHA256 of the endpoint's key with nothing signed yet
    (`Endpoint.mac`: copied, not made again for every event)."""
    mac = key.copy()
    mac.update(f"{event_id}.{timestamp}.".encode())
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    key: bytes
    events: frozenset[str]

    @functools.cached_property
    def mac(self) -> hmac.HMAC:
        """An HMAC-SHA256 of the key with nothing signed yet (`signature`)."""
        return hmac.new(self.key, digestmod="sha256")


def endpoints_of(config: Config) -> tuple[Endpoint, ...]:
    """The configured endpoints with their secrets read (ConfigError: a secret file
    that cannot be read or holds no whsec_ secret)."""
    found = []
    for i, ep in enumerate(config.webhooks.endpoints):
        where = f"webhooks.endpoints[{i}].secret_file"
        try:
            key = secret_key(Path(ep.secret_file).read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(where, f"cannot read {ep.secret_file}: {e}") from None
        except ValueError as e:
            raise ConfigError(where, f"{ep.secret_file}: not a whsec_ secret ({e})") from None
        found.append(Endpoint(ep.name, ep.url, key, frozenset(ep.events or WEBHOOK_EVENTS)))
    return tuple(found)


# Event ids (the Standard Webhooks ``webhook-id``, by which a receiver drops a
# delivery it has seen): this process's random prefix and a count - unique, and no
# system call per event as a random id would be
_PREFIX = secrets.token_hex(8)
_COUNT = itertools.count()


def _event_id() -> str:
    return f"evt_{_PREFIX}{next(_COUNT):08x}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


# An outbox row as the queue writes it: (endpoint, event id, queue id, type, payload)
Row = tuple[str, str, str, str, str]


class Events:
    """Which endpoint wants which event, and the rows for the outbox."""

    def __init__(self, endpoints: Sequence[Endpoint]):
        self.endpoints = tuple(endpoints)

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def rows(self, queue_id: str, kind: str, data: dict[str, Any]) -> list[Row]:
        wanting = [e for e in self.endpoints if kind in e.events]
        if not wanting:
            return []
        payload = json.dumps(
            {"type": kind, "timestamp": _now(), "data": {"queue_id": queue_id, **data}},
            separators=(",", ":"),
        )
        return [(e.name, _event_id(), queue_id, kind, payload) for e in wanting]

    def accepted(self, envelope: Envelope) -> list[Row]:
        """A message accepted from a client (Sealgate's own mail has no events)."""
        if not self.endpoints or envelope.purpose is not Purpose.MESSAGE:
            return []
        data = {
            "sender": envelope.mail_from,
            "recipients": [r.address for r in envelope.recipients],
            "size": envelope.size,
            "received_at": envelope.received_at,
        }
        return self.rows(envelope.queue_id, "accepted", data)

    def recipient(
        self,
        envelope: Envelope,
        address: str,
        was: RecipientState,
        state: RecipientState,
        status: str,
        diagnostic: str,
        mode: str | None,
        session: dict[str, Any] | None,
        portal: bool,
    ) -> list[Row]:
        """An attempt's outcome for one recipient: ``delivered`` (``portal.notified``
        when it went into the portal), ``deferred`` (each time), ``bounced`` (also
        when it expired), ``held`` (when it becomes held)."""
        if not self.endpoints or envelope.purpose is not Purpose.MESSAGE:
            return []
        kind = _OF_STATE.get(state)
        if kind is None or (kind == "held" and was is RecipientState.HELD):
            return []
        if kind == "delivered" and portal:
            kind = "portal.notified"
        data: dict[str, Any] = {"recipient": address, "status": status, "mode": mode}
        if kind in ("deferred", "bounced", "held"):
            data["reason"] = diagnostic[:300]
        if kind == "delivered" and session:
            data["tls"] = {
                "version": session.get("tls_version"),
                "cipher": session.get("tls_cipher"),
                "verification": session.get("verification"),
                "mx": session.get("mx_host"),
            }
        return self.rows(envelope.queue_id, kind, data)
