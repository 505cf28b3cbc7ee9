"""At-least-once: kill -9 of the daemon in the middle of deliveries loses nobody."""

from __future__ import annotations

import asyncio

from gateway.model import RecipientState
from gateway.queue.store import AttemptRecord, QueueStore
from tests.conftest import load_test_config, make_message, queued, smtp_client, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import wait_until


async def test_kill_9_during_delivery_then_restart_delivers_every_recipient(tmp_path, world, pki):
    slow = await world.mta("mx.dest.test", "127.0.0.41", data_delay=3.0)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    path = write_config(tmp_path, world.config({"delivery.retry_schedule": ["1s"]}))
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        rcpts = [f"r{i}@dest.test" for i in range(5)]
        async with daemon.smtp_client() as client:
            for rcpt in rcpts:
                await client.sendmail("s@clinic.test", [rcpt], make_message())
        await wait_until(lambda: slow.attempts >= 1, what="a delivery in progress")
        daemon.kill()  # SIGKILL while the recipient server is still in DATA
        assert slow.received == [] or len(slow.received) < len(rcpts)

        slow.data_delay = 0.0
        await asyncio.to_thread(daemon.start)
        delivered = lambda: {r for m in slow.received for r in m.rcpt_tos}  # noqa: E731
        await wait_until(
            lambda: delivered() == set(rcpts),
            timeout=30,
            what="every recipient delivered after restart",
        )
    finally:
        daemon.kill()


async def test_a_crash_after_the_last_result_but_before_the_bounce_is_finished_at_start(
    gateway_factory, world, pki
):
    """The last recipient's result was recorded, then the process died before the DSN
    and the spool removal: the next start finishes the message."""
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.42")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    config = world.config(
        {
            "delivery.retry_schedule": ["1h"],
            "routes": {"dest.test": "127.0.0.43"},  # nothing listens: deferred
        }
    )
    first = await gateway_factory(config)
    async with smtp_client(first) as client:
        await client.sendmail("s@clinic.test", ["r@dest.test"], make_message("Secret", "PHI\r\n"))
    (path,) = queued(first)
    queue_id = path.name
    await wait_until(
        lambda: [r.state for r in first.queue.store.recipients(queue_id)] == ["deferred"],
        what="deferred",
    )
    await first.stop()
    store = QueueStore(first.config.state_dir / "queue.db")  # what the crash left behind
    store.record(
        queue_id,
        [
            AttemptRecord(
                0, RecipientState.BOUNCED, "5.1.1", "550 5.1.1 no such user", None, 0, "bounced"
            )
        ],
    )
    store.close()

    second = await gateway_factory(config)
    await wait_until(lambda: sender_sink.received, what="the DSN")
    text = sender_sink.received[0].data.decode()
    assert "Status: 5.1.1" in text and "Secret" not in text and "PHI" not in text
    assert second.queue.store.message(queue_id)["done"] == 1
    await wait_until(lambda: queued(second) == [], what="the message and its DSN gone")


async def test_a_crash_after_the_last_delivery_but_before_the_spool_removal_is_cleaned_at_start(
    gateway_factory, world, pki
):
    mx = await world.mta("mx.dest.test", "127.0.0.44")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    config = world.config(
        {
            "delivery.retry_schedule": ["1h"],
            "routes": {"dest.test": "127.0.0.45"},  # nothing listens: deferred
        }
    )
    first = await gateway_factory(config)
    async with smtp_client(first) as client:
        await client.sendmail("s@clinic.test", ["r@dest.test"], make_message())
    (path,) = queued(first)
    await wait_until(
        lambda: [r.state for r in first.queue.store.recipients(path.name)] == ["deferred"],
        what="deferred",
    )
    await first.stop()
    store = QueueStore(first.config.state_dir / "queue.db")  # the delivery was recorded...
    store.record(
        path.name,
        [AttemptRecord(0, RecipientState.DELIVERED, "2.0.0", "250 ok", None, 0, "delivered")],
    )
    assert store.message(path.name)["done"] == 1
    store.close()
    assert path.exists()  # ...and the process died before removing the file

    del config["routes"]  # were it queued again, it would now reach mx.dest.test
    second = await gateway_factory(config)
    assert queued(second) == []
    await asyncio.sleep(1.5)
    assert mx.received == []  # delivered once is enough


async def test_stopping_during_a_delivery_closes_its_connection_and_records_nothing(
    gateway_factory, world, pki
):
    import gc
    import warnings

    slow = await world.mta("mx.dest.test", "127.0.0.46", data_delay=5.0)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await gateway_factory(world.config())
    async with smtp_client(gw) as client:
        await client.sendmail("s@clinic.test", ["r@dest.test"], make_message())
    await wait_until(lambda: slow.attempts == 1, what="a delivery in DATA")
    (path,) = queued(gw)
    await gw.stop(grace=0.2)  # the attempt is cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if "unclosed" in str(w.message)]
    store = QueueStore(gw.config.state_dir / "queue.db")
    assert [r.state for r in store.recipients(path.name)] == ["pending"]  # tried again later
    store.close()
    assert path.exists()
