"""``cluster.ack: local``: a message delivered at once never puts its content into the
shared store (only its record goes there); one still open a moment later
(`SHARE_AFTER`) does, and is counted as unshared until then - after that another
node can deliver it without this node's disk."""

from __future__ import annotations

import asyncio

from gateway.queue.manager import SHARE_AFTER
from gateway.storage.database import Database
from tests.cluster.support import shared_keys
from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until


def shared_flags(url: str, password: str) -> dict[str, tuple[int, int]]:
    """Sender -> (shared, has content) for every message in the queue's schema."""
    db = Database.postgresql(url, password, schema="sealgate_queue")
    try:
        rows = db.execute(
            "SELECT m.mail_from, m.shared, (SELECT count(*) FROM contents c "
            "WHERE c.queue_id = m.queue_id) FROM messages m"
        ).fetchall()
    finally:
        db.close()
    return {str(f): (int(s), int(c)) for f, s, c in rows}


async def test_only_what_is_still_open_a_moment_later_goes_to_the_shared_store(
    gateway_factory, world, postgres, tmp_path
):
    quick = await world.mta("mx.quick.test", "127.0.0.55")
    world.dns.add("quick.test", "MX", "10 mx.quick.test.")
    slow = await world.mta(
        "mx.slow.test", "127.0.0.56", rcpt_replies={"r@slow.test": "451 4.2.0 not now"}
    )
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    url, password = postgres.database(), postgres.password_file.read_text().strip()
    settings = {
        "storage.database": url,
        "storage.password_file": str(postgres.password_file),
        "storage.auto_migrate": True,
        "cluster.ack": "local",
        "delivery.retry_schedule": ["1s"],
        **shared_keys(tmp_path / "keys"),
    }
    gw_a = await gateway_factory(world.config({**settings, "cluster.node_id": "a"}))
    unshared = "sealgate_cluster_unshared_messages"
    async with smtp_client(gw_a) as client:
        await client.sendmail("quick@clinic.test", ["r@quick.test"], make_message())
        await client.sendmail("slow@clinic.test", ["r@slow.test"], make_message())
    assert gw_a.metrics.registry.get_sample_value(unshared) >= 1
    await wait_until(lambda: len(quick.received) == 1, what="the quick one delivered")
    await wait_until(
        lambda: gw_a.metrics.registry.get_sample_value(unshared) == 0,
        timeout=SHARE_AFTER + 10,
        what="the open one shared",
    )
    flags = await asyncio.to_thread(shared_flags, url, password)
    assert flags["quick@clinic.test"] == (0, 0)  # delivered at once: only its record
    assert flags["slow@clinic.test"] == (1, 1)  # still open: its content is shared
    assert slow.received == []

    # node a goes away; node b delivers the open one from the shared store
    await gw_a.stop(grace=1.0)
    slow.rcpt_replies.clear()
    await gateway_factory(
        world.config({**settings, "cluster.node_id": "b", "state_dir": str(tmp_path / "b")})
    )
    await wait_until(lambda: len(slow.received) == 1, timeout=30, what="node b delivered it")
    assert slow.received[0].rcpt_tos == ["r@slow.test"]
