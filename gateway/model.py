"""Small typed values that the stages pass to each other.

They are plain frozen dataclasses with explicit ``to_dict`` / ``from_dict`` so that
what goes to disk is JSON we wrote on purpose (never pickle).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RecipientState(enum.StrEnum):
    """Where a recipient stands: the truth a message's progress is read from (it is
    done when every recipient is final)."""

    PENDING = "pending"  # never tried
    DEFERRED = "deferred"  # tried, tried again later (retry schedule)
    HELD = "held"  # the policy decided a mode that cannot be used now: decided again later
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # a permanent failure
    EXPIRED = "expired"  # deferred or held past delivery.max_queue_lifetime
    DELETED = "deleted"  # removed by an administrator before it was final (queue delete)

    @property
    def final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.EXPIRED)

    @property
    def waiting(self) -> bool:
        """Tried, and to be tried again."""
        return self in (RecipientState.DEFERRED, RecipientState.HELD)


class PortalAuth(enum.StrEnum):
    """How a portal recipient signs in, weakest first (`gateway.portal.credentials`)."""

    CODE = "code"
    PASSWORD = "password"  # noqa: S105 - the name of a sign-in method, not a secret
    PASSPHRASE = "passphrase"  # noqa: S105 - the name of a sign-in method
    OIDC = "oidc"

    @property
    def strength(self) -> int:
        return list(PortalAuth).index(self)


def strongest_auth(*modes: PortalAuth) -> PortalAuth:
    return max(modes, key=lambda m: m.strength)


class Purpose(enum.StrEnum):
    """What a message is for: relayed for a client, or one Sealgate writes itself."""

    MESSAGE = "message"  # accepted from a client (SMTP), to deliver under the policy
    DSN = "dsn"  # a delivery status notification to a sender
    PORTAL_NOTIFICATION = "portal-notification"  # "a message waits for you"
    PORTAL_CODE = "portal-code"  # a one-time sign-in code
    PORTAL_REPLY = "portal-reply"  # a recipient's reply through the portal
    TLS_REPORT = "tls-report"  # a TLS-RPT aggregate report (RFC 8460) to a domain

    @property
    def content_free(self) -> bool:
        """Carries nothing of any message: sent as it is, without the policy (the
        portal's recipients are exactly those whose servers cannot do TLS; a TLS
        report holds counts of sessions)."""
        return self in (Purpose.PORTAL_NOTIFICATION, Purpose.PORTAL_CODE, Purpose.TLS_REPORT)


@dataclass(frozen=True)
class ClientInfo:
    """Who handed us the message, and how that connection was secured."""

    ip: str
    port: int
    helo: str
    tls_version: str | None = None
    tls_cipher: str | None = None
    client_cert_sha256: str | None = None
    client_cert_subject: str | None = None
    # how relaying was authorized: "network", "client-cert" or "smtp-auth"
    authorized_by: str = ""
    auth_user: str | None = None


@dataclass(frozen=True)
class Recipient:
    address: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Envelope:
    """Everything about an accepted message except its bytes."""

    queue_id: str
    received_at: str  # RFC 3339, UTC
    mail_from: str  # "" for the null reverse-path
    mail_options: tuple[str, ...]
    recipients: tuple[Recipient, ...]
    client: ClientInfo
    size: int
    sha256: str
    # Trace fields we add in front of the message on delivery (Received, marker);
    # the spool keeps the received bytes themselves untouched.
    trace_headers: str = ""
    purpose: Purpose = Purpose.MESSAGE
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the portal item it is about
    # the Argon2id hash of the passphrase the sender set for the portal (its header is
    # removed on acceptance); "" when none
    portal_passphrase: str = ""
    # the bytes are their own DATA wire form: CRLF line endings only and no line
    # beginning with a dot, as the SMTP listener saw every line arrive; delivery then
    # sends them without looking at them again
    data_is_wire: bool = False
    # what the spool file holds of it: `to_dict`'s canonical JSON (`gateway.canonical`)
    # as written (kept by the commit) or read back, when the file was written so and
    # is ASCII - the archive journals it as it is instead of writing it again, and an
    # SMTP worker hands it to the main process.  None for an envelope made any other
    # way: a changed copy (`dataclasses.replace`) starts without it.
    spooled_json: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        # Written out by hand: dataclasses.asdict deep-copies, and this runs for
        # every accepted message.
        return {
            "queue_id": self.queue_id,
            "received_at": self.received_at,
            "mail_from": self.mail_from,
            "mail_options": list(self.mail_options),
            "recipients": [
                {"address": r.address, "options": list(r.options)} for r in self.recipients
            ],
            "client": dict(self.client.__dict__),
            "size": self.size,
            "sha256": self.sha256,
            "trace_headers": self.trace_headers,
            "purpose": self.purpose.value,
            "extra": dict(self.extra),
            **({"portal_passphrase": self.portal_passphrase} if self.portal_passphrase else {}),
            **({"data_is_wire": True} if self.data_is_wire else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        return cls(
            queue_id=str(d["queue_id"]),
            received_at=str(d["received_at"]),
            mail_from=str(d["mail_from"]),
            mail_options=tuple(d.get("mail_options", ())),
            recipients=tuple(
                Recipient(r["address"], tuple(r.get("options", ()))) for r in d["recipients"]
            ),
            client=ClientInfo(**d["client"]),
            size=int(d["size"]),
            sha256=str(d["sha256"]),
            trace_headers=str(d.get("trace_headers", "")),
            # spool files of earlier versions kept it in "extra"
            purpose=Purpose(d.get("purpose") or d.get("extra", {}).get("purpose") or "message"),
            extra={k: v for k, v in d.get("extra", {}).items() if k != "purpose"},
            portal_passphrase=str(d.get("portal_passphrase", "")),
            data_is_wire=d.get("data_is_wire") is True,
        )
