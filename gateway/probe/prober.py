"""prober - gather the facts about a recipient domain that the policy decides on.

For a domain: route it (MX records, or the admin's route or smart host), read its
MTA-STS policy (RFC 8461, through the shared `StsCache`), and probe each next hop:
connect, EHLO, STARTTLS when offered, with a verifying TLS context (system CAs plus
``tls.ca_file``, SNI and name = the host); when only the certificate check fails, a
second connection without verification learns the TLS version and cipher.  For an MX
whose MX answer was DNSSEC-secure (and ``dns.dnssec: trust-ad``), its TLSA records
(RFC 7672) and whether the certificate chain matches them.  Then QUIT.

Cache: facts by domain and by next hop (several domains share MX hosts) for
``probe.cache_ttl``; what could not be observed (a server not reached, a DNS error)
for ``probe.negative_ttl`` only.  One probe per domain at a time (others wait for its
result), at most ``probe.concurrency`` probe connections at once, and every step has a
time limit, so a domain whose DNS never answers delays nothing but its own mail.

Facts are hints for the decision; delivery enforces the decided level again on its
own connection (a server can change, or a path be tampered with, in between).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
from cryptography import x509

from gateway.config import Config
from gateway.delivery.client import (
    addresses_of,
    connect,
    failure_text,
    presented_chain,
    tls_context,
    tls_failure_of,
)
from gateway.delivery.router import NextHop, RouteFailure, Router
from gateway.delivery.sessions import quit_session
from gateway.delivery.tls_policy import TlsLevel
from gateway.observability.metrics import Metrics
from gateway.probe.dane import Tlsa, TlsaStatus, lookup_tlsa
from gateway.probe.dane import verify as verify_tlsa
from gateway.probe.dns import Resolver
from gateway.probe.facts import DomainFacts, KnownKeys, MxFacts, RecipientFacts, TlsaState
from gateway.probe.keys import KeyStore, NoKeys
from gateway.probe.mta_sts import StsCache, StsMode


@dataclass(frozen=True)
class ProbeSettings:
    helo_name: str
    ca_file: Path | None = None  # extra trusted CAs
    connect_timeout: float = 10.0
    timeout: float = 30.0  # one next hop, start to QUIT
    cache_ttl: float = 3600.0
    negative_ttl: float = 300.0
    concurrency: int = 20
    dane: bool = False  # the resolver validates DNSSEC: TLSA records are believed
    mta_sts: bool = True

    @classmethod
    def from_config(cls, config: Config, helo_name: str) -> ProbeSettings:
        pc = config.probe
        return cls(
            helo_name,
            config.tls.ca_file,
            pc.connect_timeout,
            pc.timeout,
            pc.cache_ttl,
            pc.negative_ttl,
            pc.concurrency,
            dane=config.dns.dnssec == "trust-ad",
            mta_sts=config.mta_sts.enabled,
        )


class Prober:
    def __init__(
        self,
        router: Router,
        resolver: Resolver,
        settings: ProbeSettings,
        sts: StsCache | None = None,
        keys: KeyStore | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.router = router
        self.resolver = resolver
        self.settings = settings
        self.sts = sts
        self.keys: KeyStore = keys or NoKeys()
        self.metrics = metrics
        self.clock = clock
        self._domains: dict[str, tuple[float, DomainFacts]] = {}
        self._hops: dict[tuple[str, int, bool], tuple[float, MxFacts]] = {}
        self._inflight: dict[str, asyncio.Future[DomainFacts]] = {}
        self._connections = asyncio.Semaphore(settings.concurrency)
        self._counters: dict[str, Any] = {}

    # -- the cache ---------------------------------------------------------------------

    async def recipient(self, address: str) -> RecipientFacts:
        domain = address.rpartition("@")[2].lower()
        facts = await self.domain(domain)
        try:
            async with asyncio.timeout(self.settings.timeout):
                keys = await self.keys.lookup(address)
        except Exception as e:  # noqa: BLE001 - a failing key store means "no key known"
            keys = KnownKeys(error=f"{type(e).__name__}: {str(e)[:200]}")
        return RecipientFacts(address, facts, keys)

    def cached(self, domain: str) -> DomainFacts | None:
        entry = self._domains.get(domain.lower().rstrip("."))
        if entry is not None and entry[0] > self.clock():
            return entry[1]
        return None

    async def domain(self, domain: str) -> DomainFacts:
        domain = domain.lower().rstrip(".")
        facts = self.cached(domain)
        if facts is not None:
            self._count("hit")
            return facts
        pending = self._inflight.get(domain)
        if pending is not None:  # another attempt probes it now: share its result
            self._count("shared")
            return await asyncio.shield(pending)
        self._count("miss")
        future: asyncio.Future[DomainFacts] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = future
        started = time.monotonic()
        try:
            facts = await self._probe_domain(domain)
        except asyncio.CancelledError:
            future.cancel()  # those waiting ask again (or are shutting down too)
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            del self._inflight[domain]
        if self.metrics is not None:
            self.metrics.probe_seconds.observe(time.monotonic() - started)
        ttl = self.settings.cache_ttl if facts.settled else self.settings.negative_ttl
        self._domains[domain] = (self.clock() + ttl, facts)
        future.set_result(facts)
        return facts

    def forget(self, domain: str) -> None:
        """Drop what is known about ``domain`` and its servers: the next use probes
        again (delivery could not reach the level the facts promised)."""
        entry = self._domains.pop(domain.lower().rstrip("."), None)
        if entry is not None:
            for mx in entry[1].mx:
                for secure in (False, True):
                    self._hops.pop((mx.host, mx.port, secure), None)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            counter = self._counters.get(result)
            if counter is None:
                counter = self._counters[result] = self.metrics.probe_cache.labels(result)
            counter.inc()

    # -- probing ---------------------------------------------------------------------

    async def _probe_domain(self, domain: str) -> DomainFacts:
        now = self.clock()
        routed = await self.router.route(domain)
        if isinstance(routed, RouteFailure):
            return DomainFacts(
                domain,
                now,
                via="error",
                route_error=f"{routed.status} {routed.reason}",
                route_permanent=routed.permanent,
            )
        via = routed.hops[0].via
        sts_mode, sts_id, sts_source = "none", "", ""
        policy = None
        if self.settings.mta_sts and self.sts is not None and via in ("mx", "implicit-mx"):
            result = await self.sts.policy(domain)
            if result.policy is not None:
                policy = result.policy
                sts_mode, sts_id, sts_source = policy.mode.value, result.policy_id, result.source
            if self.metrics is not None:
                self.metrics.probe_mta_sts.labels(sts_mode).inc()
        secure_mx = self.settings.dane and routed.mx_secure and via == "mx"

        async def hop_facts(hop: NextHop) -> MxFacts:
            if policy is None or policy.mode is StsMode.NONE:
                return await self._hop(hop, secure_mx)
            if not policy.matches(hop.host) and policy.mode is StsMode.ENFORCE:
                # never used for this domain: no connection (RFC 8461 §4.2)
                why = "not an MX host of the domain's MTA-STS policy"
                return MxFacts(hop.host, hop.port, now, sts_match=False, error=why)
            facts = await self._hop(hop, secure_mx)
            return dataclasses.replace(facts, sts_match=policy.matches(hop.host))

        hops = await asyncio.gather(*(hop_facts(hop) for hop in routed.hops))
        return DomainFacts(
            domain,
            now,
            via=via,
            mx_secure=routed.mx_secure,
            mta_sts=sts_mode,
            mta_sts_id=sts_id,
            mta_sts_source=str(sts_source),
            mx=tuple(hops),
        )

    async def _hop(self, hop: NextHop, secure_mx: bool) -> MxFacts:
        key = (hop.host, hop.port, secure_mx)
        entry = self._hops.get(key)
        if entry is not None and entry[0] > self.clock():
            return entry[1]
        try:
            facts = await asyncio.wait_for(self._probe_hop(hop, secure_mx), self.settings.timeout)
        except TimeoutError:
            facts = MxFacts(hop.host, hop.port, self.clock(), error="probe timed out")
        settled = facts.reachable and facts.tlsa is not TlsaState.ERROR
        ttl = self.settings.cache_ttl if settled else self.settings.negative_ttl
        self._hops[key] = (self.clock() + ttl, facts)
        if self.metrics is not None:
            self.metrics.probe_dane.labels(_dane_outcome(facts)).inc()
        return facts

    async def _probe_hop(self, hop: NextHop, secure_mx: bool) -> MxFacts:
        observed = self.clock()
        tlsa_state = TlsaState.NOT_APPLICABLE
        records: tuple[Tlsa, ...] = ()
        if secure_mx:
            found = await lookup_tlsa(self.resolver, hop.host, hop.port)
            tlsa_state = TlsaState(found.status.value)
            records = found.records if found.status is TlsaStatus.USABLE else ()
        facts = MxFacts(hop.host, hop.port, observed, tlsa=tlsa_state)
        addresses = await addresses_of(hop, self.resolver)
        if not isinstance(addresses, list):
            return dataclasses.replace(facts, error=addresses.reason)
        errors = []
        for ip in addresses:
            async with self._connections:
                seen = await self._connect(hop, ip, verify=True)
                if isinstance(seen, _Seen) and seen.retry_unverified:
                    again = await self._connect(hop, ip, verify=False)
                    if isinstance(again, _Seen):
                        seen = dataclasses.replace(
                            again, pkix_valid=False, pkix_error=seen.pkix_error
                        )
            if isinstance(seen, str):
                errors.append(seen)
                continue
            facts = dataclasses.replace(
                facts,
                reachable=True,
                ip=ip,
                starttls=seen.starttls,
                tls_version=seen.tls_version,
                tls_cipher=seen.tls_cipher,
                pkix_valid=seen.pkix_valid,
                pkix_error=seen.pkix_error,
                cert_sha256=seen.cert_sha256,
                cert_not_after=seen.cert_not_after,
            )
            if records:
                matched = (
                    bool(seen.chain) and verify_tlsa(records, seen.chain, hop.host) is not None
                )
                facts = dataclasses.replace(facts, dane_match=matched)
            return facts
        return dataclasses.replace(facts, error="; ".join(errors)[:500])

    async def _connect(self, hop: NextHop, ip: str, verify: bool) -> _Seen | str:
        """One probe connection: what it saw, or why it got nowhere."""
        try:
            smtp = await connect(
                ip, hop.port, self.settings.helo_name, self.settings.connect_timeout
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            return f"{hop.host}[{ip}]:{hop.port}: {failure_text(e)}"
        try:
            return await self._session(smtp, hop, verify)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            return f"{hop.host}[{ip}]:{hop.port}: {failure_text(e)}"
        finally:
            smtp.close()

    async def _session(self, smtp: aiosmtplib.SMTP, hop: NextHop, verify: bool) -> _Seen:
        await smtp.ehlo()
        if not smtp.supports_extension("starttls"):
            await quit_session(smtp)
            return _Seen(starttls=False)
        level = TlsLevel.VERIFY if verify else TlsLevel.ENCRYPT
        try:
            await smtp.starttls(
                server_hostname=hop.host, tls_context=tls_context(level, self.settings.ca_file)
            )
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
            failure = tls_failure_of(e)
            if verify and failure.value.startswith("certificate"):
                return _Seen(
                    True, retry_unverified=True, pkix_valid=False, pkix_error=failure.value
                )
            return _Seen(True, pkix_valid=False, pkix_error=failure.value)
        sslobj = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
        if sslobj is None:
            return _Seen(True, pkix_valid=False, pkix_error="handshake_failed")
        der = sslobj.getpeercert(binary_form=True)
        cipher = sslobj.cipher()
        await quit_session(smtp)
        return _Seen(
            True,
            tls_version=sslobj.version(),
            tls_cipher=cipher[0] if cipher else None,
            pkix_valid=True if verify else None,
            cert_sha256=hashlib.sha256(der).hexdigest() if der else None,
            cert_not_after=_not_after(der),
            chain=presented_chain(sslobj, der),
        )


@dataclass(frozen=True)
class _Seen:
    """What one probe connection observed."""

    starttls: bool
    tls_version: str | None = None
    tls_cipher: str | None = None
    pkix_valid: bool | None = None
    pkix_error: str = ""
    cert_sha256: str | None = None
    cert_not_after: str | None = None
    chain: list[bytes] = dataclasses.field(default_factory=list)
    retry_unverified: bool = False  # only the certificate check failed: look again


def _not_after(der: bytes | None) -> str | None:
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return cert.not_valid_after_utc.astimezone(datetime.UTC).isoformat()


def _dane_outcome(facts: MxFacts) -> str:
    if facts.tlsa is TlsaState.USABLE and facts.reachable:
        return "match" if facts.dane_match else "mismatch"
    return facts.tlsa.value
