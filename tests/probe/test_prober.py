"""The prober against real servers on loopback: recipient MTAs with and without
STARTTLS and with good, self-signed, expired and wrong-name certificates (test CA),
the DNS fixture (MX, TLSA with and without the AD bit, SERVFAIL, silence) and an
HTTPS server for MTA-STS."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
import time

import pytest

from gateway.delivery.router import Router
from gateway.delivery.tls_policy import TlsLevel
from gateway.observability.metrics import Metrics
from gateway.probe.dns import Resolver
from gateway.probe.facts import TlsaState, level_of
from gateway.probe.mta_sts import StsCache
from gateway.probe.prober import Prober, ProbeSettings
from tests.conftest import free_port, leaf_files
from tests.support.https import PolicyServer


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_prober(world, pki):
    made = []

    def make(dane: bool = True, sts_port: int = 443, resolver=None, **kwargs):
        resolver = resolver or world.resolver
        clock = Clock()
        settings = ProbeSettings(
            "gw.sealgate.test", pki.ca_file, connect_timeout=3, timeout=10, dane=dane, **kwargs
        )
        sts = StsCache(resolver, port=sts_port, ca_file=pki.ca_file, timeout=5)
        metrics = Metrics()
        prober = Prober(
            Router(resolver, world.port), resolver, settings, sts, metrics=metrics, clock=clock
        )
        prober.clock_ = clock
        made.append(prober)
        return prober

    return make


def mx(world, *hosts: str) -> None:
    for i, host in enumerate(hosts):
        world.dns.add("dest.test", "MX", f"{10 * (i + 1)} {host}.")


def sample(prober, name: str) -> float:
    return prober.metrics.registry.get_sample_value(name.split("{")[0], _labels(name)) or 0.0


def _labels(name: str) -> dict:
    if "{" not in name:
        return {}
    inner = name.split("{", 1)[1].rstrip("}")
    return dict(part.split("=") for part in inner.replace('"', "").split(","))


async def test_a_verified_server_is_observed_in_full_and_then_served_from_the_cache(
    world, make_prober
):
    server = await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    prober = make_prober()
    facts = await prober.domain("Dest.Test")
    (hop,) = facts.mx
    assert (facts.domain, facts.via, facts.mta_sts) == ("dest.test", "mx", "none")
    assert hop.reachable and hop.ip == "127.0.0.81" and hop.starttls
    assert hop.tls_version == "TLSv1.3" and hop.tls_cipher
    assert hop.pkix_valid is True and hop.pkix_error == ""
    assert hop.cert_sha256 == hashlib.sha256(server.cert_der).hexdigest()
    assert datetime.datetime.fromisoformat(hop.cert_not_after) > datetime.datetime.now(datetime.UTC)
    assert hop.tlsa is TlsaState.NOT_APPLICABLE  # the MX answer was not secure
    assert level_of(hop, facts) is TlsLevel.VERIFY
    assert server.connections == 1 and server.received == []
    assert await prober.domain("dest.test") is facts
    assert server.connections == 1
    assert sample(prober, 'sealgate_probe_cache_total{result="hit"}') == 1
    assert sample(prober, 'sealgate_probe_cache_total{result="miss"}') == 1
    assert sample(prober, "sealgate_probe_seconds_count") == 1


@pytest.mark.parametrize(
    ("cert", "error", "level"),
    [
        ("self-signed", "certificate_untrusted", TlsLevel.ENCRYPT),
        ("expired", "certificate_expired", TlsLevel.ENCRYPT),
        ("wrong-name", "certificate_name_mismatch", TlsLevel.ENCRYPT),
        (None, "", TlsLevel.MAY),
    ],
)
async def test_what_is_wrong_with_a_server_is_a_fact(world, make_prober, cert, error, level):
    server = await world.mta("mx1.dest.test", "127.0.0.81", cert=cert)
    mx(world, "mx1.dest.test")
    facts = await make_prober().domain("dest.test")
    (hop,) = facts.mx
    assert hop.starttls is (cert is not None)
    assert hop.pkix_valid is (False if cert else None) and hop.pkix_error == error
    if cert:  # a second, unverified connection learned the rest
        assert hop.tls_version == "TLSv1.3" and hop.cert_sha256
        assert server.connections == 2
    assert level_of(hop, facts) is level


async def test_an_unreachable_server_is_unknown_and_cached_briefly(world, make_prober):
    world.dns.add("mx1.dest.test", "A", "127.0.0.81")  # nothing listens there
    mx(world, "mx1.dest.test")
    prober = make_prober(cache_ttl=3600, negative_ttl=60)
    facts = await prober.domain("dest.test")
    assert not facts.known and not facts.mx[0].reachable and facts.mx[0].error
    server = await world.mta("mx1.dest.test", "127.0.0.81")
    prober.clock_.now += 30
    assert await prober.domain("dest.test") is facts  # still the negative entry
    prober.clock_.now += 31
    again = await prober.domain("dest.test")
    assert again.known and again.mx[0].pkix_valid and server.connections == 1


async def test_known_facts_live_for_the_cache_ttl_and_forget_drops_them(world, make_prober):
    server = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    mx(world, "mx1.dest.test")
    prober = make_prober(cache_ttl=100, negative_ttl=10)
    await prober.domain("dest.test")
    prober.clock_.now += 99
    await prober.domain("dest.test")
    assert server.connections == 1
    prober.clock_.now += 2
    await prober.domain("dest.test")
    assert server.connections == 2
    prober.forget("dest.test")
    await prober.domain("dest.test")
    assert server.connections == 3


async def test_concurrent_questions_share_one_probe(world, make_prober):
    server = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    mx(world, "mx1.dest.test")
    prober = make_prober()
    results = await asyncio.gather(*(prober.domain("dest.test") for _ in range(10)))
    assert all(r is results[0] for r in results)
    assert server.connections == 1
    assert sample(prober, 'sealgate_probe_cache_total{result="shared"}') == 9


def publish(world, host: str, record: str, secure: bool = True) -> None:
    name = f"_{world.port}._tcp.{host}"
    world.dns.add(name, "TLSA", record)
    if secure:
        world.dns.secure(name)


@pytest.mark.parametrize(
    ("record", "secure", "state", "match", "level", "outcome"),
    [
        ("3 0 1 {leaf}", True, TlsaState.USABLE, True, TlsLevel.DANE, "match"),
        ("3 1 1 " + "00" * 32, True, TlsaState.USABLE, False, None, "mismatch"),
        ("1 1 1 " + "00" * 32, True, TlsaState.UNUSABLE, None, TlsLevel.VERIFY, "unusable"),
        ("3 0 1 {leaf}", False, TlsaState.NONE, None, TlsLevel.VERIFY, "none"),
        ("servfail", True, TlsaState.ERROR, None, None, "error"),
    ],
)
async def test_dane_facts(world, make_prober, record, secure, state, match, level, outcome):
    server = await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    world.dns.secure("dest.test")
    if record == "servfail":
        world.dns.fail(f"_{world.port}._tcp.mx1.dest.test")
    else:
        leaf = hashlib.sha256(server.cert_der).hexdigest()
        publish(world, "mx1.dest.test", record.format(leaf=leaf), secure)
    prober = make_prober()
    facts = await prober.domain("dest.test")
    (hop,) = facts.mx
    assert facts.mx_secure
    assert (hop.tlsa, hop.dane_match) == (state, match)
    assert level_of(hop, facts) is level
    assert sample(prober, f'sealgate_probe_dane_total{{outcome="{outcome}"}}') == 1


async def test_dane_is_not_looked_up_without_a_validating_resolver(world, make_prober):
    await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    world.dns.secure("dest.test")
    publish(world, "mx1.dest.test", "3 1 1 " + "00" * 32)
    facts = await make_prober(dane=False).domain("dest.test")
    assert facts.mx[0].tlsa is TlsaState.NOT_APPLICABLE
    assert not any("TLSA" in q[1] for q in world.dns.queries)


@pytest.fixture
async def sts_server(world, pki, tmp_path):
    servers = []

    async def start(body: str) -> PolicyServer:
        leaf = pki.ca.issue_cert("mta-sts.dest.test")
        chain, key = leaf_files(leaf, tmp_path, "sts")
        world.dns.add("mta-sts.dest.test", "A", "127.0.0.79")
        world.dns.add("_mta-sts.dest.test", "TXT", '"v=STSv1; id=one"')
        server = await PolicyServer("127.0.0.79", free_port(), (chain, key), body=body).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.stop()


@pytest.mark.parametrize(
    ("mode", "pattern", "sts_match", "level"),
    [
        ("enforce", "mx1.dest.test", True, TlsLevel.MTA_STS),
        ("enforce", "*.dest.test", True, TlsLevel.MTA_STS),
        ("enforce", "*.other.test", False, None),
        ("testing", "*.other.test", False, TlsLevel.VERIFY),
    ],
)
async def test_mta_sts_facts(world, make_prober, sts_server, mode, pattern, sts_match, level):
    await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    server = await sts_server(f"version: STSv1\nmode: {mode}\nmx: {pattern}\nmax_age: 86400\n")
    prober = make_prober(sts_port=server.port)
    facts = await prober.domain("dest.test")
    assert (facts.mta_sts, facts.mta_sts_id, facts.mta_sts_source) == (mode, "one", "fetched")
    assert facts.mx[0].sts_match is sts_match
    assert level_of(facts.mx[0], facts) is level
    assert sample(prober, f'sealgate_probe_mta_sts_total{{mode="{mode}"}}') == 1


async def test_a_domain_whose_dns_never_answers_delays_only_itself(world, make_prober, pki):
    from gateway.config import parse_nameserver

    await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    world.dns.silence("dead.test")
    resolver = Resolver((parse_nameserver(world.dns.nameserver),), timeout=2)
    prober = make_prober(resolver=resolver)

    async def timed(domain):
        started = time.monotonic()
        facts = await prober.domain(domain)
        return facts, time.monotonic() - started

    (dead, dead_time), (good, good_time) = await asyncio.gather(
        timed("dead.test"), timed("dest.test")
    )
    assert good.known and good_time < 1.0
    assert dead.via == "error" and "4.4.3" in dead.route_error and dead_time >= 1.9


async def test_mta_sts_fetch_failure_keeps_the_cached_policy_in_the_facts(
    world, make_prober, sts_server
):
    await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    server = await sts_server("version: STSv1\nmode: enforce\nmx: mx1.dest.test\nmax_age: 86400\n")
    prober = make_prober(sts_port=server.port)
    assert (await prober.domain("dest.test")).mta_sts == "enforce"
    # the id changes and the new policy cannot be fetched (or the record vanishes):
    # the cached enforce policy still applies
    world.dns.records.pop(
        next(k for k in world.dns.records if k[0].to_text() == "_mta-sts.dest.test.")
    )
    world.dns.add("_mta-sts.dest.test", "TXT", '"v=STSv1; id=two"')
    server.status = 500
    prober.forget("dest.test")
    facts = await prober.domain("dest.test")
    assert (facts.mta_sts, facts.mta_sts_id, facts.mta_sts_source) == (
        "enforce",
        "one",
        "cached-fallback",
    )
    assert level_of(facts.mx[0], facts) is TlsLevel.MTA_STS


async def test_a_malformed_mta_sts_policy_gives_no_policy_fact(world, make_prober, sts_server):
    await world.mta("mx1.dest.test", "127.0.0.81")
    mx(world, "mx1.dest.test")
    server = await sts_server("version: STSv1\nmode: enforce\nmax_age: 86400\n")  # no mx
    facts = await make_prober(sts_port=server.port).domain("dest.test")
    assert (facts.mta_sts, facts.mx[0].sts_match) == ("none", None)
    assert level_of(facts.mx[0], facts) is TlsLevel.VERIFY


async def test_dane_ta_matches_a_ca_the_server_presents(world, make_prober, tmp_path):
    import trustme

    from tests.support.mta import RecipientMta

    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mx1.dest.test")
    chain, key = leaf_files(leaf, tmp_path, "ta")  # leaf + intermediate
    world.dns.add("mx1.dest.test", "A", "127.0.0.81")
    server = await RecipientMta("127.0.0.81", world.port, (chain, key)).start()
    try:
        mx(world, "mx1.dest.test")
        world.dns.secure("dest.test")
        ta = ssl.PEM_cert_to_DER_cert(intermediate.cert_pem.bytes().decode())
        publish(world, "mx1.dest.test", f"2 0 1 {hashlib.sha256(ta).hexdigest()}")
        facts = await make_prober().domain("dest.test")
        (hop,) = facts.mx
        assert (hop.tlsa, hop.dane_match, hop.pkix_valid) == (TlsaState.USABLE, True, False)
        assert level_of(hop, facts) is TlsLevel.DANE
    finally:
        await server.stop()


async def test_a_failing_key_store_means_no_key_never_an_error_that_stops_the_decision(
    world, make_prober
):
    await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    mx(world, "mx1.dest.test")

    class Broken:
        async def lookup(self, address):
            raise RuntimeError("directory unreachable")

    prober = make_prober()
    prober.keys = Broken()
    facts = await prober.recipient("bob@dest.test")
    assert facts.keys.smime is None and facts.keys.pgp is None
    assert facts.keys.error == "RuntimeError: directory unreachable"
    assert facts.domain.known
