"""Delivery places (`gateway.queue.places`): a share gives its places in the order
asked and takes one beyond its limit when told to, letting nobody else in until it is
back under it, and its limit can change; through the daemon's queue, a first attempt
to a new destination that stalls leaves the new destinations' share after
`NEW_QUICK`, so the next new destination is tried while it still runs, and an
attempt that waited as a new destination's takes a slow place once the
destination is found slow; a slow
destination's window widens as it delivers and narrows as it does not, and it is
quick again only after an attempt much quicker than the one that made it slow; the
attempts queued behind one quick destination's limit leave the claims room for the
others; an attempt
running past `STALL` gives up its places; the slow share borrows what the others
leave idle of the first three quarters of the places once none of theirs has waited
for a place for `LEND_AFTER` (its own quarter only until then) - counting the places
its attempts hold, not those let in and still waiting; a place given back by a slow
destination's attempt goes to its next one first (its session still open), a
`HANDOFFS` times in a row at most; what is known of a destination without attempts
is forgotten after `FORGET_AFTER`."""

from __future__ import annotations

import asyncio

import pytest

from gateway.queue.places import (
    HANDOFFS,
    LEND_AFTER,
    NEW_QUICK,
    SLOW_PLACES,
    Place,
    Share,
    Total,
)
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


