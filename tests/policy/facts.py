"""Facts for engine tests, written the way a probe would have observed them."""

from __future__ import annotations

from gateway.probe.facts import (
    DomainFacts,
    KeyInfo,
    KnownKeys,
    MxFacts,
    RecipientFacts,
    TlsaState,
)

T0 = 1_800_000_000.0

# One server each, by what it can do.
PLAIN = MxFacts("mx.d.test", 25, T0, reachable=True, starttls=False)
SELF_SIGNED = MxFacts(
    "mx.d.test",
    25,
    T0,
    reachable=True,
    starttls=True,
    tls_version="TLSv1.3",
    pkix_valid=False,
    pkix_error="certificate_untrusted",
)
PKIX = MxFacts(
    "mx.d.test", 25, T0, reachable=True, starttls=True, tls_version="TLSv1.3", pkix_valid=True
)
DANE_OK = MxFacts(
    "mx.d.test",
    25,
    T0,
    reachable=True,
    starttls=True,
    tls_version="TLSv1.3",
    pkix_valid=False,
    tlsa=TlsaState.USABLE,
    dane_match=True,
)
DANE_BAD = MxFacts(
    "mx.d.test",
    25,
    T0,
    reachable=True,
    starttls=True,
    pkix_valid=True,
    tlsa=TlsaState.USABLE,
    dane_match=False,
)
TLSA_SERVFAIL = MxFacts(
    "mx.d.test",
    25,
    T0,
    reachable=True,
    starttls=True,
    tls_version="TLSv1.3",
    pkix_valid=True,
    tlsa=TlsaState.ERROR,
)
UNREACHED = MxFacts("mx.d.test", 25, T0, reachable=False, error="connection refused")

SMIME = KeyInfo("smime", "ab" * 32, "directory")
PGP = KeyInfo("pgp", "cd" * 20, "directory")


def facts(
    *mx: MxFacts,
    sts: str = "none",
    sts_match: bool | None = None,
    smime: bool = False,
    pgp: bool = False,
    address: str = "bob@d.test",
    via: str = "mx",
) -> RecipientFacts:
    if sts_match is not None:
        mx = tuple(MxFacts(**{**vars(m), "sts_match": sts_match}) for m in mx)
    domain = DomainFacts(address.rpartition("@")[2], T0, via=via, mta_sts=sts, mx=tuple(mx))
    keys = KnownKeys(SMIME if smime else None, PGP if pgp else None)
    return RecipientFacts(address, domain, keys)
