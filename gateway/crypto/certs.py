"""S/MIME recipient certificates: read them from what people have (PEM, DER, PKCS#7
bundles) and decide whether the gateway may encrypt to them.

A certificate is accepted for an address only if all of these hold (the reason is
given otherwise; nothing is imported half):

- it is valid now (not before its start, not after its end);
- it is not a CA certificate (a bundle's CA certificates are skipped, not refused);
- its key is RSA of at least 2048 bits (S/MIME key transport here is RSA; RFC 8551
  allows others, the ``cryptography`` envelope builder does not);
- if it has a Key Usage extension, keyEncipherment is set; if it has an Extended Key
  Usage extension, emailProtection (or anyExtendedKeyUsage) is in it;
- the address is one of its rfc822Name subjectAltNames (compared without regard to
  case; RFC 8550 §3).

Revocation is not checked: fetching CRLs or OCSP would contact the CA; an
administrator removes a revoked certificate with ``sealgate keys remove``.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import SealgateError

MIN_RSA_BITS = 2048


class CertificateError(SealgateError, ValueError):
    """Why a certificate cannot be used for S/MIME encryption."""


@dataclass(frozen=True)
class SmimeCertificate:
    fingerprint: str  # SHA-256 of the DER, hex
    addresses: tuple[str, ...]  # rfc822Name subjectAltNames, lower case
    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    der: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


def read_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in ``data``: PEM (one or more), DER, or a PKCS#7 bundle
    (PEM or DER).  ValueError when it holds none of these."""
    if b"-----BEGIN PKCS7-----" in data:
        return list(pkcs7.load_pem_pkcs7_certificates(data))
    if b"-----BEGIN CERTIFICATE-----" in data:
        return list(x509.load_pem_x509_certificates(data))
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:
        return list(pkcs7.load_der_pkcs7_certificates(data))
    except ValueError:
        raise ValueError("not a certificate (PEM, DER) or a PKCS#7 bundle") from None


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check(cert: x509.Certificate, now: datetime.datetime | None = None) -> SmimeCertificate:
    """The certificate as usable for encryption, or CertificateError saying why not."""
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_before_utc > now:
        raise CertificateError(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if cert.not_valid_after_utc <= now:
        raise CertificateError(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if is_ca(cert):
        raise CertificateError("a CA certificate, not a person's or a mailbox's")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        kind = "an EC" if isinstance(key, ec.EllipticCurvePublicKey) else "a non-RSA"
        raise CertificateError(f"{kind} key: S/MIME encryption here needs RSA")
    if key.key_size < MIN_RSA_BITS:
        raise CertificateError(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_encipherment:
            raise CertificateError("its Key Usage does not allow keyEncipherment")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        allowed = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if not allowed & set(eku):
            raise CertificateError("its Extended Key Usage does not include emailProtection")
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = tuple(a.lower() for a in san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        addresses = ()
    if not addresses:
        raise CertificateError("it names no mail address (no rfc822Name subjectAltName)")
    der = cert.public_bytes(Encoding.DER)
    return SmimeCertificate(
        fingerprint=hashlib.sha256(der).hexdigest(),
        addresses=addresses,
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=der,
    )
