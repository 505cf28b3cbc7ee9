"""Check what a configuration refers to: files, directories, certificates, users.

`check_references` returns the first problem as a `ConfigError` naming the key, so
that ``sealgate check-config`` and ``sealgate run`` report the same precise message.
Nothing is created or changed here; a state directory that does not exist yet is
fine if it can be created.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import Config
from gateway.crypto.dkim import DkimError, DkimKey, load_key
from gateway.errors import ConfigError
from gateway.policy.language import Policy, load_policy_for
from gateway.smtp.auth import parse_users
from gateway.tls import cert_matches_key

Signer = tuple[x509.Certificate, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]


def _readable(key: str, path: Path, source: str) -> bytes:
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist", source)
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a regular file", source)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"{path} is not readable: {e.strerror}", source) from None


def _writable_dir(key: str, path: Path, source: str) -> None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"{probe} is not a directory", source)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{probe} is not writable", source)


def _pem_certs(key: str, data: bytes, path: Path, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate", source) from None
    return certs


def check_references(cfg: Config, source: str = "<config>") -> Policy:
    """Check everything ``cfg`` refers to; returns the policy it names, loaded."""
    _writable_dir("state_dir", cfg.state_dir, source)
    tls = cfg.tls
    if tls.cert_file is not None and tls.key_file is not None:
        _pem_certs(
            "tls.cert_file",
            _readable("tls.cert_file", tls.cert_file, source),
            tls.cert_file,
            source,
        )
        _readable("tls.key_file", tls.key_file, source)
        try:
            matches = cert_matches_key(tls.cert_file, tls.key_file)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                "tls.key_file",
                f"{tls.key_file} is not an unencrypted PEM private key ({e})",
                source,
            ) from None
        if not matches:
            raise ConfigError(
                "tls.key_file",
                f"{tls.key_file} does not match the certificate in {tls.cert_file}",
                source,
            )
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(tls.cert_file), str(tls.key_file)
            )
        except ssl.SSLError as e:
            raise ConfigError(
                "tls.cert_file", f"OpenSSL refuses the pair: {e.reason}", source
            ) from None
    relay = cfg.relay
    if relay.client_ca_file is not None:
        _pem_certs(
            "relay.client_ca_file",
            _readable("relay.client_ca_file", relay.client_ca_file, source),
            relay.client_ca_file,
            source,
        )
    if relay.users_file is not None:
        data = _readable("relay.users_file", relay.users_file, source)
        try:
            parse_users(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("relay.users_file", f"{relay.users_file}: {e}", source) from None
    key_file = cfg.logging.address_hash_key_file
    if key_file is not None and cfg.logging.addresses == "hash":
        data = _readable("logging.address_hash_key_file", key_file, source)
        if len(data) < 16:
            raise ConfigError(
                "logging.address_hash_key_file", f"{key_file} holds fewer than 16 bytes", source
            )
    sm = cfg.smime
    if sm.signing_cert_file is not None and sm.signing_key_file is not None:
        load_signer(sm.signing_cert_file, sm.signing_key_file, source)
    dkim_key(cfg, source)
    if cfg.pgp.signing_key_file is not None:
        _readable("pgp.signing_key_file", cfg.pgp.signing_key_file, source)
    pc = cfg.portal
    if pc.enabled:
        if (pc.cert_file is None) != (pc.key_file is None):
            raise ConfigError(
                "portal.key_file", "set portal.cert_file and key_file together", source
            )
        if pc.cert_file is not None and pc.key_file is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    str(_path_ok("portal.cert_file", pc.cert_file, source)),
                    str(_path_ok("portal.key_file", pc.key_file, source)),
                )
            except ssl.SSLError as e:
                raise ConfigError(
                    "portal.cert_file", f"OpenSSL refuses the pair: {e.reason}", source
                ) from None
        if pc.logo_file is not None:
            data = _readable("portal.logo_file", pc.logo_file, source)
            if not data.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ConfigError("portal.logo_file", f"{pc.logo_file} is not a PNG image", source)
    if cfg.archive.enabled:
        from gateway.archive.service import master_keys, signing_key

        if cfg.archive.master_keys:
            master_keys(cfg, create=False)
        if cfg.archive.signing_key_file is not None:
            signing_key(cfg, create=False)
    return load_policy_for(cfg)


def _path_ok(key: str, path: Path, source: str) -> Path:
    _readable(key, path, source)
    return path


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
    certs = _pem_certs(
        "smime.signing_cert_file",
        _readable("smime.signing_cert_file", cert_file, source),
        cert_file,
        source,
    )
    data = _readable("smime.signing_key_file", key_file, source)
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
