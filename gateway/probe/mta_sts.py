"""MTA-STS (RFC 8461): discover, fetch, parse and cache a domain's policy.

Discovery: exactly one TXT record at ``_mta-sts.<domain>`` that begins with
``v=STSv1;`` and carries an ``id`` (1-32 letters and digits); any other number of
such records, or a malformed one, means "no live policy" (§3.1).  Fetch:
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with a WebPKI-valid certificate
for that name (system CAs plus ``ca_file``, SNI), status 200 only (redirects are not
followed, §3.3), ``text/plain``, at most 64 KiB, within ``timeout``.  Parse (§3.2):
``version: STSv1``, ``mode`` enforce/testing/none, ``max_age`` 0..31557600, one
``mx`` key per pattern (required unless mode is none); unknown keys are ignored.

Cache (§3.3, §5.1): a policy is kept for its ``max_age`` (in memory, and in a file
when the cache has a ``path``, so that it survives a restart).  The TXT record is looked
up at every use; the same ``id`` means the cached policy stands without a fetch.
When no live policy can be had (no TXT, a DNS error, a failed fetch) a non-expired
cached policy still applies - an attacker who removes the TXT record or blocks the
fetch cannot downgrade a domain we have seen enforce.  After a failed fetch the same
``id`` is not fetched again for ``FETCH_BACKOFF`` seconds.

Outcomes are values (`StsResult`); nothing here raises for what a remote party sends.
MX matching (§4.1): ``mx: host`` matches exactly, ``mx: *.suffix`` matches one
left-most label and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.delivery.router import Routed, RouteFailure
from gateway.delivery.tls_policy import TlsLevel
from gateway.errors import SealgateError
from gateway.probe import https
from gateway.probe.dns import LookupStatus, Resolver
from gateway.probe.https import FetchError
from gateway.storage.database import Database, Schema, StorageError
from gateway.storage.migrations import Versioned, prepare
from gateway.tls import client_context

MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_LIMIT = 31557600
FETCH_BACKOFF = 300.0
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class StsMode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class StsPolicy:
    mode: StsMode
    max_age: int
    mx: tuple[str, ...]

    def matches(self, mx_host: str) -> bool:
        """Whether the policy authorises ``mx_host`` (RFC 8461 §4.1)."""
        host = mx_host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


class StsError(SealgateError, ValueError):
    """A record or policy that does not follow RFC 8461 (the reason is the text)."""


def parse_record(txt: str) -> str:
    """The ``id`` of a ``v=STSv1`` TXT record (its strings joined already)."""
    fields = [f.strip() for f in txt.split(";")]
    if not fields or fields[0] != "v=STSv1":
        raise StsError("the record does not begin with v=STSv1")
    found: dict[str, str] = {}
    for item in fields[1:]:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise StsError(f"malformed field {item!r}")
        found.setdefault(key, value)
    record_id = found.get("id")
    if record_id is None or not _ID.fullmatch(record_id):
        raise StsError("no valid id (1-32 letters and digits)")
    return record_id


def parse_policy(text: str) -> StsPolicy:
    """A policy file's text (CRLF or LF lines of ``key: value``)."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.fullmatch(key) or not value:
            raise StsError(f"line {number} is not 'key: value'")
        if key == "mx":
            mx.append(_mx_pattern(value, number))
        else:
            values.setdefault(key, value)  # the first occurrence counts
    if values.get("version") != "STSv1":
        raise StsError("version is not STSv1")
    try:
        mode = StsMode(values.get("mode", ""))
    except ValueError:
        raise StsError(f"mode {values.get('mode')!r} is not enforce, testing or none") from None
    max_age_text = values.get("max_age", "")
    if not max_age_text.isdigit() or int(max_age_text) > MAX_AGE_LIMIT:
        raise StsError(f"max_age {max_age_text!r} is not a number of seconds up to 31557600")
    if not mx and mode is not StsMode.NONE:
        raise StsError(f"mode {mode.value} needs at least one mx")
    return StsPolicy(mode, int(max_age_text), tuple(mx))


def _mx_pattern(value: str, number: int) -> str:
    pattern = value.lower().rstrip(".")
    body = pattern[2:] if pattern.startswith("*.") else pattern
    labels = body.split(".")
    if not all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels):
        raise StsError(f"line {number}: {value!r} is not an mx pattern (A-labels only)")
    return pattern


# -- fetching ---------------------------------------------------------------------------


