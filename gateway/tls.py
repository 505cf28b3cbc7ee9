"""TLS material: the generated self-signed certificate and the server context.

With no ``tls.cert_file`` configured, the first start generates an ECDSA P-256
certificate valid for the SMTP host name, ``localhost`` and the loopback addresses
under ``<state_dir>/tls/`` (key mode 0600) and reuses it afterwards.  Microsoft 365
connectors that validate the certificate need a CA-issued one: configure it.

The server context allows TLS 1.2 or later only.  When relaying by client
certificate is configured it asks for (but does not require) a client certificate,
verified against the system CAs plus ``relay.client_ca_file``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import Config
from gateway.durable import write_file
from gateway.layout import StateLayout

SELF_SIGNED_DAYS = 825


def self_signed_paths(state_dir: Path) -> tuple[Path, Path]:
    return StateLayout(state_dir).self_signed


def ensure_self_signed(state_dir: Path, hostname: str) -> tuple[Path, Path, bool]:
    """Return (cert, key, generated_now); generate the pair if it does not exist."""
    cert_path, key_path = self_signed_paths(state_dir)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, False
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file(key_path, key_pem, 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path, True


def listener_pair(
    config: Config, hostname: str, cert: Path | None, key: Path | None
) -> tuple[Path, Path]:
    """A listener's certificate and key: its own pair, else the SMTP listener's, else
    the self-signed one (made if missing)."""
    if cert is None or key is None:
        cert, key = config.tls.cert_file, config.tls.key_file
    if cert is None or key is None:
        cert, key, _ = ensure_self_signed(config.state_dir, hostname)
    return cert, key


def server_context(
    cert_file: Path,
    key_file: Path,
    min_version: str = "1.2",
    client_ca_file: Path | None = None,
    ask_client_cert: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ask_client_cert:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        if client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(client_ca_file))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_file: Path | str | None, *, verify: bool = True) -> ssl.SSLContext:
    """The context Sealgate connects out with (SMTP delivery and probes, MTA-STS and
    WKD fetches, webhooks, TLS reports): TLS 1.2 or later, verifying against the
    system's CAs and ``ca_file``, or - ``verify=False`` - not at all (opportunistic
    TLS, and DANE, which checks the chain itself).  Made once and shared by every
    connection: loading the system's CAs takes 10-40 ms of CPU, which once per
    connection was most of the CPU of delivering to many destinations.  A
    ``ca_file`` that changes (time or size) gets a new one."""
    if not verify or ca_file is None:
        return _client_context(verify, None, None)
    try:
        st = os.stat(ca_file)
        stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None  # loading it fails as it did before
    return _client_context(verify, str(ca_file), stamp)


@functools.lru_cache(maxsize=8)
def _client_context(
    verify: bool, ca_file: str | None, stamp: tuple[int, int] | None
) -> ssl.SSLContext:
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def cert_matches_key(cert_file: Path, key_file: Path) -> bool:
    """True when the first certificate in cert_file is for the private key in key_file."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def sha256_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def not_after(cert_file: Path) -> float:
    """When the first certificate in a PEM file expires (Unix time); OSError or
    ValueError when the file cannot be read as PEM."""
    cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    return cert.not_valid_after_utc.timestamp()
