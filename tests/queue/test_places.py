"""Delivery places (`gateway.queue.places`): a share gives its places in the order
asked and takes one beyond its limit when told to, letting nobody else in until it is
back under it; through the daemon's queue, a first attempt to a new destination that
stalls leaves the new destinations' share after `NEW_QUICK`, so the next new
destination is tried while it still runs."""

from __future__ import annotations

import asyncio

import pytest

from gateway.queue.places import NEW_QUICK, Place, Share
from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until


async def test_a_share_gives_its_places_in_order_and_waits_while_over_its_limit():
    share = Share(2)
    await share.acquire()
    await share.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await share.acquire()
        order.append(name)

    first = asyncio.ensure_future(take("first"))
    second = asyncio.ensure_future(take("second"))
    await asyncio.sleep(0)
    assert order == [] and share.used == 2
    share.force()  # an attempt under way joins: 3 of 2
    share.release()
    await asyncio.sleep(0)
    assert order == []  # still at its limit: nobody else yet
    share.release()
    await asyncio.sleep(0)
    assert order == ["first"]
    share.release()
    await asyncio.sleep(0)
    assert order == ["first", "second"] and share.used == 2
    await asyncio.gather(first, second)


async def test_a_waiter_that_gives_up_leaves_its_place_to_the_next():
    share = Share(1)
    await share.acquire()
    gone = asyncio.ensure_future(share.acquire())
    stays = asyncio.ensure_future(share.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    share.release()
    await asyncio.wait_for(stays, 1)
    assert share.used == 1


def test_an_overrunning_new_place_moves_to_the_slow_share_once():
    new, slow = Share(1), Share(1)
    new.used, slow.used = 1, 1
    place = Place(new, new=new, slow=slow)
    place.overrun()
    place.overrun()
    assert (new.used, slow.used) == (0, 2)
    place.release()
    assert (new.used, slow.used) == (0, 1)


async def test_a_stalled_first_attempt_does_not_hold_back_the_next_new_destination(
    gateway_factory, world
):
    stalled = await world.mta("mx.stalled.test", "127.0.0.57", data_delay=NEW_QUICK + 6)
    world.dns.add("stalled.test", "MX", "10 mx.stalled.test.")
    quick = await world.mta("mx.quick.test", "127.0.0.58")
    world.dns.add("quick.test", "MX", "10 mx.quick.test.")
    # four places: one for new destinations, one for slow ones, two for quick ones
    gw = await gateway_factory(world.config({"delivery.concurrency": 4}))
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["r@stalled.test"], make_message())
        await wait_until(lambda: stalled.attempts == 1, timeout=10, what="its DATA under way")
        await client.sendmail("doctor@clinic.test", ["r@quick.test"], make_message())
    await wait_until(lambda: len(quick.received) == 1, timeout=NEW_QUICK + 5, what="quick one")
    assert stalled.received == []  # its first attempt is still waiting for its DATA reply
    await wait_until(lambda: len(stalled.received) == 1, timeout=20, what="the stalled one")
