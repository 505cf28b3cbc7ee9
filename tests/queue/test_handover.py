"""Messages handed to the queue with their bytes (by the SMTP listener in the main
process, DSNs, the portal) are not read back from the spool; while the queue's
database falls behind, the bytes it holds for them stay bounded."""

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
