"""Relay authorization: who may send mail through Sealgate.

A client may relay when any one of these holds (checked at RCPT):

1. its IP address is in ``relay.networks``;
2. it presented a TLS client certificate that chains to a trusted CA and matches a
   ``relay.client_certs`` pattern (how Microsoft 365 connectors authenticate);
3. it authenticated with SMTP AUTH PLAIN or LOGIN, which is offered only after
   STARTTLS, against ``relay.users_file``.

Everything else is refused with 554 5.7.1: Sealgate is never an open relay.

Users file: one ``user:hash`` per line, or ``user:hash:senders`` to limit the user to
its own envelope senders (comma-separated: ``alice@example.org``, ``example.org``,
``.example.org`` for subdomains); ``#`` starts a comment.  Hashes are scrypt in PHC
string form, ``$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` (base64 without padding), as
printed by ``sealgate hash-password``.  Verification runs in a worker thread; the
comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.addresses import check_mailbox
from gateway.config import DomainPattern, IPNetwork, parse_domain_pattern

_PHC = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
_USER = re.compile(r"[^\s:#]+")
SCRYPT_LN, SCRYPT_R, SCRYPT_P = 14, 8, 1
ALLOWED_KEEP = 4096  # client addresses whose `RelayPolicy.network_allows` answer is kept


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**SCRYPT_LN, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"$scrypt$ln={SCRYPT_LN},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    m = _PHC.fullmatch(encoded)
    if not m:
        return False
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    expected = _unb64(m.group(5))
    digest = hashlib.scrypt(
        password,
        salt=_unb64(m.group(4)),
        n=2**ln,
        r=r,
        p=p,
        dklen=len(expected),
        maxmem=256 * 1024 * 1024,
    )
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True)
class User:
    hash: str
    # the envelope senders this user may use; empty: any (relay.sender_domains aside)
    senders: tuple[str, ...] = ()

    def may_send_as(self, address: str) -> bool:
        if not self.senders:
            return True
        address = address.lower()
        domain = address.rpartition("@")[2]
        for allowed in self.senders:
            if "@" in allowed:
                if address == allowed:
                    return True
            elif DomainPattern(allowed).matches(domain):
                return True
        return False


def _parse_senders(text: str, number: int) -> tuple[str, ...]:
    senders = []
    for item in text.split(","):
        item = item.strip()
        if "@" in item:
            local, _, domain = item.rpartition("@")
            if not local or check_mailbox(item, utf8=True) is not None:
                raise ValueError(f"line {number}: {item!r} is not a sender address")
            senders.append(f"{local}@{parse_domain_pattern(domain)}".lower())
        else:
            try:
                senders.append(parse_domain_pattern(item))
            except ValueError as e:
                raise ValueError(f"line {number}: {e}") from None
    return tuple(senders)


def parse_users(text: str) -> dict[str, User]:
    """Parse a users file; ValueError names the line that is wrong."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        encoded, has_senders, sender_text = rest.partition(":")
        if not sep or not _USER.fullmatch(user):
            raise ValueError(f"line {number}: expected 'user:hash' or 'user:hash:senders'")
        m = _PHC.fullmatch(encoded)
        if not m:
            raise ValueError(
                f"line {number}: the hash for {user!r} is not a "
                "'sealgate hash-password' scrypt hash"
            )
        if not (
            10 <= int(m.group(1)) <= 20
            and 1 <= int(m.group(2)) <= 32
            and 1 <= int(m.group(3)) <= 16
        ):
            raise ValueError(f"line {number}: scrypt parameters out of range")
        if user in users:
            raise ValueError(f"line {number}: user {user!r} appears twice")
        senders = _parse_senders(sender_text, number) if has_senders else ()
        users[user] = User(encoded, senders)
    return users


def load_users(path: Path) -> dict[str, User]:
    return parse_users(path.read_text(encoding="utf-8"))


