"""MTA-STS (RFC 8461): record and policy parsing, MX matching, fetching over HTTPS
with a test CA, and the cache's rules when the live policy cannot be had."""

from __future__ import annotations

import pytest
import trustme

from gateway.config import parse_nameserver
from gateway.probe.dns import Resolver
from gateway.probe.mta_sts import (
    JsonStsStore,
    StsCache,
    StsError,
    StsMode,
    StsPolicy,
    StsSource,
    parse_policy,
    parse_record,
)
from tests.conftest import free_port, leaf_files
from tests.support.dns import DnsFixture
from tests.support.https import PolicyServer

ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx1.good.test\r\nmx: *.b.good.test\r\nmax_age: 86400\r\n"

FETCH, INVALID = "sts-policy-fetch-error", "sts-policy-invalid"

# -- parsing (vectors after RFC 8461 §3.1, §3.2 and the postfix-mta-sts-resolver cases) --


@pytest.mark.parametrize(
    ("txt", "record_id"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1; id=abc; ext=whatever", "abc"),
    ],
)
def test_a_valid_record_gives_its_id(txt, record_id):
    assert parse_record(txt) == record_id


@pytest.mark.parametrize(
    "txt",
    [
        "id=abc; v=STSv1;",  # the version must come first
        "v=STSv12; id=abc",
        "v=STSv1;",  # no id
        "v=STSv1; id=" + "a" * 33,  # id too long
        "v=STSv1; id=ab-c",  # letters and digits only
        "v=STSv1; garbage",
    ],
)
def test_a_malformed_record_is_refused(txt):
    with pytest.raises(StsError):
        parse_record(txt)


def test_a_policy_parses_with_crlf_or_lf_and_ignores_unknown_keys():
    policy = parse_policy(ENFORCE.replace("\r\n", "\n") + "extension: yes\n")
    assert policy == StsPolicy(StsMode.ENFORCE, 86400, ("mx1.good.test", "*.b.good.test"))
    assert parse_policy(ENFORCE) == policy


def test_mode_none_needs_no_mx():
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("garbage", "not 'key: value'"),
        ("version: STSv1\nmode: enforce\nmax_age: 100\n", "needs at least one mx"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: xxx\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmx: a.test\nmax_age: 100\n", "mode"),
        ("version: STSv1\nmode: doubt\nmx: a.test\nmax_age: 100\n", "mode 'doubt'"),
        ("mode: enforce\nmx: a.test\nmax_age: 100\n", "version"),
        ("version: STSv1\nmode: enforce\nmx: bücher.test\nmax_age: 1\n", "A-labels only"),
    ],
)
def test_a_malformed_policy_is_refused_with_the_reason(text, reason):
    with pytest.raises(StsError, match=reason):
        parse_policy(text)


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("a.example", True),
        ("A.Example.", True),
        ("sub.b.example", True),
        ("b.example", False),  # the wildcard needs one label
        ("sub.sub.b.example", False),  # and only one
        ("other", False),
    ],
)
def test_mx_matching_follows_rfc_8461_section_4_1(host, matches):
    policy = StsPolicy(StsMode.ENFORCE, 1, ("a.example", "*.b.example"))
    assert policy.matches(host) is matches


# -- discovery, fetching and the cache, against DNS and HTTPS on loopback ---------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sts(tmp_path, pki):
    dns = await DnsFixture().start()
    port = free_port()
    servers: list[PolicyServer] = []

    async def serve(
        domain: str, ip: str, body: str = ENFORCE, cert_for: str | None = None, ca=None
    ):
        leaf = (ca or pki.ca).issue_cert(cert_for or f"mta-sts.{domain}")
        chain, key = leaf_files(leaf, tmp_path, domain)
        dns.add(f"mta-sts.{domain}", "A", ip)
        server = await PolicyServer(ip, port, (chain, key), body=body).start()
        servers.append(server)
        return server

    clock = Clock()
    resolver = Resolver((parse_nameserver(dns.nameserver),), timeout=2)
    cache = StsCache(resolver, port=port, ca_file=pki.ca_file, timeout=3, clock=clock)

    class World:
        pass

    w = World()
    w.dns, w.serve, w.cache, w.clock = dns, serve, cache, clock
    yield w
    for server in servers:
        await server.stop()
    await dns.stop()


