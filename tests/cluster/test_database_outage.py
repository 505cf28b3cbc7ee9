"""PostgreSQL stopped and started under load: with ``cluster.ack: shared`` the
listener answers 451 4.3.0 while it is away (nothing acknowledged that is not in
the shared store); with ``ack: local`` it keeps accepting and records what it
acknowledged when the database is back; deliveries pause meanwhile.  Either way
every acknowledged message is delivered."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until


async def send(gw, i: int) -> bool:
    """True when acknowledged (250)."""
    try:
        async with smtp_client(gw) as client:
            await client.sendmail("doctor@clinic.test", [f"m{i}@dest.test"], make_message())
        return True
    except aiosmtplib.SMTPResponseException as e:
        assert e.code == 451 and "4.3.0" in e.message, (e.code, e.message)
        return False


@pytest.mark.parametrize("ack", ["shared", "local"])
async def test_nothing_is_lost_when_the_database_goes_away_and_comes_back(
    gateway_factory, world, pki, postgres, tmp_path, ack
):
    mta = await world.mta("mx.dest.test", "127.0.0.52")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await gateway_factory(
        world.config(
            {
                "storage.database": postgres.database(),
                "storage.password_file": str(postgres.password_file),
                "storage.auto_migrate": True,
                "cluster.ack": ack,
                "delivery.retry_schedule": ["1s"],
            }
        )
    )
    acknowledged = {i for i in range(10) if await send(gw, i)}
    assert acknowledged == set(range(10))
    await asyncio.to_thread(postgres.stop)
    try:
        during = {i for i in range(10, 20) if await send(gw, i)}
        errors = "sealgate_storage_errors_total"
        await wait_until(
            lambda: (gw.metrics.registry.get_sample_value(errors) or 0) > 0,
            what="the outage noticed",
        )
    finally:
        await asyncio.to_thread(postgres.start)
    if ack == "shared":
        assert during == set()  # 451: the senders keep them and try again
    else:
        assert during == set(range(10, 20))  # accepted, recorded once it is back
        assert gw.metrics.registry.get_sample_value("sealgate_cluster_unshared_messages") > 0
    acknowledged |= during
    acknowledged |= {i for i in range(20, 25) if await send(gw, i)}
    assert set(range(20, 25)) <= acknowledged

    def delivered() -> set[str]:
        return {r for m in mta.received for r in m.rcpt_tos}

    await wait_until(
        lambda: {f"m{i}@dest.test" for i in acknowledged} <= delivered(),
        timeout=60,
        what="every acknowledged message delivered",
    )
    refused = {f"m{i}@dest.test" for i in set(range(25)) - acknowledged}
    assert not refused & delivered()  # what got a 451 was not sent
    await wait_until(
        lambda: gw.metrics.registry.get_sample_value("sealgate_cluster_unshared_messages") == 0,
        what="nothing unshared",
    )