async def test_a_wider_limit_lets_those_waiting_in_and_a_narrower_one_holds_the_next():
    share = Share(1)
    await share.acquire()
    waiting = [asyncio.ensure_future(share.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    share.resize(3)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [True, True, False] and share.used == 3
    share.resize(1)
    share.release()
    share.release()
    await asyncio.sleep(0)
    assert not waiting[2].done()  # two of three gone, still at the new limit of one
    share.release()
    await asyncio.wait_for(waiting[2], 1)
    assert share.used == 1


async def test_a_waiter_cancelled_before_a_place_comes_free_leaves_nothing_taken():
    share = Share(1)
    await share.acquire()
    waiter = asyncio.ensure_future(share.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    share.release()  # the place comes free before the cancelled waiter has run again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert share.used == 0
    assert await asyncio.wait_for(share.acquire(), 1) == 0


async def test_the_slow_share_borrows_what_the_others_leave_idle_of_three_quarters():
    slow = Share(2)
    total = Total(8, slow=slow)
    assert slow.limit == 6  # nothing else runs: three quarters of the places
    quick = [Place() for _ in range(4)]
    await quick[0].take(total)
    assert slow.limit == 5
    for place in quick[1:]:
        await place.take(total)
    assert slow.limit == 2  # never less than its own
    slowly = [Place(slow=slow) for _ in range(3)]
    for place in slowly[:2]:
        await place.take(total, slow)
    third = asyncio.ensure_future(slowly[2].take(total, slow))
    await asyncio.sleep(0)
    assert not third.done()  # 4 quick and 2 slow: three quarters are used
    quick[0].release()
    await asyncio.sleep(0)
    assert third.done() and (slow.used, total.used, slow.limit) == (3, 6, 3)  # one lent
    for place in quick[1:]:
        place.release()
    more = [Place(slow=slow) for _ in range(3)]
    for place in more:
        await place.take(total, slow)
    assert (slow.used, total.used, slow.limit) == (6, 6, 6)  # all the three quarters
    last = asyncio.ensure_future(Place(slow=slow).take(total, slow))
    burst = [Place() for _ in range(2)]
    for place in burst:  # quick mail finds the last quarter free at once
        await asyncio.wait_for(place.take(total), 1)
    await asyncio.sleep(0)
    assert not last.done() and total.used == 8
    last.cancel()


async def test_the_loan_stops_while_quick_mail_waits_and_comes_back_after_lend_after():
    now = [1000.0]
    slow = Share(2)
    total = Total(8, slow=slow, clock=lambda: now[0])
    slowly = [Place(slow=slow) for _ in range(6)]
    for place in slowly:
        await place.take(total, slow)
    quick = [Place() for _ in range(2)]
    for place in quick:
        await place.take(total)
    assert (slow.used, slow.limit, total.used) == (6, 4, 8)  # quick came later: over
    waiting = asyncio.ensure_future(Place().take(total))
    await asyncio.sleep(0)
    assert slow.limit == 2  # a quick attempt waits: the slow share's own, no loan
    slowly[0].release()
    await asyncio.sleep(0)
    assert waiting.done()  # the place a slow attempt gave back went to the quick one
    late = asyncio.ensure_future(Place(slow=slow).take(total, slow))
    for place in quick:  # the quick mail is done, for a moment (between two claims)
        place.release()
    await asyncio.sleep(0)
    # nobody waits now, but one did a moment ago: nothing lent, a slow attempt
    # would keep the place for tens of seconds and the next round needs it
    assert not late.done() and (slow.used, slow.limit, total.used) == (5, 2, 6)
    now[0] += LEND_AFTER - 1
    slowly[1].release()
    await asyncio.sleep(0)
    assert not late.done() and slow.limit == 2
    now[0] += 1  # LEND_AFTER without a quick attempt waiting: three quarters lent
    slowly[2].release()
    await asyncio.sleep(0)
    assert late.done() and (slow.used, total.used, slow.limit) == (4, 5, 5)


async def test_slow_attempts_let_in_but_not_yet_holding_a_place_do_not_widen_the_loan():
    slow = Share(2)
    total = Total(8, slow=slow)
    quick = [Place() for _ in range(6)]
    for place in quick[:4]:
        await place.take(total)
    slowly = [Place(slow=slow) for _ in range(8)]
    for place in slowly[:2]:
        await place.take(total, slow)
    for place in quick[4:]:
        await place.take(total)
    waiting = [asyncio.ensure_future(place.take(total, slow)) for place in slowly[2:]]
    await asyncio.sleep(0)
    assert slow.used == 2 and not any(w.done() for w in waiting)
    for place in quick[:4]:  # given back one by one, as attempts end
        place.release()
    for _ in range(5):
        await asyncio.sleep(0)
    # two quick places held: the slow share's loan is three quarters less those two,
    # however many of its attempts were let in before they took a place of the total
    assert (total.slow_held, slow.used, total.used) == (4, 4, 6)
    assert sum(w.done() for w in waiting) == 2
    for w in waiting:
        w.cancel()


async def test_a_new_place_moving_to_the_slow_share_is_no_longer_counted_as_the_others():
    slow, new = Share(2), Share(2)
    total = Total(8, slow=slow)
    place = Place(new=new, slow=slow)
    await place.take(total, new)
    assert slow.limit == 5  # three quarters less the new destination's place
    place.overrun()
    assert (slow.used, slow.limit) == (1, 6)  # three quarters again: it is slow's own now
    place.release()
    assert (slow.used, slow.limit, total.used) == (0, 6, 0)


async def test_a_place_goes_to_the_next_attempt_to_the_same_destination_a_few_times():
    share = Share(1)
    assert await share.acquire("a.test") == 0
    other = asyncio.ensure_future(share.acquire("b.test"))  # first in line
    await asyncio.sleep(0)
    passed = 0
    for n in range(HANDOFFS):
        same = asyncio.ensure_future(share.acquire("a.test"))
        await asyncio.sleep(0)
        share.release("a.test", passed)
        passed = await asyncio.wait_for(same, 1)
        assert passed == n + 1 and not other.done() and share.used == 1
    share.release("a.test", passed)  # passed HANDOFFS times: b.test's turn
    assert await asyncio.wait_for(other, 1) == 0 and share.used == 1


async def test_an_overrunning_new_place_moves_to_the_slow_share_once():
    total, new, slow = Share(2), Share(1), Share(1)
    slow.used = 1
    place = Place(new=new, slow=slow)
    await place.take(total, new)
    place.overrun()
    place.overrun()
    assert (total.used, new.used, slow.used) == (1, 0, 2)
    place.release()
    assert (total.used, new.used, slow.used) == (0, 0, 1)


async def test_a_stalled_place_gives_up_its_share_and_total_places_once():
    total, slow = Share(2), Share(1)
    place = Place(slow=slow)
    await place.take(total, slow)
    assert place.stall() and (total.used, slow.used) == (0, 0)
    assert not place.stall()
    place.release()  # the attempt ends: nothing more to give back
    assert (total.used, slow.used) == (0, 0)
    ended = Place()
    await ended.take(total)
    ended.release()
    assert not ended.stall() and total.used == 0


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


@pytest.fixture
def quick_clock(monkeypatch):
    """The places' thresholds in tenths of seconds instead of seconds."""
    monkeypatch.setattr("gateway.queue.manager.NEW_QUICK", 0.3)
    monkeypatch.setattr("gateway.queue.manager.QUICK", 0.5)
    monkeypatch.setattr("gateway.queue.manager.QUICK_AGAIN", 0.125)
    monkeypatch.setattr("gateway.queue.manager.STALL", 2.0)


async def destinations(world, name: str, first: int, **kwargs) -> list:
    """Two recipient domains, <name>1.test and <name>2.test, with their servers on
    127.0.0.<first> and the next address."""
    servers = []
    for n in (1, 2):
        servers.append(await world.mta(f"mx.{name}{n}.test", f"127.0.0.{first + n - 1}", **kwargs))
        world.dns.add(f"{name}{n}.test", "MX", f"10 mx.{name}{n}.test.")
    return servers


async def most_at_once(gateway_factory, world, ip: str, count: int, overrides: dict) -> int:
    """The most DATA commands at once that a server slow to answer them (0.8 s) saw
    while ``count`` messages, a recipient each, went to it."""
    slow = await world.mta("mx.slow.test", ip, data_delay=0.8)
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    gw = await gateway_factory(world.config(overrides))
    async with smtp_client(gw) as client:
        for n in range(count):
            await client.sendmail("doctor@clinic.test", [f"r{n}@slow.test"], make_message())
    await wait_until(lambda: len(slow.received) == count, timeout=30, what=f"all {count}")
    return slow.most_in_data


async def test_a_slow_destination_that_delivers_gets_more_attempts_at_once(
    gateway_factory, world, quick_clock
):
    most = await most_at_once(
        gateway_factory, world, "127.0.0.59", 12, {"delivery.concurrency_per_destination": 4}
    )
    # one first attempt, then 2 at once (`SLOW_PLACES`), 3, 4: the destination's limit
    assert most == 4 > SLOW_PLACES


async def test_a_slow_destination_that_delivers_nothing_gets_one_attempt_at_a_time(
    gateway_factory, world, quick_clock
):
    failing = await world.mta(
        "mx.failing.test", "127.0.0.60", data_delay=0.8, data_reply="451 4.3.0 Try later"
    )
    world.dns.add("failing.test", "MX", "10 mx.failing.test.")
    gw = await gateway_factory(world.config({}))
    async with smtp_client(gw) as client:
        for n in range(4):
            await client.sendmail("doctor@clinic.test", [f"r{n}@failing.test"], make_message())
    await wait_until(lambda: failing.attempts == 4, timeout=20, what="four attempts")
    assert failing.most_in_data == 1  # its window fell from SLOW_PLACES to one


async def test_a_stalled_attempt_leaves_its_places_to_the_next_slow_destination(
    gateway_factory, world, quick_clock
):
    tarpits = await destinations(world, "tarpit", 61, data_delay=60)
    tarpits.append(await world.mta("mx.tarpit3.test", "127.0.0.65", data_delay=60))
    world.dns.add("tarpit3.test", "MX", "10 mx.tarpit3.test.")
    slow = await world.mta("mx.slow.test", "127.0.0.63", data_delay=0.8)
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    # one place each for slow and new destinations (and two lent to the slow ones
    # while nothing else runs), two for quick ones
    gw = await gateway_factory(world.config({"delivery.concurrency": 4}))
    async with smtp_client(gw) as client:
        for n, tarpit in enumerate(tarpits, 1):
            await client.sendmail("doctor@clinic.test", [f"r@tarpit{n}.test"], make_message())
            await wait_until(lambda t=tarpit: t.attempts == 1, timeout=10, what="its DATA")
        await client.sendmail("doctor@clinic.test", ["r1@slow.test"], make_message())
        await wait_until(lambda: len(slow.received) == 1, timeout=10, what="slow.test's first")
        # slow.test is slow now: its next attempt needs a place of the slow share,
        # whose three the tarpits' attempts hold until they stall
        await client.sendmail("doctor@clinic.test", ["r2@slow.test"], make_message())
    await wait_until(lambda: len(slow.received) == 2, timeout=10, what="slow.test's second")
    for tarpit in tarpits:
        assert tarpit.received == [] and tarpit.in_data == 1  # still waiting for its reply
    assert "sealgate_delivery_attempts_stalled 3.0" in gw.metrics.render().decode()


async def test_a_slow_destination_borrows_places_quick_ones_leave_idle(
    gateway_factory, world, quick_clock
):
    # a slow share of one place of four - and two more lent while nothing else runs
    most = await most_at_once(gateway_factory, world, "127.0.0.63", 6, {"delivery.concurrency": 4})
    assert most == 3


async def test_an_attempt_that_waited_as_new_takes_a_slow_place_once_its_destination_is_slow(
    gateway_factory, world
):
    # two attempts started while the destination was new (two messages leased
    # before the first attempt began); the first one finds it slow
    gw = await gateway_factory(world.config({"delivery.concurrency": 4}))
    queue, holding = gw.queue, []
    ends: dict[str, asyncio.Event] = {}

    async def attempt(name: str) -> None:
        ends[name] = asyncio.Event()
        async with queue._places("d.test") as place:
            holding.append((name, place))
            await ends[name].wait()
            holding.remove((name, place))

    first = asyncio.ensure_future(attempt("first"))
    await wait_until(lambda: len(holding) == 1, timeout=2, what="the first attempt's places")
    waited = asyncio.ensure_future(attempt("waited as new"))
    await asyncio.sleep(0.05)
    queue._overran("d.test", holding[0][1])  # slow: the first moves to the slow share
    # two attempts to the slow destination take its window (SLOW_PLACES): the slow
    # share's own place and the two lent while nothing else runs hold the first too
    slow = [asyncio.ensure_future(attempt(f"slow {n}")) for n in range(SLOW_PLACES)]
    await asyncio.sleep(0.05)
    assert [name for name, _ in holding] == ["first", "slow 0", "slow 1"]
    ends["first"].set()
    await first
    await asyncio.sleep(0.05)
    # the one that waited as new waits again, for the window: still two at once,
    # both from the slow share
    assert sorted(name for name, _ in holding) == ["slow 0", "slow 1"]
    assert {place.share for _, place in holding} == {queue._slow_share}
    for end in ends.values():
        end.set()
    await asyncio.wait_for(asyncio.gather(waited, *slow), 5)
    assert not holding


async def test_a_slow_destination_keeps_its_place_and_session_for_its_next_message(
    gateway_factory, world, quick_clock
):
    servers = await destinations(world, "slow", 71, data_delay=0.8)
    # one place for slow destinations, taken in turn - but for a handoff; sessions
    # stay idle 0.1 s only
    overrides = {"delivery.concurrency": 2, "delivery.reuse_idle_time": "100ms"}
    gw = await gateway_factory(world.config(overrides))
    async with smtp_client(gw) as client:
        for n in range(6):
            for d in (1, 2):
                await client.sendmail("doctor@clinic.test", [f"r{n}@slow{d}.test"], make_message())
    await wait_until(
        lambda: all(len(s.received) == 6 for s in servers), timeout=30, what="all twelve"
    )
    # each destination's next attempt took the place its last one gave back, ahead
    # of the other's waiting ones, and with it the session (idle for milliseconds)
    for server in servers:
        used = [m.connection for m in server.received]
        assert len(set(used)) <= 2, used


async def test_destinations_without_attempts_are_forgotten_after_a_while(
    gateway_factory, world, quick_clock, monkeypatch
):
    monkeypatch.setattr("gateway.queue.manager.FORGET_AFTER", 1.0)
    await world.mta("mx.quick.test", "127.0.0.73")
    world.dns.add("quick.test", "MX", "10 mx.quick.test.")
    slow = await world.mta("mx.slow.test", "127.0.0.74", data_delay=0.8)
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    later = await world.mta("mx.later.test", "127.0.0.75")
    world.dns.add("later.test", "MX", "10 mx.later.test.")
    gw = await gateway_factory(world.config({}))
    queue = gw.queue
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["r@quick.test", "r@slow.test"], make_message())
        await wait_until(lambda: len(slow.received) == 1, timeout=10, what="both delivered")
        await wait_until(lambda: not queue._started, timeout=5, what="their attempts ended")
        # what was learned stays; the places of destinations nobody waits for do not
        assert "quick.test" in queue._quick and "slow.test" in queue._slow
        assert "slow.test" in queue._slow_each
        assert not queue._per_domain and not queue._new_each
        await asyncio.sleep(1.2)
        # the next attempt's end looks: both have been idle longer than FORGET_AFTER
        await client.sendmail("doctor@clinic.test", ["r@later.test"], make_message())
    await wait_until(lambda: len(later.received) == 1, timeout=10, what="later.test's")
    await wait_until(lambda: not queue._started, timeout=5, what="its attempt ended")
    assert queue._quick == {"later.test"}
    assert not queue._slow and not queue._slow_each
    assert set(queue._idle_since) == {"later.test"}


async def test_a_slow_destination_is_quick_again_only_after_a_much_quicker_attempt(
    gateway_factory, world, quick_clock
):
    server = await world.mta("mx.slow.test", "127.0.0.76", data_delay=0.8)
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    gw = await gateway_factory(world.config({}))
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["r@slow.test"], make_message())
        await wait_until(lambda: len(server.received) == 1, timeout=10, what="the first")
        # a little quicker now: under QUICK (0.5 s), not under QUICK_AGAIN
        server.data_delay, server.most_in_data = 0.3, 0
        for n in range(12):
            await client.sendmail("doctor@clinic.test", [f"r{n}@slow.test"], make_message())
    await wait_until(lambda: len(server.received) == 13, timeout=30, what="all twelve")
    # still slow: its window - three after the first delivery - widened by one for
    # each attempt that delivered, so n running means n - 3 done: seven at most of
    # twelve; taken for quick after its first three, the other nine went at once
    assert server.most_in_data <= 7


async def test_attempts_queued_behind_one_quick_destination_do_not_hold_back_the_others(
    gateway_factory, world
):
    busy = await world.mta("mx.busy.test", "127.0.0.77", data_delay=0.5)
    world.dns.add("busy.test", "MX", "10 mx.busy.test.")
    other = await world.mta("mx.other.test", "127.0.0.78")
    world.dns.add("other.test", "MX", "10 mx.other.test.")
    overrides = {"delivery.concurrency": 4, "delivery.concurrency_per_destination": 2}
    gw = await gateway_factory(world.config(overrides))
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["r@busy.test"], make_message())
        await wait_until(lambda: len(busy.received) == 1, timeout=10, what="busy.test quick")
        for n in range(20):  # two at a time, half a second each: five seconds' worth
            await client.sendmail("doctor@clinic.test", [f"r{n}@busy.test"], make_message())
        await client.sendmail("doctor@clinic.test", ["r@other.test"], make_message())
    await wait_until(lambda: len(other.received) == 1, timeout=10, what="other.test's")
    # other.test's attempt started at once: not after busy.test's claimed attempts
    # (counted whole, eight of them, twice the places, left the claims no room)
    assert len(busy.received) <= 1 + 6


async def test_a_slow_destination_has_no_more_recipients_claimed_than_its_window(
    gateway_factory, world, quick_clock
):
    server = await world.mta("mx.slow.test", "127.0.0.79", data_delay=0.8)
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    gw = await gateway_factory(world.config({"delivery.concurrency_per_destination": 3}))
    started = gw.queue._started
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, started.get("slow.test", 0))
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        async with smtp_client(gw) as client:
            await client.sendmail("doctor@clinic.test", ["r@slow.test"], make_message())
            await wait_until(lambda: len(server.received) == 1, timeout=10, what="the first")
            for n in range(12):
                await client.sendmail("doctor@clinic.test", [f"r{n}@slow.test"], make_message())
        await wait_until(lambda: len(server.received) == 13, timeout=30, what="all twelve")
    finally:
        watcher.cancel()
    # its window is three at most: the other recipients stayed unclaimed in the
    # store (for this node's next claim, or another node's), not leased to wait here
    assert most <= 3
