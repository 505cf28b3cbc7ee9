"""DANE for SMTP (RFC 7672, RFC 7671, RFC 6698): TLSA lookup and certificate matching.

Lookup: ``_<port>._tcp.<mx host>`` TLSA, believed only when the answer carries the AD
bit from the administrator's validating resolver (``dns.dnssec: trust-ad``) and the
MX answer was secure too.  A lookup *error* is not "no DANE": that MX host is
unusable (4.7.5), so an attacker who makes TLSA queries fail gains nothing.

Usable records: usage 2 (DANE-TA) or 3 (DANE-EE), selector 0 (certificate) or 1
(SubjectPublicKeyInfo), matching type 0 (exact), 1 (SHA-256) or 2 (SHA-512).  Records
exist but none is usable: TLS is still required, unauthenticated (Postfix's
``encrypt``).  Usable records: the server must match one, or it is skipped.

Matching (RFC 7671 §5): DANE-EE matches the server's own certificate - no name,
expiry or chain checks.  DANE-TA matches a certificate the server presents in its
chain; the chain from the server's certificate up to it must verify (signatures,
validity) and the server certificate must name the MX host.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import DNSName, SubjectAlternativeName
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.probe.dns import LookupStatus, Resolver

DANE_TA, DANE_EE = 2, 3


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        lengths = {0: None, 1: 32, 2: 64}
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype not in lengths:
            return False
        expected = lengths[self.mtype]
        return expected is None or len(self.data) == expected


class TlsaStatus(enum.Enum):
    NONE = "none"  # no secure TLSA records: DANE does not apply to this host
    UNUSABLE = "unusable"  # secure records, none usable: TLS required, not authenticated
    USABLE = "usable"  # authenticate with these records
    ERROR = "error"  # the lookup failed: this host cannot be used now


@dataclass(frozen=True)
class TlsaLookup:
    status: TlsaStatus
    records: tuple[Tlsa, ...] = ()
    detail: str = ""


async def lookup_tlsa(resolver: Resolver, host: str, port: int) -> TlsaLookup:
    name = f"_{port}._tcp.{host.rstrip('.')}"
    found = await resolver.lookup(name, "TLSA")
    if found.status is LookupStatus.ERROR:
        return TlsaLookup(TlsaStatus.ERROR, detail=f"TLSA lookup for {name} failed ({found.error})")
    if found.status is not LookupStatus.OK or not found.secure:
        return TlsaLookup(TlsaStatus.NONE)  # absent, or not DNSSEC-secure: no DANE
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))  # type: ignore[attr-defined]
        for r in found.records
    )
    usable = tuple(r for r in records if r.usable)
    if not usable:
        return TlsaLookup(TlsaStatus.UNUSABLE, records)
    return TlsaLookup(TlsaStatus.USABLE, usable)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(record: Tlsa, cert: x509.Certificate) -> bool:
    data = _selected(cert, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def verify(records: tuple[Tlsa, ...], chain_der: list[bytes], host: str) -> str | None:
    """How the presented chain (server certificate first) matched: "dane-ee" or
    "dane-ta"; None when it matches no record."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return None
    if not chain:
        return None
    leaf = chain[0]
    if any(r.usage == DANE_EE and _matches(r, leaf) for r in records):
        return "dane-ee"
    for record in (r for r in records if r.usage == DANE_TA):
        for anchor in chain:
            if _matches(record, anchor) and _chain_verifies(leaf, chain[1:], anchor, host):
                return "dane-ta"
    return None


def _chain_verifies(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchor: x509.Certificate,
    host: str,
) -> bool:
    # A private hierarchy behind DANE-TA need not follow the CA/Browser Forum profile
    # for server certificates; the name must still be in the subjectAltName.
    ee_policy = ExtensionPolicy.permit_all().require_present(
        SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store([anchor]))
        .time(datetime.datetime.now(datetime.UTC))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_server_verifier(DNSName(host.rstrip(".")))
    )
    try:
        verifier.verify(leaf, [c for c in intermediates if c is not anchor])
    except VerificationError:
        return False
    return True
