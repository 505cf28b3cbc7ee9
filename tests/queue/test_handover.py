"""Messages handed to the queue with their bytes (by the SMTP listener in the main
process, DSNs, the portal) are not read back from the spool; while the queue's
database falls behind, the bytes it holds for them stay bounded, and a destination's
session place does not wait for it."""

from __future__ import annotations

import asyncio
import threading

from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until


async def test_bytes_held_for_messages_not_recorded_yet_are_bounded(
    gateway_factory, world, monkeypatch
):
    monkeypatch.setattr("gateway.queue.manager.CACHE_TOTAL_MAX", 10_000)
    mta = await world.mta("mx.dest.test", "127.0.0.45")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await gateway_factory(world.config())
    held = []
    release = threading.Event()
    gw.queue._db_thread.submit(release.wait, 30)  # the queue's database falls behind
    try:
        body = ("x" * 70 + "\r\n") * 42  # 3 KB
        async with smtp_client(gw) as client:
            for i in range(8):  # 3 KB each: at most three held at once
                await client.sendmail("s@clinic.test", [f"r{i}@dest.test"], make_message(body=body))
                held.append(gw.queue.handed_bytes)
    finally:
        release.set()
    assert max(held) <= 10_000 and held[2] > 6_000  # the first ones were held
    await wait_until(lambda: len(mta.received) == 8, what="every message delivered")
    await asyncio.sleep(0)
    assert gw.queue.handed_bytes == 0


async def test_a_destination_s_place_is_free_while_an_attempt_s_results_are_written(
    gateway_factory, world, monkeypatch
):
    """The session place is given back once the attempt is over, before its results are
    committed: a destination limited to one session at a time delivers the next message
    while the first one's results still wait for the queue's database (on PostgreSQL a
    commit can take milliseconds: held, the places capped the relay)."""
    from gateway.queue.manager import QueueManager

    mta = await world.mta("mx.one.test", "127.0.0.46")
    world.dns.add("one.test", "MX", "10 mx.one.test.")
    gw = await gateway_factory(world.config({"delivery.concurrency_per_destination": 1}))
    original = QueueManager._record
    writing, release = asyncio.Event(), asyncio.Event()

    async def slow_record(self, queue_id, records, now, **kw):  # type: ignore[no-untyped-def]
        if not writing.is_set():  # the first message's results wait
            writing.set()
            await release.wait()
        return await original(self, queue_id, records, now, **kw)

    monkeypatch.setattr(QueueManager, "_record", slow_record)
    try:
        async with smtp_client(gw) as client:
            await client.sendmail("s@clinic.test", ["a@one.test"], make_message())
            await asyncio.wait_for(writing.wait(), 10)  # delivered; its results held
            await client.sendmail("s@clinic.test", ["b@one.test"], make_message())
        await wait_until(lambda: len(mta.received) == 2, timeout=10, what="the second message")
        assert not release.is_set()  # the first one's results were still being written
    finally:
        release.set()
    store = gw.queue.store
    assert store is not None

    async def settled() -> bool:  # both recorded as delivered, nothing left to try
        return not any((await gw.queue._db(store.depth)).values())

    await wait_until(settled, timeout=10, what="both results recorded")


async def test_an_attempt_ending_while_a_round_runs_wakes_the_next_round(
    gateway_factory, world, monkeypatch
):
    """The claims' loop wakes when an attempt ends (room for the next claim) - also
    when it ends while a round is still under way (waiting for the store): that
    wake-up was lost, and recipients left for claims went one destination's room
    (20) a `POLL_INTERVAL` (on PostgreSQL, seconds of 20 messages a second at the end
    of a relay)."""
    monkeypatch.setattr("gateway.queue.manager.POLL_INTERVAL", 60.0)
    gw = await gateway_factory(world.config())
    queue = gw.queue
    rounds: list[int] = []
    second = asyncio.Event()

    async def a_round() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            queue._wake.set()  # an attempt ended meanwhile
        else:
            second.set()
        await asyncio.sleep(0.05)  # the store's answers

    monkeypatch.setattr(queue, "_round", a_round)
    queue._wake.set()  # the loop, waiting, runs the next round: ours
    await asyncio.wait_for(second.wait(), 10)  # not a POLL_INTERVAL later
    assert rounds[:2] == [0, 1]
