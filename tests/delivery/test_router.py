"""Routing a recipient domain: static routes, smart host, MX order, implicit MX, null MX."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.config import HostPort, parse_nameserver
from gateway.delivery.router import Routed, RouteFailure, Router
from gateway.probe.dns import Resolver
from tests.support.dns import DnsFixture


@pytest.fixture
async def dns_server():
    server = await DnsFixture().start()
    yield server
    await server.stop()


def router(server: DnsFixture, **kwargs) -> Router:
    resolver = Resolver((parse_nameserver(server.nameserver),), timeout=2)
    return Router(resolver, port=2525, **kwargs)


async def test_mx_hosts_come_lowest_preference_first_on_the_delivery_port(dns_server):
    dns_server.add("clinic.test", "MX", "20 backup.clinic.test.")
    dns_server.add("clinic.test", "MX", "10 mx.clinic.test.")
    result = await router(dns_server).route("Clinic.Test.")
    assert isinstance(result, Routed)
    assert [(h.host, h.port, h.preference) for h in result.hops] == [
        ("mx.clinic.test", 2525, 10),
        ("backup.clinic.test", 2525, 20),
    ]


async def test_equal_preferences_are_tried_in_random_order(dns_server):
    for name in ("a", "b", "c"):
        dns_server.add("spread.test", "MX", f"10 {name}.spread.test.")
    r = router(dns_server, rng=random.Random(1))
    firsts = Counter()
    for _ in range(30):
        result = await r.route("spread.test")
        assert isinstance(result, Routed)
        assert sorted(h.host for h in result.hops) == [
            "a.spread.test",
            "b.spread.test",
            "c.spread.test",
        ]
        firsts[result.hops[0].host] += 1
    assert len(firsts) == 3  # each host comes first sometimes


async def test_only_max_mx_hosts_are_tried_per_attempt(dns_server):
    for i in range(8):
        dns_server.add("many.test", "MX", f"{i} mx{i}.many.test.")
    result = await router(dns_server, max_mx_hosts=3).route("many.test")
    assert isinstance(result, Routed)
    assert [h.host for h in result.hops] == ["mx0.many.test", "mx1.many.test", "mx2.many.test"]


async def test_a_domain_without_mx_uses_its_address_as_implicit_mx(dns_server):
    dns_server.add("small.test", "A", "127.0.0.9")
    result = await router(dns_server).route("small.test")
    assert isinstance(result, Routed)
    assert [(h.host, h.via) for h in result.hops] == [("small.test", "implicit-mx")]


async def test_null_mx_is_a_permanent_failure(dns_server):
    dns_server.add("nomail.test", "MX", "0 .")
    result = await router(dns_server).route("nomail.test")
    assert result == RouteFailure(True, "5.1.10", "domain nomail.test accepts no mail (null MX)")


async def test_a_domain_that_does_not_exist_is_a_permanent_failure(dns_server):
    result = await router(dns_server).route("typo.test")
    assert isinstance(result, RouteFailure) and result.permanent and result.status == "5.1.2"


async def test_a_dns_failure_is_temporary_never_a_guess(dns_server):
    dns_server.fail("flaky.test")
    result = await router(dns_server).route("flaky.test")
    assert isinstance(result, RouteFailure)
    assert not result.permanent and result.status == "4.4.3"


async def test_static_routes_and_the_smart_host_skip_mx_lookup(dns_server):
    dns_server.add("partner.test", "MX", "10 mx.partner.test.")
    r = router(
        dns_server,
        routes={"partner.test": HostPort("127.0.0.7", 2526)},
        smart_host=HostPort("relay.internal", 587),
    )
    routed = await r.route("partner.test")
    assert isinstance(routed, Routed)
    assert [(h.host, h.port, h.via) for h in routed.hops] == [("127.0.0.7", 2526, "route")]
    other = await r.route("anywhere.test")
    assert isinstance(other, Routed)
    assert [(h.host, h.port, h.via) for h in other.hops] == [("relay.internal", 587, "smart-host")]
    assert ("partner.test.", "MX") not in dns_server.queries