async def test_an_enforce_policy_is_fetched_then_served_from_the_cache_while_the_id_holds(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    server = await sts.serve("good.test", "127.0.0.71")
    first = await sts.cache.policy("good.test")
    assert (first.source, first.policy_id, first.enforced) == (StsSource.FETCHED, "one", True)
    assert first.policy.matches("mx1.good.test") and not first.policy.matches("evil.test")
    assert server.paths == ["/.well-known/mta-sts.txt"]
    again = await sts.cache.policy("good.test")
    assert again.source is StsSource.CACHED and server.requests == 1


async def test_a_new_id_fetches_the_new_policy(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    server = await sts.serve("good.test", "127.0.0.71")
    await sts.cache.policy("good.test")
    sts.dns.records.clear()
    sts.dns.add("mta-sts.good.test", "A", "127.0.0.71")
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=two"')
    server.body = "version: STSv1\nmode: testing\nmx: mx1.good.test\nmax_age: 600\n"
    result = await sts.cache.policy("good.test")
    assert (result.source, result.policy_id, result.policy.mode) == (
        StsSource.FETCHED,
        "two",
        StsMode.TESTING,
    )


async def test_without_a_txt_record_there_is_no_policy_and_no_fetch(sts):
    server = await sts.serve("good.test", "127.0.0.71")
    result = await sts.cache.policy("good.test")
    assert (result.source, result.policy) == (StsSource.NONE, None)
    assert server.requests == 0


async def test_two_sts_records_mean_no_policy(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=two"')
    sts.dns.add("_mta-sts.good.test", "TXT", '"some other record"')
    result = await sts.cache.policy("good.test")
    assert result.policy is None and "2 v=STSv1 TXT records" in result.detail


async def test_a_record_split_into_strings_is_joined_without_spaces(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; " "id=one"')
    await sts.serve("good.test", "127.0.0.71")
    assert (await sts.cache.policy("good.test")).policy_id == "one"


@pytest.mark.parametrize(
    ("change", "detail", "failure"),
    [
        ({"status": 404}, "HTTP 404", FETCH),
        ({"status": 301, "headers": {"Location": "https://elsewhere.test/"}}, "HTTP 301", FETCH),
        ({"content_type": "text/html"}, "not text/plain", FETCH),
        ({"body": "garbage"}, "not 'key: value'", INVALID),
        (
            {"body": "version: STSv1\nmode: enforce\nmax_age: 60\n"},
            "needs at least one mx",
            INVALID,
        ),
        ({"body": ENFORCE + "x: " + "y" * 70000 + "\n"}, "larger than 65536", FETCH),
        (
            {"body": ENFORCE + "x: " + "y" * 70000 + "\n", "chunked": True},
            "larger than 65536",
            FETCH,
        ),
        ({"delay": 5}, "within 3 s", FETCH),
    ],
)
async def test_a_failed_fetch_without_a_cached_policy_means_no_policy(sts, change, detail, failure):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    server = await sts.serve("good.test", "127.0.0.71")
    for key, value in change.items():
        setattr(server, key, value)
    result = await sts.cache.policy("good.test")
    assert result.policy is None and result.source is StsSource.NONE
    assert detail in result.detail
    assert result.failure == failure  # TLS-RPT's result type (RFC 8460 4.3.2.3)
    again = await sts.cache.policy("good.test")  # waiting to retry: still known why
    assert again.failure == failure and "waiting to retry" in again.detail


async def test_a_chunked_policy_is_read(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    server = await sts.serve("good.test", "127.0.0.71", body=ENFORCE + "pad: " + "p" * 3000 + "\n")
    server.chunked = True
    assert (await sts.cache.policy("good.test")).enforced


@pytest.mark.parametrize("bad", ["wrong-name", "untrusted-ca"])
async def test_a_policy_host_without_a_valid_certificate_gives_no_policy(sts, bad):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    if bad == "wrong-name":
        await sts.serve("good.test", "127.0.0.71", cert_for="good.test")  # lacks mta-sts.
    else:
        await sts.serve("good.test", "127.0.0.71", ca=trustme.CA())
    result = await sts.cache.policy("good.test")
    assert result.policy is None and "TLS with mta-sts.good.test failed" in result.detail
    assert result.failure == "sts-webpki-invalid"


async def test_a_cached_policy_survives_a_removed_record_or_a_failed_fetch_until_it_expires(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    server = await sts.serve("good.test", "127.0.0.71")
    assert (await sts.cache.policy("good.test")).enforced
    # an attacker strips the TXT record: the cached policy still applies
    sts.dns.records.pop(next(k for k in sts.dns.records if k[0].to_text().startswith("_mta")))
    stripped = await sts.cache.policy("good.test")
    assert (stripped.source, stripped.enforced) == (StsSource.CACHED_FALLBACK, True)
    # a new id whose policy cannot be fetched: still the cached one, and one try per backoff
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=two"')
    server.status = 500
    failed = await sts.cache.policy("good.test")
    assert (failed.source, failed.policy_id, failed.enforced) == (
        StsSource.CACHED_FALLBACK,
        "one",
        True,
    )
    await sts.cache.policy("good.test")
    assert server.requests == 2  # the first fetch, then one failed try; the third waited
    # once max_age has passed, the cached policy is gone
    sts.clock.now += 86400
    assert (await sts.cache.policy("good.test")).policy is None


async def test_a_dns_failure_falls_back_to_the_cached_policy(sts):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    await sts.serve("good.test", "127.0.0.71")
    await sts.cache.policy("good.test")
    sts.dns.fail("_mta-sts.good.test")
    result = await sts.cache.policy("good.test")
    assert (result.source, result.enforced) == (StsSource.CACHED_FALLBACK, True)
    assert "TXT lookup failed" in result.detail


async def test_a_saved_policy_survives_a_restart_and_still_resists_a_downgrade(sts, tmp_path):
    sts.dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=one"')
    await sts.serve("good.test", "127.0.0.71")
    path = tmp_path / "mta-sts.json"
    sts.cache.store = JsonStsStore(path)
    assert (await sts.cache.policy("good.test")).enforced
    # restarted, and meanwhile an attacker strips the TXT record
    sts.dns.records.pop(next(k for k in sts.dns.records if k[0].to_text().startswith("_mta")))
    restarted = StsCache(sts.cache.resolver, port=sts.cache.port, clock=sts.clock, path=path)
    assert restarted.load() == 1
    result = await restarted.policy("good.test")
    assert (result.source, result.enforced, result.policy_id) == (
        StsSource.CACHED_FALLBACK,
        True,
        "one",
    )
    sts.clock.now += 86400  # expired policies are not loaded
    assert StsCache(sts.cache.resolver, clock=sts.clock, path=path).load() == 0


def test_an_unreadable_saved_cache_is_an_empty_one(tmp_path):
    path = tmp_path / "mta-sts.json"
    path.write_text("{not json")
    assert StsCache(Resolver(), path=path).load() == 0
