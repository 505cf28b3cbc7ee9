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
class Attempted:
    """One recipient's share of an attempt: the result, the decision it was sent
    (or not) under, and how its copy was encrypted (None: not encrypted)."""

    idx: int
    result: RecipientResult
    decision: Decision
    encryption: dict[str, Any] | None = None
