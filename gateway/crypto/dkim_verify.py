"""DKIM verification (RFC 6376 section 6; RFC 8301; RFC 8463) of a message as it
arrives, for the relay binding (`gateway.smtp.binding`).

The message is never held whole to be verified: `MessageDigest` keeps the header
section (bounded) and hashes the body chunk by chunk, once per canonicalization the
signatures ask for.  Then `verify` checks every signature - not only the first -
against keys from `KeyCache`, which asks the gateway's own resolvers
(``dns.nameservers``) and keeps answers for their TTL.

Stricter than RFC 6376 where the binding needs it: ``rsa-sha1`` is refused (RFC
8301), RSA keys under 1024 bits are refused, and a signature with a body length
(``l=``) or without ``From`` among its signed fields is refused outright (RFC 6376
8.2: ``l=`` lets anyone append content under a valid signature).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from gateway.crypto.dkim import FIELD, relaxed_header, relaxed_lines

MAX_HEADER_BYTES = 256 * 1024  # a header section beyond this is not checked (refused)
MAX_SIGNATURES = 10  # signatures verified per message; more are ignored
_FWS = re.compile(r"[ \t\r\n]+")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# The value of the b= tag, which is hashed as empty (RFC 6376 3.7)
_B_TAG = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")


class Outcome(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a DKIM result (RFC 8601), not a password
    FAIL = "fail"  # the signature does not verify, or the key says no
    PERMERROR = "permerror"  # malformed, or refused by the rules above
    TEMPERROR = "temperror"  # the key could not be fetched now: try later


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    domain: str  # d= ("" when unreadable)
    reason: str
    signed: tuple[str, ...] = ()  # h=, lower case


class BodyHash:
    """One canonicalized body hash (sha256), fed in chunks that may split lines."""

    def __init__(self, relaxed: bool):
        self.relaxed = relaxed
        self._hash = hashlib.sha256()
        self._partial = b""  # an incomplete last line
        self._empty = 0  # empty lines held back: they count only if text follows
        self._any = False

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        end = data.rfind(b"\r\n")
        if end < 0:
            self._partial = data
            return
        self._partial = data[end + 2 :]
        self._lines(data[: end + 2])

    def _lines(self, block: bytes) -> None:
        if self.relaxed:
            block = relaxed_lines(block)
        text_end = len(block.rstrip(b"\r\n"))
        if text_end == 0:
            self._empty += len(block) // 2
            return
        # The last line with text ends at text_end + CRLF (no bare CR or LF gets here:
        # the listener refuses them).
        if self._empty:
            self._hash.update(b"\r\n" * self._empty)
        self._hash.update(block[: text_end + 2])
        self._empty = (len(block) - text_end - 2) // 2
        self._any = True

    def digest(self) -> bytes:
        if self._partial:
            self._lines(self._partial + b"\r\n")
            self._partial = b""
        if not self._any and not self.relaxed:
            return hashlib.sha256(b"\r\n").digest()  # RFC 6376 3.4.3: an empty body
        return self._hash.copy().digest()


class MessageDigest:
    """What verification needs of a message, taken as it streams past: the header
    section and the body hashes."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.header: bytes | None = None  # once the blank line has been seen
        self.too_big = False
        self._bodies: dict[bool, BodyHash] = {}
        self._fields: list[tuple[bytes, bytes, bytes]] | None = None

    def feed(self, data: bytes) -> None:
        if self.header is None:
            if self.too_big:
                return
            start = max(0, len(self._head) - 3)
            self._head += data
            if self._head.startswith(b"\r\n"):  # no header fields at all
                end = -2
            elif len(self._head) < 2:
                return
            else:
                end = self._head.find(b"\r\n\r\n", start)
            if end == -1:
                if len(self._head) > MAX_HEADER_BYTES:
                    self.too_big, self._head = True, bytearray()
                return
            self.header = bytes(self._head[: end + 2])
            rest = bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._start_bodies()
            data = rest
        for body in self._bodies.values():
            body.feed(data)

    def finish(self) -> None:
        if self.header is None and not self.too_big:
            self.header, self._head = bytes(self._head), bytearray()
            if self.header and not self.header.endswith(b"\r\n"):
                self.header += b"\r\n"
            self._start_bodies()

    def _start_bodies(self) -> None:
        for name, value in self.fields():
            if name == b"dkim-signature":
                body = _canonicalization(value)[1]
                if body is not None and body not in self._bodies:
                    self._bodies[body] = BodyHash(relaxed=body)

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The header fields as (lower-case name, value), top to bottom."""
        return [(lower, value) for lower, value, _ in self.raw_fields()]

    def raw_fields(self) -> list[tuple[bytes, bytes, bytes]]:
        """(lower-case name, value, the field's exact bytes) top to bottom."""
        if self._fields is None:
            found = FIELD.finditer(self.header or b"")
            self._fields = [(m.group(1).lower(), m.group(2), m.group(0)) for m in found]
        return self._fields

    def body_hash(self, relaxed: bool) -> bytes | None:
        body = self._bodies.get(relaxed)
        return body.digest() if body is not None else None


def parse_tags(text: str) -> dict[str, str]:
    """An RFC 6376 3.2 tag list; ValueError if malformed or a tag repeats."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip(" \t\r\n"):
            continue
        name, eq, value = part.partition("=")
        name = name.strip(" \t\r\n")
        if not eq or not _TAG_NAME.fullmatch(name):
            raise ValueError(f"malformed tag {name[:20]!r}")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")
        tags[name] = value.strip(" \t\r\n")
    return tags


def _canonicalization(value: bytes) -> tuple[bool | None, bool | None]:
    """(header relaxed?, body relaxed?) of a signature's c=; None when unreadable."""
    try:
        tags = parse_tags(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, None
    head, _, body = tags.get("c", "simple/simple").partition("/")
    body = body or "simple"
    kinds = {"simple": False, "relaxed": True}
    return kinds.get(head), kinds.get(body)


@dataclass(frozen=True)
class Signature:
    domain: str
    selector: str
    algorithm: str
    relaxed_header: bool
    relaxed_body: bool
    signed: tuple[str, ...]
    body_hash: bytes
    value: bytes
    expires: int | None


class _Refused(Exception):
    def __init__(self, outcome: Outcome, reason: str):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(_FWS.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise _Refused(Outcome.PERMERROR, "a base64 value is malformed") from None


def parse_signature(value: bytes) -> Signature:  # noqa: C901 - one check per tag of RFC 6376 3.5
    """The DKIM-Signature field's value; `_Refused` names what is wrong."""
    try:
        tags = parse_tags(value.decode("ascii"))
    except UnicodeDecodeError:
        raise _Refused(Outcome.PERMERROR, "not ASCII") from None
    except ValueError as e:
        raise _Refused(Outcome.PERMERROR, str(e)) from None
    for required in ("v", "a", "b", "bh", "d", "h", "s"):
        if required not in tags:
            raise _Refused(Outcome.PERMERROR, f"no {required}= tag")
    if tags["v"] != "1":
        raise _Refused(Outcome.PERMERROR, f"version {tags['v'][:10]!r}")
    if "l" in tags:
        raise _Refused(Outcome.PERMERROR, "a body length (l=) is not accepted")
    algorithm = tags["a"].lower()
    if algorithm == "rsa-sha1":
        raise _Refused(Outcome.PERMERROR, "rsa-sha1 is not accepted (RFC 8301)")
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise _Refused(Outcome.PERMERROR, f"unknown algorithm {algorithm[:20]!r}")
    relaxed_h, relaxed_b = _canonicalization(value)
    if relaxed_h is None or relaxed_b is None:
        raise _Refused(Outcome.PERMERROR, "unknown canonicalization")
    domain = tags["d"].lower().rstrip(".")
    signed = tuple(n.strip(" \t\r\n").lower() for n in tags["h"].split(":"))
    if "from" not in signed:
        raise _Refused(Outcome.PERMERROR, "From is not among the signed fields")
    identity = tags.get("i")
    if identity is not None:
        i_domain = identity.rpartition("@")[2].lower().rstrip(".")
        if i_domain != domain and not i_domain.endswith("." + domain):
            raise _Refused(Outcome.PERMERROR, "i= is not within d=")
    expires = None
    if "x" in tags:
        if not tags["x"].isdigit():
            raise _Refused(Outcome.PERMERROR, "x= is not a number")
        expires = int(tags["x"])
    if "q" in tags and "dns/txt" not in tags["q"].split(":"):
        raise _Refused(Outcome.PERMERROR, "no dns/txt query method")
    return Signature(
        domain=domain,
        selector=tags["s"].lower(),
        algorithm=algorithm,
        relaxed_header=relaxed_h,
        relaxed_body=relaxed_b,
        signed=signed,
        body_hash=_b64(tags["bh"]),
        value=_b64(tags["b"]),
        expires=expires,
    )


# -- keys ---------------------------------------------------------------------------


class KeyStatus(enum.Enum):
    FOUND = "found"
    NONE = "none"  # no such record: the signature fails
    TEMPORARY = "temporary"  # the resolvers did not answer: try later


@dataclass(frozen=True)
class KeyAnswer:
    status: KeyStatus
    record: str = ""
    ttl: int = 0


# A TXT lookup: name -> KeyAnswer
Fetch = Callable[[str], Awaitable[KeyAnswer]]


class KeyCache:
    """DKIM key records by TTL (between ``min_ttl`` and ``max_ttl``); missing keys
    for ``negative_ttl``; temporary failures are not kept.  At most ``max_entries``."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        min_ttl: float = 60,
        max_ttl: float = 3600,
        negative_ttl: float = 60,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self.min_ttl, self.max_ttl, self.negative_ttl = min_ttl, max_ttl, negative_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, KeyAnswer]] = OrderedDict()
        self.lookups = 0  # answers fetched, not served from the cache

    async def get(self, selector: str, domain: str) -> KeyAnswer:
        name = f"{selector}._domainkey.{domain}"
        now = self.clock()
        cached = self._entries.get(name)
        if cached is not None and cached[0] > now:
            self._entries.move_to_end(name)
            return cached[1]
        self.lookups += 1
        answer = await self._fetch(name)
        if answer.status is KeyStatus.FOUND:
            keep = min(max(answer.ttl, self.min_ttl), self.max_ttl)
        elif answer.status is KeyStatus.NONE:
            keep = self.negative_ttl
        else:
            return answer
        self._entries[name] = (now + keep, answer)
        self._entries.move_to_end(name)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return answer


def _key_tags(record: str) -> dict[str, str]:
    """The key record's tags, when it may verify a sha256 email signature."""
    try:
        tags = parse_tags(record)
    except ValueError as e:
        raise _Refused(Outcome.PERMERROR, f"key record: {e}") from None
    if tags.get("v", "DKIM1") != "DKIM1":
        raise _Refused(Outcome.PERMERROR, "key record: not v=DKIM1")
    if "p" not in tags:
        raise _Refused(Outcome.PERMERROR, "key record: no p= tag")
    if not tags["p"]:
        raise _Refused(Outcome.FAIL, "the key is revoked")
    if "h" in tags and "sha256" not in [h.strip() for h in tags["h"].split(":")]:
        raise _Refused(Outcome.FAIL, "the key does not allow sha256")
    if "s" in tags and not {"*", "email"} & {s.strip() for s in tags["s"].split(":")}:
        raise _Refused(Outcome.FAIL, "the key is not for email")
    return tags


def _public_key(record: str, algorithm: str) -> rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    tags = _key_tags(record)
    kind = tags.get("k", "rsa")
    raw = _b64(tags["p"])
    if algorithm == "ed25519-sha256":
        if kind != "ed25519" or len(raw) != 32:
            raise _Refused(Outcome.FAIL, "the key is not an Ed25519 key")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if kind != "rsa":
        raise _Refused(Outcome.FAIL, "the key is not an RSA key")
    try:
        key = serialization.load_der_public_key(raw)
    except ValueError:
        raise _Refused(Outcome.PERMERROR, "key record: the RSA key is malformed") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _Refused(Outcome.FAIL, "the key is not an RSA key")
    if key.key_size < 1024:
        raise _Refused(Outcome.PERMERROR, f"an RSA key of {key.key_size} bits (RFC 8301)")
    return key


# -- verification -------------------------------------------------------------------


def _signed_data(digest: MessageDigest, raw: bytes, value: bytes, sig: Signature) -> bytes:
    """The canonicalized header fields named by h=, then the signature field itself
    with an empty b= (RFC 6376 3.7, 5.4.2: a name listed N times takes its last N
    instances, bottom up; a name with no instance left contributes nothing)."""
    fields = digest.raw_fields()
    remaining: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for lower, v, r in fields:
        remaining.setdefault(lower, []).append((v, r))
    out = []
    for name in sig.signed:
        lower = name.encode("ascii", "replace")
        stack = remaining.get(lower)
        if not stack:
            continue
        v, r = stack.pop()
        out.append(relaxed_header(lower, v) + b"\r\n" if sig.relaxed_header else r)
    unsigned = _B_TAG.sub(rb"\1", value)
    if sig.relaxed_header:
        out.append(relaxed_header(b"dkim-signature", unsigned))
    else:  # the field as it stands, b= emptied, without its CRLF
        out.append(raw[: len(raw) - len(value) - 2] + unsigned)
    return b"".join(out)


async def verify(digest: MessageDigest, keys: KeyCache, now: float | None = None) -> list[Result]:
    """Every DKIM signature of the message (up to `MAX_SIGNATURES`), top to bottom."""
    now = time.time() if now is None else now
    results = []
    signatures = [
        (value, raw) for lower, value, raw in digest.raw_fields() if lower == b"dkim-signature"
    ]
    for value, raw in signatures[:MAX_SIGNATURES]:
        results.append(await _verify_one(digest, keys, raw, value, now))
    return results


async def _verify_one(
    digest: MessageDigest, keys: KeyCache, raw: bytes, value: bytes, now: float
) -> Result:
    try:
        sig = parse_signature(value)
    except _Refused as e:
        return Result(e.outcome, "", e.reason)
    try:
        if sig.expires is not None and sig.expires < now:
            raise _Refused(Outcome.FAIL, "the signature has expired (x=)")
        if digest.body_hash(sig.relaxed_body) != sig.body_hash:
            raise _Refused(Outcome.FAIL, "the body hash does not match (altered body)")
        answer = await keys.get(sig.selector, sig.domain)
        if answer.status is KeyStatus.TEMPORARY:
            raise _Refused(Outcome.TEMPERROR, "the key could not be fetched (DNS)")
        if answer.status is KeyStatus.NONE:
            raise _Refused(Outcome.PERMERROR, "no key published for the selector")
        key = _public_key(answer.record, sig.algorithm)
        data = _signed_data(digest, raw, value, sig)
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(sig.value, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(sig.value, hashlib.sha256(data).digest())  # RFC 8463 3
        except InvalidSignature:
            raise _Refused(Outcome.FAIL, "the signature does not verify (altered header)") from None
    except _Refused as e:
        return Result(e.outcome, sig.domain, e.reason, sig.signed)
    return Result(Outcome.PASS, sig.domain, "verified", sig.signed)


def summary(results: Sequence[Result]) -> list[str]:
    """For logs: ``domain:outcome`` per signature (signing domains are organisations)."""
    return [f"{r.domain or '?'}:{r.outcome.value}" for r in results]
