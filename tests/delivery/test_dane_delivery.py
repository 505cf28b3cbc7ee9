"""DANE at delivery: MX hosts with usable, DNSSEC-secure TLSA records are
authenticated by them instead of by CAs; failures never fall back."""

from __future__ import annotations

import hashlib

import pytest

from gateway.delivery.client import ClientSettings, deliver
from gateway.delivery.router import NextHop, Routed
from gateway.delivery.tls_policy import TlsLevel
from tests.support.delivery import publish, send, spki_sha256
from tests.support.world import MESSAGE, tls_only, wait_until


async def dane_send(world, hosts, *, secure_mx: bool = True, dane: bool = True):
    settings = ClientSettings(
        helo_name="gw.sealgate.test", ca_file=None, connect_timeout=5, command_timeout=10, dane=dane
    )
    routed = Routed(tuple(NextHop(h, world.port, i) for i, h in enumerate(hosts)), secure_mx)
    return await deliver(
        routed, TlsLevel.MAY, "s@clinic.test", ["r@dest.test"], MESSAGE, settings, world.resolver
    )


async def test_a_self_signed_mx_with_a_matching_dane_ee_record_is_authenticated(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert="self-signed")
    digest = hashlib.sha256(mx.cert_der).hexdigest()
    publish(world, "mx1.dest.test", f"3 0 1 {digest}")
    (result,) = await dane_send(world, ["mx1.dest.test"])
    assert result.outcome == "delivered"
    assert (result.evidence.level, result.evidence.verification) == ("dane", "dane-ee")
    assert len(mx.received) == 1


async def test_a_mismatching_tlsa_record_skips_that_mx_even_with_a_ca_signed_certificate(world):
    first = await world.mta("mx1.dest.test", "127.0.0.81")  # valid for the test CA...
    publish(world, "mx1.dest.test", "3 1 1 " + "00" * 32)  # ...but DANE says otherwise
    second = await world.mta("mx2.dest.test", "127.0.0.82", cert="self-signed")
    publish(world, "mx2.dest.test", f"3 0 1 {hashlib.sha256(second.cert_der).hexdigest()}")
    (result,) = await dane_send(world, ["mx1.dest.test", "mx2.dest.test"])
    assert result.outcome == "delivered" and result.evidence.mx_host == "mx2.dest.test"
    assert first.received == []


async def test_a_failed_tlsa_lookup_makes_the_mx_unusable_not_dane_free(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    world.dns.fail(f"_{world.port}._tcp.mx1.dest.test")
    (result,) = await dane_send(world, ["mx1.dest.test"])
    assert (result.outcome, result.status) == ("deferred", "4.7.5")
    assert "TLSA lookup" in result.diagnostic and mx.connections == 0


async def test_unusable_tlsa_records_still_require_tls(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)  # no STARTTLS
    publish(world, "mx1.dest.test", "1 1 1 " + "00" * 32)  # PKIX-EE: unusable for SMTP
    (result,) = await dane_send(world, ["mx1.dest.test"])
    assert (result.outcome, result.status) == ("deferred", "4.7.4")
    assert mx.received == []


@pytest.mark.parametrize(("secure_mx", "dane"), [(False, True), (True, False)])
async def test_tlsa_is_ignored_without_a_secure_mx_answer_or_a_trusted_resolver(
    world, secure_mx, dane
):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    publish(world, "mx1.dest.test", "3 1 1 " + "00" * 32)
    (result,) = await dane_send(world, ["mx1.dest.test"], secure_mx=secure_mx, dane=dane)
    assert result.outcome == "delivered" and result.evidence.level == "may"
    assert len(mx.received) == 1


async def test_an_insecure_tlsa_answer_is_no_dane(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert=None)
    world.dns.add(f"_{world.port}._tcp.mx1.dest.test", "TLSA", "3 1 1 " + "00" * 32)  # no AD
    (result,) = await dane_send(world, ["mx1.dest.test"])
    assert result.outcome == "delivered" and result.evidence.level == "may"
    assert len(mx.received) == 1


async def test_through_the_daemon_dane_outranks_the_policy_level(gateway_factory, world, pki):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert="self-signed")
    world.dns.add("dest.test", "MX", "10 mx1.dest.test.")
    world.dns.secure("dest.test")
    publish(world, "mx1.dest.test", f"3 1 1 {spki_sha256(mx.cert_der)}")
    gw = await gateway_factory(
        world.config(
            {
                "dns.dnssec": "trust-ad",
                "delivery.retry_schedule": ["1h"],
            },
            # a self-signed certificate fails 'verify', the default policy's level...
            policy=tls_only("verify"),
        )
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: mx.received, what="delivery authenticated by DANE")
    await wait_until(lambda: gw.queue.store.attempts(queue_id), what="recorded")
    (attempt,) = gw.queue.store.attempts(queue_id)
    # ...DANE authenticates it instead
    assert (attempt["evidence"]["level"], attempt["evidence"]["verification"]) == (
        "dane",
        "dane-ee",
    )
    assert attempt["evidence"]["decision"]["level_source"] == "dane"
