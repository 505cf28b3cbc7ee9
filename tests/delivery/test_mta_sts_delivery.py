"""MTA-STS at delivery: an enforce policy restricts the MX hosts and raises the TLS
level to verified TLS whatever the configured level; testing only notes it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import free_port, leaf_files, run_sealgate
from tests.support.delivery import send, state
from tests.support.https import PolicyServer
from tests.support.world import tls_only, wait_until


@pytest.fixture
async def policy_servers():
    servers: list[PolicyServer] = []
    yield servers
    for server in servers:
        await server.stop()


async def start(
    gateway_factory, world, pki, tmp_path, policy: str, servers, gateway_policy=None, **overrides
):
    port = free_port()
    leaf = pki.ca.issue_cert("mta-sts.dest.test")
    chain, key = leaf_files(leaf, tmp_path, "sts")
    world.dns.add("mta-sts.dest.test", "A", "127.0.0.79")
    world.dns.add("_mta-sts.dest.test", "TXT", '"v=STSv1; id=one"')
    server = await PolicyServer("127.0.0.79", port, (chain, key), body=policy).start()
    servers.append(server)
    gw = await gateway_factory(
        world.config(
            {"delivery.retry_schedule": ["1h"], "mta_sts.port": port, **overrides},
            policy=gateway_policy,
        )
    )
    return gw, server


def attempt_evidence(gw, queue_id):
    return [a["evidence"] for a in gw.queue.store.attempts(queue_id)]


ENFORCE_MX1 = "version: STSv1\nmode: enforce\nmx: mx1.dest.test\nmax_age: 86400\n"


async def test_enforce_skips_mx_hosts_outside_the_policy_and_verifies_tls(
    gateway_factory, world, pki, tmp_path, policy_servers
):
    outside = await world.mta("mx0.dest.test", "127.0.0.75")
    listed = await world.mta("mx1.dest.test", "127.0.0.76")
    world.dns.add("dest.test", "MX", "5 mx0.dest.test.")
    world.dns.add("dest.test", "MX", "10 mx1.dest.test.")
    gw, server = await start(
        gateway_factory,
        world,
        pki,
        tmp_path,
        ENFORCE_MX1,
        policy_servers,
        gateway_policy=tls_only("may"),
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: listed.received, what="delivery to the policy's MX")
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "delivered", what="done"
    )
    assert outside.received == [] and outside.connections == 0  # not even probed
    (evidence,) = attempt_evidence(gw, queue_id)
    assert (evidence["mx_host"], evidence["level"], evidence["verification"]) == (
        "mx1.dest.test",
        "mta-sts",
        "pkix",
    )
    # the probe fetched it for the decision; delivery found it cached by its id
    assert evidence["mta_sts"] == "enforce id=one (cached)"
    assert server.requests == 1
    shown = run_sealgate("queue", "show", queue_id, "--state-dir", str(gw.config.state_dir))
    assert "level=mta-sts verified=pkix mta-sts='enforce id=one (cached)'" in shown.stdout
    saved = json.loads((gw.config.state_dir / "mta-sts.json").read_text())
    assert (saved["dest.test"]["id"], saved["dest.test"]["mode"]) == ("one", "enforce")


async def test_enforce_never_falls_back_to_unverified_tls_even_where_the_admin_allows_it(
    gateway_factory, world, pki, tmp_path, policy_servers
):
    mx = await world.mta("mx1.dest.test", "127.0.0.76", cert="self-signed")
    world.dns.add("dest.test", "MX", "10 mx1.dest.test.")
    gw, _ = await start(
        gateway_factory,
        world,
        pki,
        tmp_path,
        ENFORCE_MX1,
        policy_servers,
        gateway_policy=tls_only("encrypt"),
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "held", what="held"
    )
    (row,) = gw.queue.store.recipients(queue_id)
    assert row.status == "4.7.10"
    assert "level mta-sts" not in row.diagnostic  # the rule asked for encrypt...
    decision = gw.queue.store.decisions(queue_id)[0]
    assert (decision["mode"], decision["tls_level"]) == ("hold", "mta-sts")  # ...MTA-STS more
    assert "tls: level encrypt (defaults) not reached by any server" in row.diagnostic
    assert mx.received == []


async def test_enforce_with_no_matching_mx_holds_and_connects_nowhere(
    gateway_factory, world, pki, tmp_path, policy_servers
):
    mx = await world.mta("mx9.dest.test", "127.0.0.77")
    world.dns.add("dest.test", "MX", "10 mx9.dest.test.")
    gw, _ = await start(
        gateway_factory, world, pki, tmp_path, ENFORCE_MX1, policy_servers, tls_only("verify")
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "held", what="held"
    )
    (row,) = gw.queue.store.recipients(queue_id)
    assert row.status == "4.7.10" and "no MX host matches the MTA-STS policy" in row.diagnostic
    assert mx.connections == 0


async def test_testing_mode_delivers_as_configured_and_notes_the_policy(
    gateway_factory, world, pki, tmp_path, policy_servers
):
    mx = await world.mta("mx9.dest.test", "127.0.0.77")
    world.dns.add("dest.test", "MX", "10 mx9.dest.test.")
    testing = ENFORCE_MX1.replace("enforce", "testing")
    gw, _ = await start(gateway_factory, world, pki, tmp_path, testing, policy_servers)
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: mx.received, what="delivery despite the testing policy")
    await wait_until(lambda: attempt_evidence(gw, queue_id), what="recorded")
    (evidence,) = attempt_evidence(gw, queue_id)
    assert (evidence["level"], evidence["mta_sts"]) == ("verify", "testing id=one (cached)")


async def test_a_disabled_mta_sts_fetches_nothing(
    gateway_factory, world, pki, tmp_path, policy_servers
):
    mx = await world.mta("mx9.dest.test", "127.0.0.77")
    world.dns.add("dest.test", "MX", "10 mx9.dest.test.")
    gw, server = await start(
        gateway_factory,
        world,
        pki,
        tmp_path,
        ENFORCE_MX1,
        policy_servers,
        **{"mta_sts.enabled": False},
    )
    await send(gw, ["r@dest.test"])
    await wait_until(lambda: mx.received, what="delivery")
    assert server.requests == 0