# A hash to check against for unknown users, so that timing does not tell which
# user names exist.
_DUMMY_HASH = "$scrypt$ln=14,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + _b64(bytes(32))


def check_credentials(users: dict[str, User], user: str, password: bytes) -> bool:
    entry = users.get(user)
    ok = verify_password(password, entry.hash if entry else _DUMMY_HASH)
    return ok and entry is not None


class AuthThrottle:
    """Failed AUTH attempts per client address and per user name, across connections,
    in a sliding window.  Asked before a password is hashed: a throttled guess costs
    the server nothing, and closing a connection after ``smtp.max_auth_failures``
    does not reset the count.  A success clears the user's count, not the address's.

    Memory is bounded: at most ``max_keys`` addresses and user names are tracked (the
    longest idle go first)."""

    def __init__(
        self,
        per_ip: int,
        per_user: int,
        window: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_ip, self.per_user, self.window = per_ip, per_user, window
        self.clock = clock
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def allows(self, ip: str, user: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return (
            self._recent("ip:" + ip, now) < self.per_ip
            and self._recent("user:" + user, now) < self.per_user
        )

    def failed(self, ip: str, user: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for key in ("ip:" + ip, "user:" + user):
            self._failures.setdefault(key, deque()).append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, user: str) -> None:
        self._failures.pop("user:" + user, None)


@dataclass(frozen=True)
class CertPattern:
    kind: str  # "sha256", "cn" or "san"
    value: str

    @classmethod
    def parse(cls, text: str) -> CertPattern:
        kind, _, value = text.partition(":")
        if kind == "sha256":
            value = value.replace(":", "").lower()
        elif kind == "san":
            value = value.lower().rstrip(".")
        return cls(kind, value)

    def matches(self, fingerprint: str, cert: x509.Certificate) -> bool:
        if self.kind == "sha256":
            return hmac.compare_digest(fingerprint, self.value)
        if self.kind == "cn":
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return any(str(a.value) == self.value for a in cns)
        return any(_dns_match(self.value, name) for name in _dns_sans(cert))


def _dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n.lower().rstrip(".") for n in ext.value.get_values_for_type(x509.DNSName)]


def _dns_match(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        label, _, rest = name.partition(".")
        return bool(label) and label != "*" and rest == pattern[2:]
    return name == pattern


@dataclass(frozen=True)
class CertIdentity:
    sha256: str
    subject: str
    matched: str | None  # the pattern that allowed relaying, if any


class RelayPolicy:
    def __init__(
        self,
        networks: tuple[IPNetwork, ...],
        cert_patterns: tuple[str, ...],
        users: dict[str, User],
    ):
        self.networks = networks
        self.cert_patterns = tuple(CertPattern.parse(p) for p in cert_patterns)
        self.users = users
        self._allowed: dict[str, bool] = {}  # `network_allows`'s answers, by address

    @property
    def asks_client_cert(self) -> bool:
        return bool(self.cert_patterns)

    @property
    def offers_auth(self) -> bool:
        return bool(self.users)

    def network_allows(self, ip: str) -> bool:
        """Whether ``ip`` is in ``relay.networks``: worked out once for the last
        `ALLOWED_KEEP` addresses (a policy is made again when they change)."""
        allowed = self._allowed.get(ip)
        if allowed is None:
            if len(self._allowed) >= ALLOWED_KEEP:
                self._allowed.clear()
            allowed = self._allowed[ip] = self._in_networks(ip)
        return allowed

    def _in_networks(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def identify_cert(self, der: bytes) -> CertIdentity:
        """Describe a verified client certificate and say whether it may relay."""
        cert = x509.load_der_x509_certificate(der)
        fingerprint = hashlib.sha256(der).hexdigest()
        matched = next(
            (f"{p.kind}:{p.value}" for p in self.cert_patterns if p.matches(fingerprint, cert)),
            None,
        )
        return CertIdentity(fingerprint, cert.subject.rfc4514_string(), matched)
