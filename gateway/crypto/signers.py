"""signers - the organisation's own keys, loaded from the files the configuration
names: the S/MIME signing certificate and key (checked as a pair), the DKIM key.

Each failure is a `ConfigError` naming the option and the file, so that
``sealgate check-config``, ``sealgate run`` and a reload report the same message.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import Config
from gateway.crypto.dkim import DkimError, DkimKey, load_key
from gateway.errors import ConfigError

Signer = tuple[x509.Certificate, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]


def read_config_file(key: str, path: Path, source: str) -> bytes:
    """The bytes of the file option ``key`` names, or a `ConfigError` that says why not."""
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist", source)
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a regular file", source)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"{path} is not readable: {e.strerror}", source) from None


def pem_certs(key: str, data: bytes, path: Path, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate", source) from None
    return certs


class DkimKeys:
    """The DKIM signing keys: one per From domain (``dkim.keys``) and the one for
    every other domain (``dkim.domain``/``selector``/``key_file``), if set."""

    def __init__(self, by_domain: dict[str, DkimKey], fallback: DkimKey | None):
        self.by_domain, self.fallback = by_domain, fallback

    def __bool__(self) -> bool:
        return bool(self.by_domain) or self.fallback is not None

    def aligned(self, domain: str | None) -> DkimKey | None:
        """The key of ``domain`` or of its nearest parent listed in ``dkim.keys``."""
        while domain:
            key = self.by_domain.get(domain)
            if key is not None:
                return key
            domain = domain.partition(".")[2]
        return None

    def for_author(self, domain: str | None) -> DkimKey | None:
        return self.aligned(domain) or self.fallback


def dkim_keys(cfg: Config, source: str = "<config>") -> DkimKeys:
    """Every configured DKIM key, loaded; `ConfigError` names the one that is wrong."""
    dk = cfg.dkim
    fallback = None
    if dk.domain is not None and dk.selector is not None and dk.key_file is not None:
        try:
            fallback = load_key(dk.key_file, dk.domain, dk.selector)
        except DkimError as e:
            raise ConfigError("dkim.key_file", str(e), source) from None
    by_domain = {}
    for domain, entry in dk.keys.items():
        try:
            by_domain[domain] = load_key(entry.key_file, domain, entry.selector)
        except DkimError as e:
            raise ConfigError(f"dkim.keys.{domain}.key_file", str(e), source) from None
    return DkimKeys(by_domain, fallback)


def load_signer(cert_file: Path, key_file: Path, source: str = "<config>") -> Signer:
    """The organisation's S/MIME signing certificate and key, checked as a pair."""
    certs = pem_certs(
        "smime.signing_cert_file",
        read_config_file("smime.signing_cert_file", cert_file, source),
        cert_file,
        source,
    )
    data = read_config_file("smime.signing_key_file", key_file, source)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            "smime.signing_key_file",
            f"{key_file} is not an unencrypted PEM private key ({e})",
            source,
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            "smime.signing_key_file", f"{key_file}: an RSA or EC key is needed", source
        )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise ConfigError(
            "smime.signing_key_file",
            f"{key_file} does not match the certificate in {cert_file}",
            source,
        )
    return certs[0], key
