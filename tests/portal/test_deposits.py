"""Portal deposits made while others are under way share one transaction (a group
commit), and one that fails fails alone."""

from __future__ import annotations

import asyncio
import hashlib

from gateway.model import ClientInfo, Envelope, Recipient
from gateway.storage.stores import Storage
from tests.conftest import make_message
from tests.support.archive import refusing
from tests.support.delivery import send, start, state
from tests.support.world import wait_until

REFUSED = "refused@plain.test"


async def test_deposits_made_together_share_one_commit_and_one_failing_fails_alone(
    gateway_factory, world
):
    plain = await world.mta("mx.plain.test", "127.0.0.93", cert=None)
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    gw = await gateway_factory(world.config())
    data = make_message("Biopsy")
    recipients = [f"p{n}@plain.test" for n in range(8)] + [REFUSED]
    envelope = Envelope(
        queue_id="18TD5AAAAAAAAAAA",
        received_at="2026-12-06T07:00:00+00:00",
        mail_from="doctor@clinic.test",
        mail_options=(),
        recipients=tuple(Recipient(r) for r in recipients),
        client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    batches = gw.portal._deposits.batches
    with refusing(gw, "items", f"NEW.recipient = '{REFUSED}'", Storage(gw.config).path("portal")):
        outcomes = await asyncio.gather(
            *(gw.portal.deposit(envelope, data, r) for r in recipients), return_exceptions=True
        )
    assert gw.portal._deposits.batches == batches + 1  # one transaction for all nine
    *kept, refused = outcomes
    assert isinstance(refused, Exception) and "refused by the test" in str(refused)
    assert [result.status for result, _ in kept] == ["2.0.0"] * 8
    items = gw.portal.store.items_of(envelope.queue_id)
    assert sorted(i.recipient for i in items) == recipients[:8]  # each kept, durable
    await wait_until(lambda: len(plain.received) == 8, what="eight notifications")


async def test_one_messages_recipients_are_deposited_together_and_a_failing_one_waits_alone(
    gateway_factory, world, pki
):
    """Three recipients of one message decided ``portal``: their deposits share one
    commit, and the one the store refuses is deferred alone (4.3.0, tried again) - the
    other two are kept and notified once, not deferred with it."""
    dest = await world.mta("mx.dest.test", "127.0.0.94", cert="self-signed")  # no proof
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki, **{"delivery.retry_schedule": ["1h"]})
    rcpts = ["p0@dest.test", "p1@dest.test", "refused@dest.test"]
    batches = gw.portal._deposits.batches
    where = "NEW.recipient = 'refused@dest.test'"
    with refusing(gw, "items", where, Storage(gw.config).path("portal")):
        queue_id = await send(gw, rcpts)
        await wait_until(lambda: len(gw.queue.store.attempts(queue_id)) == 3, what="recorded")
    assert gw.portal._deposits.batches == batches + 1  # one commit for the three
    assert state(gw, queue_id) == {
        "p0@dest.test": ("delivered", "2.0.0"),
        "p1@dest.test": ("delivered", "2.0.0"),
        "refused@dest.test": ("deferred", "4.3.0"),
    }
    (failed,) = [a for a in gw.queue.store.attempts(queue_id) if a["recipient_index"] == 2]
    assert "the secure portal could not keep the message" in failed["diagnostic"]
    await wait_until(lambda: len(dest.received) == 2, what="two notifications")
    assert sorted(r for m in dest.received for r in m.rcpt_tos) == rcpts[:2]
    kept = gw.portal.store.items_of(queue_id)
    assert sorted(i.recipient for i in kept) == rcpts[:2]
