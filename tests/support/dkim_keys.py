"""DKIM signing keys for tests, signing with dkimpy (the reference implementation,
independent of the gateway's code) and publishing on the test DNS server."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.support.dns import DnsFixture


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private: bytes  # as dkimpy takes it: PEM (RSA) or the base64 seed (Ed25519)
    record: str  # the TXT record to publish
    algorithm: bytes

    def sign(
        self,
        message: bytes,
        *,
        canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
        headers: list[bytes] | None = None,
        length: bool = False,
    ) -> bytes:
        """The message with this key's DKIM-Signature on top."""
        field = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private,
            canonicalize=canonicalize,
            include_headers=headers,
            length=length,
            signature_algorithm=self.algorithm,
            linesep=b"\r\n",
        )
        return bytes(field) + message

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def publish(self, dns: DnsFixture, record: str | None = None) -> None:
        publish_txt(dns, self.name, record if record is not None else self.record)


def publish_txt(dns: DnsFixture, name: str, text: str) -> None:
    """A TXT record of any length, as strings of at most 255 octets."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    dns.add(name, "TXT", " ".join(f'"{p}"' for p in parts))


@functools.cache
def _rsa(bits: int, n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_signing_key(domain: str, selector: str = "sel1", bits: int = 2048) -> SigningKey:
    """An RSA key; the same key for the same (domain, selector) within a test run."""
    key = _rsa(bits, hash((domain, selector)))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    return SigningKey(domain, selector, pem, record, b"rsa-sha256")


def ed25519_signing_key(domain: str, selector: str = "ed1") -> SigningKey:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
    return SigningKey(domain, selector, base64.b64encode(seed), record, b"ed25519-sha256")