async def fetch_policy_text(
    domain: str,
    resolver: Resolver,
    *,
    port: int = 443,
    ca_file: Path | None = None,
    timeout: float = 60.0,
) -> str:
    """GET https://mta-sts.<domain>/.well-known/mta-sts.txt under RFC 8461 §3.3's rules."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(timeout):
            response = await https.get(
                host,
                "/.well-known/mta-sts.txt",
                port,
                resolver,
                client_context(ca_file),
                MAX_POLICY_BYTES,
                "text/plain",
            )
    except TimeoutError:
        raise FetchError(f"no policy from {host} within {timeout:g} s") from None
    if response.status != 200:  # a redirect too: RFC 8461 §3.3 forbids following it
        raise FetchError(f"{host} answered HTTP {response.status}")
    if response.media_type != "text/plain":
        kind = response.media_type or "no type"
        raise FetchError(f"{host} served the policy as {kind}, not text/plain")
    try:
        return response.body.decode("ascii")
    except UnicodeDecodeError:
        raise FetchError(f"{host}: the policy is not ASCII text") from None


# -- discovery and the cache ------------------------------------------------------------


class StsSource(enum.StrEnum):
    NONE = "none"  # no policy, live or cached
    FETCHED = "fetched"  # a new policy was fetched now
    CACHED = "cached"  # the TXT id matches the cached policy
    CACHED_FALLBACK = "cached-fallback"  # no live policy; a non-expired cached one applies


@dataclass(frozen=True)
class StsResult:
    domain: str
    policy: StsPolicy | None
    source: StsSource
    policy_id: str = ""
    detail: str = ""  # why there is no live policy, when there is none
    # when the domain's policy could not be fetched or read: TLS-RPT's result type
    # (sts-policy-fetch-error, sts-webpki-invalid, sts-policy-invalid)
    failure: str = ""

    @property
    def enforced(self) -> bool:
        return self.policy is not None and self.policy.mode is StsMode.ENFORCE


@dataclass
class _Cached:
    policy_id: str
    policy: StsPolicy
    expires: float


class StsStore(Protocol):
    """Where fetched policies are kept between restarts (and, in a cluster, shared):
    a JSON file (`JsonStsStore`) or a table (`SqlStsStore`).  Blocking: called from
    a thread."""

    def load(self, now: float) -> dict[str, _Cached]: ...

    def save(self, domain: str, cached: _Cached) -> None: ...

    def close(self) -> None: ...


class JsonStsStore:
    """One JSON file, written whole and renamed over the old one."""

    def __init__(self, path: Path):
        self.path = path
        self._all: dict[str, dict[str, object]] = {}

    def close(self) -> None:
        pass  # each save wrote the file whole

    def load(self, now: float) -> dict[str, _Cached]:
        """The policies still valid; a missing or unreadable file is an empty store."""
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            found = {domain: _from_json(item) for domain, item in saved.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        self._all = {d: _to_json(c) for d, c in found.items() if c.expires > now}
        return {d: c for d, c in found.items() if c.expires > now}

    def save(self, domain: str, cached: _Cached) -> None:
        self._all[domain] = _to_json(cached)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self._all, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)


def _to_json(c: _Cached) -> dict[str, object]:
    return {
        "id": c.policy_id,
        "mode": c.policy.mode.value,
        "max_age": c.policy.max_age,
        "mx": list(c.policy.mx),
        "expires": c.expires,
    }


def _from_json(item: dict[str, Any]) -> _Cached:
    policy = StsPolicy(StsMode(item["mode"]), int(item["max_age"]), tuple(item["mx"]))
    return _Cached(str(item["id"]), policy, float(item["expires"]))


STS_SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS mta_sts_policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    max_age BIGINT NOT NULL,
    mx TEXT NOT NULL,
    expires {real} NOT NULL
);
""")


STS_VERSIONED = Versioned("mta_sts", (STS_SCHEMA,))


class SqlStsStore:
    """A table in the shared database: every node knows every domain's policy."""

    def __init__(self, db: Database):
        self.db = db
        prepare(self.db, STS_VERSIONED)

    def close(self) -> None:
        self.db.close()

    def load(self, now: float) -> dict[str, _Cached]:
        with self.db.transaction():
            self.db.execute("DELETE FROM mta_sts_policies WHERE expires <= ?", (now,))
        rows = self.db.execute(
            "SELECT domain, policy_id, mode, max_age, mx, expires FROM mta_sts_policies"
        )
        found = {}
        for domain, policy_id, mode, max_age, mx, expires in rows:
            try:
                policy = StsPolicy(StsMode(mode), int(max_age), tuple(json.loads(mx)))
            except (ValueError, TypeError):
                continue  # a row this version cannot read: as if not cached
            found[domain] = _Cached(policy_id, policy, float(expires))
        return found

    def save(self, domain: str, cached: _Cached) -> None:
        p = cached.policy
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO mta_sts_policies(domain, policy_id, mode, max_age, mx, expires) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (domain) DO UPDATE SET "
                "policy_id=excluded.policy_id, mode=excluded.mode, max_age=excluded.max_age, "
                "mx=excluded.mx, expires=excluded.expires",
                (
                    domain,
                    cached.policy_id,
                    p.mode.value,
                    p.max_age,
                    json.dumps(p.mx),
                    cached.expires,
                ),
            )


