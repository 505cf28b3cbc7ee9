"""The policy at delivery time, through the daemon: decisions per recipient, the
downgrade case (STARTTLS gone between probe and delivery), fallbacks, and a domain
whose DNS never answers."""

from __future__ import annotations

import time

from tests.conftest import queued, smtp_client
from tests.support.delivery import send, start, state
from tests.support.world import tls_only, wait_until


def sample(gw, name: str, **labels) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_starttls_gone_at_delivery_no_plaintext_and_the_next_mode(
    gateway_factory, world, pki
):
    good = await world.mta("mx.dest.test", "127.0.0.61")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    # the adaptive default policy; without the portal its last mode holds
    gw = await start(gateway_factory, world, pki, **{"portal.enabled": False})
    facts = await gw.delivery.prober.domain("dest.test")
    assert facts.mx[0].starttls and facts.mx[0].pkix_valid  # the probe saw verified TLS
    # then the same address answers without STARTTLS (a stripping attacker, or a
    # changed server)
    await good.stop()
    plain = await world.mta("mx.dest.test", "127.0.0.61", cert=None)  # same address
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "held", what="held"
    )
    assert plain.received == [] and plain.attempts == 0  # never plaintext
    (row,) = gw.queue.store.recipients(queue_id)
    assert "decided portal" in row.diagnostic
    assert "after: 4.7.4 TLS is required, but was not offered" in row.diagnostic
    decision = gw.queue.store.decisions(queue_id)[0]
    assert decision["mode"] == "portal" and decision["excluded"] == ["tls"]
    assert decision["facts"]["mx"][0]["starttls"] is False  # probed again
    (attempt,) = gw.queue.store.attempts(queue_id)
    assert attempt["evidence"]["mx_host"] == "mx.dest.test"  # the failed connection
    assert sample(gw, "sealgate_policy_fallbacks_total", mode="portal") == 1
    assert sample(gw, "sealgate_delivery_tls_failures_total", reason="starttls_not_offered") == 1


async def test_a_bounce_fallback_fails_the_recipient_with_5_7_10_and_tells_the_sender(
    gateway_factory, world, pki
):
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.63")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    good = await world.mta("mx.dest.test", "127.0.0.61")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    rule = (
        "  - name: own-domain\n    when: {recipient_domain: clinic.test}\n"
        "    then: {fallback: hold}\n"
    )
    gw = await start(gateway_factory, world, pki, tls_only("verify", "bounce", rule))
    await gw.delivery.prober.domain("dest.test")
    await good.stop()
    plain = await world.mta("mx.dest.test", "127.0.0.61", cert=None)
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: sender_sink.received, what="DSN to the sender")
    assert plain.received == []
    assert state(gw, queue_id) == {"r@dest.test": ("bounced", "5.7.10")}
    text = sender_sink.received[0].data.decode()
    assert "Status: 5.7.10" in text and "no secure way to deliver" in text
    assert "Biopsy" not in text  # the subject stays out of the DSN
    assert sample(gw, "sealgate_policy_decisions_total", mode="bounce", rule="defaults") == 1


async def test_each_recipient_gets_its_own_decision_and_copy(gateway_factory, world, pki):
    verified = await world.mta("mx.good.test", "127.0.0.64")
    plain = await world.mta("mx.plain.test", "127.0.0.65", cert=None)
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["a@good.test", "b@plain.test", "c@good.test"])
    await wait_until(lambda: verified.received, what="the verified copy")
    await wait_until(lambda: plain.received, what="the portal notification")
    assert [m.rcpt_tos for m in verified.received] == [["a@good.test", "c@good.test"]]
    (note,) = plain.received  # no STARTTLS there: a link to the portal, not the message
    assert b"Biopsy" not in note.data and b"/m/" in note.data
    assert state(gw, queue_id)["b@plain.test"] == ("delivered", "2.0.0")
    decisions = gw.queue.store.decisions(queue_id)
    assert [decisions[i]["mode"] for i in range(3)] == ["tls", "portal", "tls"]
    assert sample(gw, "sealgate_policy_decisions_total", mode="tls", rule="defaults") == 2
    assert sample(gw, "sealgate_policy_decisions_total", mode="portal", rule="defaults") == 1


async def _send_tagged(gateway_factory, world, pki, message: bytes):
    """A gateway whose policy has the subject tag [secure], and ``message`` sent
    through it to r@dest.test; the gateway and the recipient's server."""
    mx = await world.mta("mx.dest.test", "127.0.0.61")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    rule = "  - name: tagged\n    when: {subject_tag: '[secure]'}\n    then: {tls_level: verify}\n"
    gw = await start(gateway_factory, world, pki, tls_only("encrypt", rules=rule))
    async with smtp_client(gw) as client:
        await client.sendmail("d@clinic.test", ["r@dest.test"], message)
    return gw, mx


async def test_a_subject_tag_is_removed_from_the_copy_delivered(gateway_factory, world, pki):
    message = b"From: d@clinic.test\r\nSubject: [Secure] Results\r\n\r\nBody [secure]\r\n"
    _, mx = await _send_tagged(gateway_factory, world, pki, message)
    await wait_until(lambda: mx.received, what="delivery")
    data = mx.received[0].data
    assert b"\r\nSubject: Results\r\n" in data and data.endswith(b"\r\n\r\nBody [secure]\r\n")


async def test_a_tagged_subject_in_latin1_is_delivered_once_without_the_tag(
    gateway_factory, world, pki
):
    message = b"From: d@clinic.test\r\nSubject: [secure] Befund f\xfcr Sie\r\n\r\nBody\r\n"
    gw, mx = await _send_tagged(gateway_factory, world, pki, message)
    (path,) = queued(gw)
    queue_id = path.name
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "delivered",
        what="the delivery recorded",
    )
    (received,) = mx.received
    assert b"\r\nSubject: Befund f\xfcr Sie\r\n" in received.data
    assert received.data.endswith(b"\r\n\r\nBody\r\n") and mx.attempts == 1


async def test_a_domain_whose_dns_never_answers_delays_no_other_domain(gateway_factory, world, pki):
    mx = await world.mta("mx.dest.test", "127.0.0.61")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.silence("dead.test")
    gw = await start(gateway_factory, world, pki)
    started = time.monotonic()
    for _ in range(3):  # several messages to the dead domain take their slots first
        await send_one(gw, "x@dead.test")
    await send_one(gw, "r@dest.test")
    await wait_until(lambda: mx.received, timeout=5, what="delivery to the live domain")
    assert time.monotonic() - started < 3.0
    dead = [q for q in gw.queue.store.known() if "x@dead.test" in _rcpts(gw, q)]
    assert all(not gw.queue.store.attempts(q) for q in dead)  # still waiting on DNS


async def send_one(gw, rcpt: str) -> None:
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", [rcpt], b"Subject: x\r\n\r\nx\r\n")


def _rcpts(gw, queue_id: str) -> list[str]:
    return [r.address for r in gw.queue.store.recipients(queue_id)]
