"""Portal deposits made while others are under way share one transaction (a group
commit), and one that fails fails alone."""

from __future__ import annotations

import asyncio
import hashlib

from gateway.model import ClientInfo, Envelope, Recipient
from gateway.storage.stores import Storage
from tests.conftest import make_message
from tests.support.archive import refusing
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
