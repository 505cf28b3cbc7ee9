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


def dkim_key(cfg: Config, source: str = "<config>") -> DkimKey | None:
    dk = cfg.dkim
    if dk.domain is None or dk.selector is None or dk.key_file is None:
        return None
    try:
        return load_key(dk.key_file, dk.domain, dk.selector)
    except DkimError as e:
        raise ConfigError("dkim.key_file", str(e), source) from None


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
