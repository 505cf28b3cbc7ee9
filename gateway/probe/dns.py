"""DNS lookups with typed outcomes, through the configured resolvers.

Every lookup returns a `Lookup`: the records, and a `status` that keeps apart what
callers must treat differently:

- ``ok``: records found;
- ``nodata``: the name exists without records of that type;
- ``nxdomain``: the name does not exist;
- ``error``: SERVFAIL, refused, timeout or a malformed answer.  Temporary: never read
  as "no records" (a TLSA or MX lookup error must not downgrade security).

``secure`` is the AD bit of the answer, trusted only because ``dns.nameservers`` is
the administrator's validating resolver (RFC 7672 section 2.2; issue 4 uses it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdata
import dns.resolver

from gateway.config import NameServer


class LookupStatus(enum.Enum):
    OK = "ok"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    ERROR = "error"


@dataclass(frozen=True)
class Lookup:
    name: str
    rdtype: str
    status: LookupStatus
    records: tuple[dns.rdata.Rdata, ...] = ()
    secure: bool = False
    error: str = ""
    ttl: int = 0  # of the answer's records

    @property
    def texts(self) -> list[str]:
        """TXT records, each one's strings joined without spaces (RFC 7208 3.3,
        RFC 8461 3.1), undecodable bytes replaced."""
        return [
            b"".join(r.strings).decode("ascii", "replace")  # type: ignore[attr-defined]
            for r in self.records
        ]


class Resolver:
    def __init__(self, nameservers: tuple[NameServer, ...] = (), timeout: float = 5.0):
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [ns.host for ns in nameservers]
            r.nameserver_ports = {ns.host: ns.port for ns in nameservers}
        else:
            r = dns.asyncresolver.Resolver()
        r.lifetime = timeout
        r.timeout = min(timeout, 2.0)
        r.use_edns(0, dns.flags.DO, 1232)
        r.flags = dns.flags.RD | dns.flags.AD
        self._resolver = r

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Lookup(name, rdtype, LookupStatus.NXDOMAIN)
        except (
            dns.resolver.NoNameservers,
            dns.exception.Timeout,
            dns.resolver.LifetimeTimeout,
            dns.exception.DNSException,
        ) as e:
            return Lookup(name, rdtype, LookupStatus.ERROR, error=type(e).__name__)
        secure = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            return Lookup(name, rdtype, LookupStatus.NODATA, secure=secure)
        return Lookup(
            name, rdtype, LookupStatus.OK, tuple(answer.rrset), secure, ttl=answer.rrset.ttl
        )
