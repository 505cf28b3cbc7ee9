"""results - what a delivery attempt reports: per recipient its outcome, the remote
reply and the evidence of the session that carried it (the connection's host, IP,
TLS version and cipher, certificate and how it was verified).

Values only: the SMTP client (`gateway.delivery.client`), the session cache
(`gateway.delivery.sessions`), the delivery agent (`gateway.delivery.attempt`), the
portal and the queue all read them, and none of them depends on another for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.events import TlsFailure
from gateway.policy.model import Decision

Outcome = Literal["delivered", "deferred", "bounced", "held"]


@dataclass(frozen=True)
class SessionEvidence:
    mx_host: str
    ip: str
    port: int
    level: str
    tls_version: str | None = None
    tls_cipher: str | None = None
    peer_cert_sha256: str | None = None
    verification: str = "none"  # "pkix" when the chain and name were verified
    started_at: str = ""  # when the connection was opened
    reused: int = 0  # transactions this connection carried before this one
    mta_sts: str = ""  # the recipient domain's MTA-STS policy, when it has one
    requiretls: bool = False  # sent with REQUIRETLS (RFC 8689) to a server offering it
    tls_required_no: bool = False  # the message's "TLS-Required: No" was honoured
    # the sender's DSN request was passed on (RFC 3461): that server reports success
    dsn_passed_on: bool = False


@dataclass(frozen=True)
class RecipientResult:
    address: str
    outcome: Outcome
    status: str  # RFC 3463 enhanced status code
    diagnostic: str  # the remote reply, or why we did not get one
    evidence: SessionEvidence | None = None
    # Deferred because the TLS level could not be met (the last host's failure): the
    # policy moves the recipient to its next mode.
    tls_failure: TlsFailure | None = None
    # The digest of the copy sent when it was not the message as received (the
    # archive keeps that copy under it).
    copy_sha256: str | None = None


@dataclass(frozen=True)
class HostFailure:
    status: str
    reason: str
    evidence: SessionEvidence | None = None
    tls_failure: TlsFailure | None = None


@dataclass(frozen=True)
class Encrypted:
    """The recipient's own copy, encrypted to its key (S/MIME or PGP/MIME)."""

    mode: str  # "smime" or "pgp"
    key_fingerprint: str
    key_source: str
    signed: bool  # signed by the organisation too
    sent_sha256: str
    sent_size: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Deposited:
    """The message kept in the secure portal, the recipient notified."""

    portal_item: str
    expires: str  # RFC 3339
    notification: str  # the notification's queue id

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "portal", **vars(self)}


@dataclass(frozen=True)
class Attempted:
    """One recipient's share of an attempt: the result, the decision it was sent
    (or not) under, and what was made for it (None: the message as received)."""

    idx: int
    result: RecipientResult
    decision: Decision
    made: Encrypted | Deposited | None = None


@dataclass(frozen=True)
class AttemptEvidence:
    """What an attempt shows a compliance officer for one recipient: the session
    (host, IP, TLS, certificate, verification), the decision, the copy made, and the
    digest of what was sent when it was not the message as received."""

    decision: Decision
    session: SessionEvidence | None = None
    made: Encrypted | Deposited | None = None
    copy_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form (queue state, archive): flat session fields, then
        ``decision``, ``encryption`` and ``copy_sha256``."""
        out: dict[str, Any] = dict(vars(self.session)) if self.session is not None else {}
        d = self.decision
        out["decision"] = {
            "mode": d.mode.value,
            "rule": d.rule,
            "tls_level": d.tls_level.label,
            "level_source": d.level_source,
            "policy": d.policy,
        }
        if self.made is not None:
            out["encryption"] = self.made.to_dict()
        if self.copy_sha256 is not None:
            out["copy_sha256"] = self.copy_sha256
        return out
