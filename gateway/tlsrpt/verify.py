"""verify - would this certificate have passed MTA-STS?  For domains whose policy
is in ``testing`` mode: delivery goes on at the level the policy engine chose (the
certificate perhaps unchecked), and TLS-RPT reports what ``enforce`` would have
found (RFC 8461 5: "testing" - deliver, report the failures).

The check is the one the connection would have made at the ``mta-sts`` level: the
chain the server presented, verified against the system's CAs and ``tls.ca_file``,
naming the MX host (RFC 8461 4.2), with cryptography's X.509 verifier.
"""

from __future__ import annotations

import datetime
import functools
import ssl
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.tlsrpt.model import ResultType

_PEM_END = b"-----END CERTIFICATE-----"
# The CAs are held to the Web PKI's rules, the server's own certificate only to what
# OpenSSL checks in delivery (a SAN naming the host; no CA/Browser Forum profile:
# MX certificates from private CAs often mark the SAN critical)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)


def _load_bundle(path: str | Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, each on its own: one this version of
    cryptography refuses (or warns about) is left out, not the whole bundle."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    found = []
    for block in data.split(_PEM_END)[:-1]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found.append(x509.load_pem_x509_certificate(block + _PEM_END))
            except ValueError:
                continue
    return found


@functools.lru_cache(maxsize=4)
def _roots(ca_file: Path | None) -> Store | None:
    """The system's CAs and ``ca_file``'s, read once."""
    paths = ssl.get_default_verify_paths()
    found: list[x509.Certificate] = []
    for path in (paths.cafile, paths.openssl_cafile):
        if path and (found := _load_bundle(path)):
            break  # one system bundle is enough
    if ca_file is not None:
        found += _load_bundle(ca_file)
    return Store(found) if found else None


def _names(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's DNS names cover ``host`` (a wildcard for the left-
    most label only, RFC 6125 6.4.3)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    host = host.lower().rstrip(".")
    for name in san.value.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in name[2:]:
            return True
    return False


def check(
    chain: list[bytes], host: str, ca_file: Path | None, now: datetime.datetime | None = None
) -> ResultType | None:
    """None when the presented chain (DER, the server's own first) verifies for
    ``host``; else the RFC 8460 result type of the failure."""
    if not chain:
        return ResultType.VALIDATION_FAILURE
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
    except ValueError:
        return ResultType.VALIDATION_FAILURE
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return ResultType.CERTIFICATE_EXPIRED
    if not _names(leaf, host):
        return ResultType.CERTIFICATE_HOST_MISMATCH
    store = _roots(ca_file)
    if store is None:
        return ResultType.CERTIFICATE_NOT_TRUSTED
    try:
        verifier = (
            PolicyBuilder()
            .store(store)
            .time(now)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_server_verifier(x509.DNSName(host))
        )
        verifier.verify(leaf, intermediates)
    except (VerificationError, ValueError):
        return ResultType.CERTIFICATE_NOT_TRUSTED
    return None
