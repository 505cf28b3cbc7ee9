"""Outbound sessions are reused within limits, and never across TLS levels; one that was
slow to open is kept idle for as long as opening it took."""

from __future__ import annotations

import asyncio

from gateway.delivery.sessions import ReuseLimits, SessionCache
from gateway.delivery.tls_policy import TlsLevel
from gateway.observability.metrics import Metrics
from tests.support.world import wait_until


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_messages_to_one_server_share_a_verified_session(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21")
    cache, metrics = SessionCache(ReuseLimits(), per_key=4), Metrics()
    results = [
        (await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache, metrics=metrics))[0]
        for _ in range(3)
    ]
    assert [r.outcome for r in results] == ["delivered"] * 3
    assert [r.evidence.reused for r in results] == [0, 1, 2]
    # the reused session's evidence is that of the verified connection
    assert {(r.evidence.peer_cert_sha256, r.evidence.verification) for r in results} == {
        (results[0].evidence.peer_cert_sha256, "pkix")
    }
    assert mx.connections == 1 and [m.connection for m in mx.received] == [1, 1, 1]
    assert sample(metrics, "sealgate_delivery_connections_total", kind="new") == 1
    assert sample(metrics, "sealgate_delivery_connections_total", kind="reused") == 2
    await cache.close()
    await wait_until(lambda: mx.quits == 1, what="QUIT at close")


async def test_a_plaintext_session_at_may_is_never_reused_where_tls_is_required(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", cert=None)
    cache = SessionCache(ReuseLimits(), per_key=4)
    (first,) = await world.send(["mx1.dest.test"], TlsLevel.MAY, sessions=cache)
    assert first.outcome == "delivered" and first.evidence.tls_version is None
    assert cache.idle_sessions() == 1
    for level in (TlsLevel.ENCRYPT, TlsLevel.VERIFY):
        (result,) = await world.send(["mx1.dest.test"], level, sessions=cache)
        assert (result.outcome, result.status) == ("deferred", "4.7.4")
    assert len(mx.received) == 1 and mx.connections == 3
    await cache.close()


async def test_an_unverified_session_at_encrypt_is_not_reused_at_verify(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", cert="self-signed")
    cache = SessionCache(ReuseLimits(), per_key=4)
    (first,) = await world.send(["mx1.dest.test"], TlsLevel.ENCRYPT, sessions=cache)
    assert first.outcome == "delivered" and first.evidence.verification == "none"
    (second,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
    assert (second.outcome, second.status) == ("deferred", "4.7.5")
    assert len(mx.received) == 1
    await cache.close()


async def test_a_session_the_server_closed_meanwhile_is_replaced_and_nothing_is_lost(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", close_after_data=True)
    cache = SessionCache(ReuseLimits(), per_key=4)
    outcomes = []
    for n in range(3):
        (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
        outcomes.append((result.outcome, result.evidence.reused))
        await wait_until(lambda n=n: mx.hung_up == n + 1, what="the server hung up")
    assert outcomes == [("delivered", 0)] * 3
    assert [m.connection for m in mx.received] == [1, 2, 3]
    await cache.close()


async def test_reuse_stops_at_max_messages(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21")
    cache = SessionCache(ReuseLimits(max_messages=2), per_key=4)
    for _ in range(5):
        (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
        assert result.outcome == "delivered"
    assert [m.connection for m in mx.received] == [1, 1, 2, 2, 3]
    await cache.close()


async def test_an_idle_session_is_closed_after_the_idle_time(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21")
    cache = SessionCache(ReuseLimits(idle_time=0.3), per_key=4)
    await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
    assert cache.idle_sessions() == 1 and mx.quits == 0
    await wait_until(lambda: mx.quits == 1, timeout=5, what="QUIT after idle time")
    assert cache.idle_sessions() == 0
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
    assert result.evidence.reused == 0 and mx.connections == 2
    await cache.close()


async def test_a_session_slow_to_open_is_kept_idle_as_long_as_it_took(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", ehlo_delay=0.6)
    cache = SessionCache(ReuseLimits(idle_time=0.3), per_key=4)
    await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)  # 2 EHLOs: 1.2 s
    await asyncio.sleep(0.8)  # past the idle time, not past what opening it took
    assert cache.idle_sessions() == 1 and mx.quits == 0
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, sessions=cache)
    assert result.evidence.reused == 1 and mx.connections == 1
    await wait_until(lambda: mx.quits == 1, timeout=5, what="QUIT after the longer idle time")
    await cache.close()


async def test_tls_failures_are_counted_by_reason(world):
    await world.mta("expired.dest.test", "127.0.0.21", cert="expired")
    await world.mta("wrong.dest.test", "127.0.0.22", cert="wrong-name")
    await world.mta("selfsigned.dest.test", "127.0.0.23", cert="self-signed")
    await world.mta("plain.dest.test", "127.0.0.24", cert=None)
    metrics = Metrics()
    hosts = ["expired.dest.test", "wrong.dest.test", "selfsigned.dest.test", "plain.dest.test"]
    (result,) = await world.send(hosts, TlsLevel.VERIFY, metrics=metrics)
    assert result.outcome == "deferred"
    counts = {
        reason: sample(metrics, "sealgate_delivery_tls_failures_total", reason=reason)
        for reason in (
            "certificate_expired",
            "certificate_name_mismatch",
            "certificate_untrusted",
            "starttls_not_offered",
            "handshake_failed",
        )
    }
    assert counts == {
        "certificate_expired": 1,
        "certificate_name_mismatch": 1,
        "certificate_untrusted": 1,
        "starttls_not_offered": 1,
        "handshake_failed": 0,
    }