@dataclass
class StsCache:
    """Policies by domain, and what to do when the live one cannot be had.

    With a ``store`` (or a ``path``: a `JsonStsStore` there), the policies also
    outlive a restart, so that a restart does not forget a domain's ``enforce``: a
    freshly started gateway must not be the one an attacker can downgrade."""

    resolver: Resolver
    port: int = 443
    ca_file: Path | None = None
    timeout: float = 60.0
    clock: Callable[[], float] = time.time
    path: Path | None = None
    store: StsStore | None = None
    _policies: dict[str, _Cached] = field(default_factory=dict)
    _backoff: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    _saving: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.store is None and self.path is not None:
            self.store = JsonStsStore(self.path)

    def load(self) -> int:
        """Read the kept policies (blocking: call it from a thread); returns how many
        are still valid."""
        if self.store is None:
            return 0
        self._policies.update(self.store.load(self.clock()))
        return len(self._policies)

    async def _save(self, domain: str, cached: _Cached) -> None:
        if self.store is None:
            return
        async with self._saving:  # one writer at a time
            with contextlib.suppress(OSError, StorageError):  # the memory still holds it
                await asyncio.to_thread(self.store.save, domain, cached)

    async def policy(self, domain: str) -> StsResult:
        domain = domain.lower().rstrip(".")
        now = self.clock()
        cached = self._policies.get(domain)
        if cached is not None and cached.expires <= now:
            del self._policies[domain]
            cached = None
        record_id, why = await self._discover(domain)
        if record_id is None:
            return self._fallback(domain, cached, why)
        if cached is not None and cached.policy_id == record_id:
            return StsResult(domain, cached.policy, StsSource.CACHED, record_id)
        until, failure = self._backoff.get((domain, record_id), (0.0, ""))
        if until > now:
            why = "the last fetch failed; waiting to retry"
            return self._fallback(domain, cached, why, failure)
        try:
            text = await fetch_policy_text(
                domain, self.resolver, port=self.port, ca_file=self.ca_file, timeout=self.timeout
            )
            policy = parse_policy(text)
        except (FetchError, StsError) as e:
            if isinstance(e, StsError):
                failure = "sts-policy-invalid"
            else:
                failure = "sts-webpki-invalid" if e.certificate else "sts-policy-fetch-error"
            self._backoff[(domain, record_id)] = (now + FETCH_BACKOFF, failure)
            return self._fallback(domain, cached, str(e), failure)
        self._policies[domain] = fresh = _Cached(record_id, policy, now + policy.max_age)
        await self._save(domain, fresh)
        return StsResult(domain, policy, StsSource.FETCHED, record_id)

    async def _discover(self, domain: str) -> tuple[str | None, str]:
        lookup = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
        if lookup.status is LookupStatus.ERROR:
            return None, f"TXT lookup failed ({lookup.error})"
        records = [t for t in lookup.texts if t.startswith("v=STSv1")]
        if len(records) != 1:
            return None, f"{len(records)} v=STSv1 TXT records"
        try:
            return parse_record(records[0]), ""
        except StsError as e:
            return None, f"TXT record: {e}"

    @staticmethod
    def _fallback(domain: str, cached: _Cached | None, why: str, failure: str = "") -> StsResult:
        if cached is not None:
            return StsResult(
                domain, cached.policy, StsSource.CACHED_FALLBACK, cached.policy_id, why, failure
            )
        return StsResult(domain, None, StsSource.NONE, detail=why, failure=failure)


def enforce(
    domain: str, sts: StsResult, routed: Routed, level: TlsLevel
) -> tuple[Routed | RouteFailure, TlsLevel, str]:
    """RFC 8461 on a route found by MX records: under an ``enforce`` policy only the
    policy's MX hosts, at least at the ``mta-sts`` level (verified TLS, never lower);
    ``testing`` is noted for the evidence and changes nothing.  Returns the route (or
    a temporary failure, 4.7.5, when no MX host matches), the level and the note."""
    if sts.policy is None or sts.policy.mode is StsMode.NONE:
        return routed, level, ""
    note = f"{sts.policy.mode.value} id={sts.policy_id} ({sts.source.value})"
    if not sts.enforced:
        return routed, level, note
    allowed = tuple(h for h in routed.hops if sts.policy.matches(h.host))
    if not allowed:
        reason = f"no MX host of {domain} matches its MTA-STS policy (id={sts.policy_id})"
        return RouteFailure(False, "4.7.5", reason), level, note
    return dataclasses.replace(routed, hops=allowed), max(level, TlsLevel.MTA_STS), note
