"""Facts: what probing observed about a recipient's domain, its mail servers and its
keys, each with the time it was observed.  Plain frozen values, JSON both ways, so
that a decision can store the facts it used.

The policy engine reads these and nothing else (it does no I/O); `gateway.probe.prober`
gathers them, and `level_of` says what TLS level a server can be trusted to reach,
given the domain's DANE and MTA-STS facts.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import Any

from gateway.delivery.tls_policy import TlsLevel


class TlsaState(enum.StrEnum):
    NOT_APPLICABLE = "n/a"  # not looked up: no DNSSEC-validating resolver, or not an MX
    NONE = "none"  # no DNSSEC-secure TLSA records
    UNUSABLE = "unusable"  # secure records, none usable: TLS required, unauthenticated
    USABLE = "usable"  # the server must match one of them
    ERROR = "error"  # the lookup failed: the server cannot be used now


@dataclass(frozen=True)
class MxFacts:
    """One next hop (MX, route or smart host) as a probe connection saw it."""

    host: str
    port: int
    observed_at: float
    reachable: bool = False  # a connection got an SMTP greeting
    ip: str = ""
    starttls: bool | None = None  # None: not known (not reachable)
    tls_version: str | None = None
    tls_cipher: str | None = None
    pkix_valid: bool | None = None  # chain to a trusted CA and names the host
    pkix_error: str = ""  # why not, when not (untrusted, expired, name mismatch ...)
    cert_sha256: str | None = None
    cert_not_after: str | None = None  # RFC 3339
    tlsa: TlsaState = TlsaState.NOT_APPLICABLE
    dane_match: bool | None = None  # the certificate matches a usable TLSA record
    sts_match: bool | None = None  # the host matches the domain's MTA-STS policy
    error: str = ""  # why the probe did not get further

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["tlsa"] = self.tlsa.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MxFacts:
        d = dict(d)
        d["tlsa"] = TlsaState(d.get("tlsa", "n/a"))
        return cls(**d)


@dataclass(frozen=True)
class DomainFacts:
    domain: str
    observed_at: float
    via: str = "mx"  # "mx", "implicit-mx", "route", "smart-host" or "error"
    mx_secure: bool = False  # the MX answer was DNSSEC-validated
    route_error: str = ""  # why routing failed, when it did
    route_permanent: bool = False
    mta_sts: str = "none"  # the policy's mode: "enforce", "testing" or "none"
    mta_sts_id: str = ""
    mta_sts_source: str = ""  # fetched, cached, cached-fallback
    mx: tuple[MxFacts, ...] = ()

    @property
    def sts_enforced(self) -> bool:
        return self.mta_sts == "enforce"

    @property
    def known(self) -> bool:
        """Some next hop was reached: the transport facts are observations, not guesses."""
        return any(m.reachable for m in self.mx)

    @property
    def settled(self) -> bool:
        """Worth caching for long: a server was reached and no lookup failed."""
        return self.known and not any(m.tlsa is TlsaState.ERROR for m in self.mx)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values (a new dict each time; made once per facts object)."""
        return dict(self._as_dict)

    @functools.cached_property
    def _as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mx"}
        d["mx"] = [m.to_dict() for m in self.mx]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainFacts:
        d = dict(d)
        d["mx"] = tuple(MxFacts.from_dict(m) for m in d.get("mx", ()))
        return cls(**d)


@dataclass(frozen=True)
class KeyInfo:
    """A public key known for an address (the key stores are `gateway.probe.keys`)."""

    kind: str  # "smime" or "pgp"
    fingerprint: str
    source: str  # where it came from: "directory", "wkd", ...
    not_after: str | None = None


@dataclass(frozen=True)
class KnownKeys:
    smime: KeyInfo | None = None
    pgp: KeyInfo | None = None
    error: str = ""  # a key store failed: no key is assumed (never plaintext)

    def to_dict(self) -> dict[str, Any]:
        return {
            "smime": dict(vars(self.smime)) if self.smime else None,
            "pgp": dict(vars(self.pgp)) if self.pgp else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class RecipientFacts:
    address: str
    domain: DomainFacts
    keys: KnownKeys = KnownKeys()


def level_of(mx: MxFacts, domain: DomainFacts) -> TlsLevel | None:
    """The highest TLS level delivery to ``mx`` can be expected to reach, after the
    domain's own requirements (RFC 7672 §2.2, RFC 8461 §4); None: the host cannot
    be used (TLSA lookup failed, DANE or MTA-STS would refuse it).  Only for a host
    that was reached; the caller treats unreached hosts as unknown."""
    if mx.tlsa is TlsaState.ERROR:
        return None
    if domain.sts_enforced and mx.sts_match is False:
        return None
    if not mx.starttls:
        if mx.tlsa in (TlsaState.USABLE, TlsaState.UNUSABLE) or domain.sts_enforced:
            return None  # DANE and MTA-STS forbid plaintext
        return TlsLevel.MAY
    if mx.tls_version is None:
        return None  # STARTTLS offered, but no TLS session could be had
    if mx.tlsa is TlsaState.USABLE:
        return TlsLevel.DANE if mx.dane_match else None
    if domain.sts_enforced:
        return TlsLevel.MTA_STS if mx.pkix_valid else None
    if mx.pkix_valid:
        return TlsLevel.VERIFY
    return TlsLevel.ENCRYPT
