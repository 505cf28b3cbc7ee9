"""DKIM signing (RFC 6376; Ed25519 per RFC 8463) of the copies the gateway changes.

An encrypted copy, or one whose subject tag was removed, no longer matches the
signature Microsoft 365 or Google put on the original: that signature is removed from
the copy (it would only fail) and, with ``dkim.*`` configured, the gateway signs the
copy with its own key.  Copies sent as received keep their original signature and
are not touched (``dkim.sign: changed``), unless ``dkim.sign: all``.

Canonicalization relaxed/relaxed; the signed header fields are those of
`SIGNED_FIELDS` present in the copy, From listed once more than it occurs (so that no
From can be added without breaking the signature).  RSA signing goes through
OpenSSL (`cryptography`), about 1 ms, not dkimpy's pure-Python RSA (about 10 ms).
"""

from __future__ import annotations

import base64
import email.policy
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from gateway.errors import SealgateError

SIGNED_FIELDS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
# One header field and its continuation lines: group 1 the name, 2 the value, 0 its
# exact bytes (signing here, verifying in gateway.crypto.dkim_verify)
FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")
# WSP that relaxed canonicalization changes: a tab, or a space followed by more WSP
# (a lone space stays, and most are lone: far fewer matches than [ \t]+)
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_TRAILING_WSP = re.compile(rb"[ \t]+\r\n")


class DkimError(SealgateError, ValueError):
    """The key or the message cannot be used for signing."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def algorithm(self) -> str:
        return "ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else "rsa-sha256"

    def public_record(self) -> str:
        """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
        public = self.key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def load_key(path: Path, domain: str, selector: str) -> DkimKey:
    """An unencrypted PEM private key: RSA of at least 1024 bits (RFC 8301; 2048
    recommended) or Ed25519."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise DkimError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimError(f"{path}: an RSA key of {key.key_size} bits (RFC 8301: at least 1024)")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimError(f"{path}: an RSA or Ed25519 key is needed")
    return DkimKey(domain.lower(), selector, key)


def relaxed_lines(lines: bytes) -> bytes:
    """RFC 6376 §3.4.4 a and b on whole lines: WSP runs to one space, none at the end."""
    return _TRAILING_WSP.sub(b"\r\n", _WSP_RUN.sub(b" ", lines))


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4."""
    body = relaxed_lines(body).rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: ``name:value`` without the CRLF."""
    value = value.replace(b"\r\n", b"")
    value = _WSP_RUN.sub(b" ", value).strip(b" \t")
    return name.strip().lower() + b":" + value


def sign(message: bytes, key: DkimKey, now: float | None = None) -> bytes:
    """The ``DKIM-Signature:`` field (with its CRLF) to put in front of ``message``."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message, b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    fields = [(m.group(1), m.group(2)) for m in FIELD.finditer(head)]
    names = [n.lower().decode("ascii") for n, _ in fields]
    if "from" not in names:
        raise DkimError("the message has no From field to sign")
    signed: list[str] = [n for n in SIGNED_FIELDS if n in names for _ in range(names.count(n))]
    signed.append("from")  # over-signed: a second From would break the signature
    # RFC 6376 §5.4.2: a name listed N times takes its last N instances, bottom up.
    remaining: dict[str, list[tuple[bytes, bytes]]] = {}
    for (name, value), lower in zip(fields, names, strict=True):
        remaining.setdefault(lower, []).append((name, value))
    canonical = b""
    for lower in signed:
        stack = remaining.get(lower)
        if stack:
            name, value = stack.pop()
            canonical += relaxed_header(name, value) + b"\r\n"
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
    stamp = int(time.time() if now is None else now)
    tags = (
        f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector};"
        f"\r\n\tt={stamp}; h={':'.join(signed)};\r\n\tbh={body_hash};\r\n\tb="
    )
    data = canonical + relaxed_header(b"DKIM-Signature", tags.encode())
    if isinstance(key.key, rsa.RSAPrivateKey):
        signature = key.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.key.sign(hashlib.sha256(data).digest())  # RFC 8463 §3
    b = base64.b64encode(signature).decode()
    folded = "\r\n\t".join(b[i : i + 72] for i in range(0, len(b), 72))
    return f"DKIM-Signature: {tags}{folded}\r\n".encode()


def domain_a_label(domain: str) -> str:
    """A domain as DNS and the configuration write it: lower case, A-labels."""
    domain = domain.rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def author_domain_of(from_values: list[bytes]) -> str | None:
    """The domain of the one author address, given the values of the message's From
    fields (RFC 5322 3.6.2; DMARC, RFC 7489 6.6.1, refuses several), or None."""
    if len(from_values) != 1:
        return None
    text = from_values[0].decode("utf-8", "replace").replace("\r\n", "")
    try:
        # the standard library's full RFC 5322 parser, which reports what it had to
        # guess: any guess (a defect) means no domain, never one picked by chance
        header = email.policy.default.header_factory("from", text)
    except (ValueError, IndexError):
        return None
    addresses = header.addresses
    if header.defects or len(addresses) != 1 or not addresses[0].domain:
        return None
    return domain_a_label(addresses[0].domain)


def author_domain(message: bytes) -> str | None:
    """The From domain of ``message`` (see `author_domain_of`)."""
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end < 0 else end + 2
    values = [
        m.group(2) for m in FIELD.finditer(message, 0, head_end) if m.group(1).lower() == b"from"
    ]
    return author_domain_of(values)


def without_signatures(message: bytes) -> bytes:
    """The message without its DKIM-Signature fields (a changed copy's would fail);
    everything else byte for byte."""
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end < 0 else end + 2
    if b"dkim-signature" not in message[:head_end].lower():
        return message  # none to take out (the common case: no copy of the bytes)
    out, pos = [], 0
    for m in FIELD.finditer(message, 0, head_end):
        if m.group(1).lower() == b"dkim-signature":
            out.append(message[pos : m.start()])
            pos = m.end()
    out.append(message[pos:])
    return b"".join(out)
