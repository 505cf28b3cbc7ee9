"""DNS lookups keep "no records" and "lookup failed" apart, through the configured
resolver (the fixture on loopback)."""

from __future__ import annotations

import pytest

from gateway.config import parse_nameserver
from gateway.probe.dns import LookupStatus, Resolver
from tests.support.dns import DnsFixture


@pytest.fixture
async def dns_server():
    server = await DnsFixture().start()
    yield server
    await server.stop()


def resolver_for(server: DnsFixture) -> Resolver:
    return Resolver((parse_nameserver(server.nameserver),), timeout=2)


async def test_lookup_outcomes_are_typed(dns_server):
    dns_server.add("clinic.test", "A", "127.0.0.5")
    dns_server.add("signed.test", "A", "127.0.0.6")
    dns_server.secure("signed.test")
    dns_server.fail("broken.test")
    r = resolver_for(dns_server)
    ok = await r.lookup("clinic.test", "A")
    assert ok.status is LookupStatus.OK and ok.records[0].to_text() == "127.0.0.5"
    assert not ok.secure
    assert (await r.lookup("clinic.test", "MX")).status is LookupStatus.NODATA
    assert (await r.lookup("nowhere.test", "A")).status is LookupStatus.NXDOMAIN
    assert (await r.lookup("broken.test", "A")).status is LookupStatus.ERROR
    assert (await r.lookup("signed.test", "A")).secure


async def test_a_large_answer_is_fetched_over_tcp(dns_server):
    for i in range(60):
        dns_server.add("big.test", "TXT", f'"{"x" * 40} {i}"')
    found = await resolver_for(dns_server).lookup("big.test", "TXT")
    assert found.status is LookupStatus.OK
    assert len(found.records) == 60


async def test_an_unreachable_resolver_is_an_error_not_an_empty_answer():
    from tests.conftest import free_port

    dead = Resolver((parse_nameserver(f"127.0.0.1:{free_port()}"),), timeout=1)
    result = await dead.lookup("clinic.test", "MX")
    assert result.status is LookupStatus.ERROR
