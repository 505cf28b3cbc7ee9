"""At-least-once: kill -9 of the daemon in the middle of deliveries loses nobody."""

from __future__ import annotations

import asyncio

from tests.conftest import load_test_config, make_message, write_config
from tests.delivery.conftest import wait_until
from tests.e2e.daemon import Daemon


async def test_kill_9_during_delivery_then_restart_delivers_every_recipient(tmp_path, world, pki):
    slow = await world.mta("mx.dest.test", "127.0.0.41", data_delay=3.0)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    path = write_config(
        tmp_path,
        {
            "dns.nameservers": [world.dns.nameserver],
            "delivery.smart_host": None,
            "delivery.port": world.port,
            "tls.ca_file": str(pki.ca_file),
            "delivery.retry_schedule": ["1s"],
        },
    )
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
