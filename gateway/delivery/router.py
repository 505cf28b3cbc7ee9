"""router - where a recipient domain's mail goes.

Order (RFC 5321 section 5.1, RFC 7505):

1. a static route for the domain (``routes``), then the smart host
   (``delivery.smart_host``): the host is used as given, no MX lookup;
2. else the domain's MX records, lowest preference first, random order among equal
   preferences, at most ``delivery.max_mx_hosts`` hosts per attempt;
3. no MX records (NODATA): the domain itself is the implicit MX if it has an A or
   AAAA record;
4. a null MX (a single "0 ." record) or a domain that does not exist: permanent
   failure (5.1.10, 5.1.2); a DNS error: temporary failure (4.4.3), never a guess.

Host names are resolved to addresses when connecting, not here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import dns.name
import dns.rdtypes.ANY.MX

from gateway.config import HostPort
from gateway.probe.dns import LookupStatus, Resolver


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int
    preference: int = 0
    via: str = "mx"  # "route", "smart-host", "mx" or "implicit-mx"


@dataclass(frozen=True)
class Routed:
    hops: tuple[NextHop, ...]
    mx_secure: bool = False  # the MX answer was DNSSEC-validated (AD bit)


@dataclass(frozen=True)
class RouteFailure:
    permanent: bool
    status: str  # RFC 3463 enhanced status code
    reason: str


class Router:
    def __init__(
        self,
        resolver: Resolver,
        port: int = 25,
        routes: Mapping[str, HostPort] | None = None,
        smart_host: HostPort | None = None,
        max_mx_hosts: int = 5,
        rng: random.Random | None = None,
    ):
        self.resolver = resolver
        self.port = port
        self.routes = {d.lower().rstrip("."): hp for d, hp in (routes or {}).items()}
        self.smart_host = smart_host
        self.max_mx_hosts = max_mx_hosts
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security

    async def route(self, domain: str) -> Routed | RouteFailure:
        domain = domain.lower().rstrip(".")
        static = self.routes.get(domain)
        if static is not None:
            return Routed((NextHop(static.host, static.port or self.port, via="route"),))
        if self.smart_host is not None:
            port = self.smart_host.port or self.port  # port 0: delivery.port
            return Routed((NextHop(self.smart_host.host, port, via="smart-host"),))
        mx = await self.resolver.lookup(domain, "MX")
        if mx.status is LookupStatus.NXDOMAIN:
            return RouteFailure(True, "5.1.2", f"domain {domain} does not exist")
        if mx.status is LookupStatus.ERROR:
            return RouteFailure(False, "4.4.3", f"MX lookup for {domain} failed ({mx.error})")
        if mx.status is LookupStatus.NODATA:
            return await self._implicit_mx(domain)
        records = [r for r in mx.records if isinstance(r, dns.rdtypes.ANY.MX.MX)]
        if any(r.exchange == dns.name.root for r in records):
            # RFC 7505: a null MX says the domain accepts no mail at all.
            return RouteFailure(True, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        return Routed(self._order(records), mx_secure=mx.secure)

    def _order(self, records: list[dns.rdtypes.ANY.MX.MX]) -> tuple[NextHop, ...]:
        shuffled = list(records)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda r: r.preference)  # stable: random among equals
        hops: list[NextHop] = []
        seen: set[str] = set()
        for r in shuffled:
            host = r.exchange.to_text(omit_final_dot=True).lower()
            if host not in seen:
                seen.add(host)
                hops.append(NextHop(host, self.port, r.preference))
        return tuple(hops[: self.max_mx_hosts])

    async def _implicit_mx(self, domain: str) -> Routed | RouteFailure:
        for rdtype in ("A", "AAAA"):
            found = await self.resolver.lookup(domain, rdtype)
            if found.status is LookupStatus.OK:
                return Routed((NextHop(domain, self.port, via="implicit-mx"),))
            if found.status is LookupStatus.ERROR:
                return RouteFailure(False, "4.4.3", f"address lookup for {domain} failed")
        return RouteFailure(True, "5.1.2", f"domain {domain} has no MX and no address")
