"""Object storage unreachable: journaling is retried and the spool file of a
delivered message stays until its record is in the bucket; then it goes, and the
archive verifies."""

from __future__ import annotations

import asyncio

from tests.cluster.support import shared_keys
from tests.conftest import make_message, run_sealgate, smtp_client
from tests.support.s3 import start_s3
from tests.support.world import wait_until


async def test_mail_is_delivered_and_kept_in_the_spool_until_the_bucket_is_back(
    gateway_factory, world, pki, postgres, tmp_path
):
    s3 = await asyncio.to_thread(start_s3, tmp_path)  # an object store of this test's own
    servers = [s3]
    bucket = s3.bucket(object_lock=False)
    mta = await world.mta("mx.dest.test", "127.0.0.55")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    try:
        gw = await gateway_factory(
            world.config(
                {
                    "storage.database": postgres.database(),
                    "storage.password_file": str(postgres.password_file),
                    "storage.auto_migrate": True,
                    **s3.config(bucket, lock="off"),
                    **shared_keys(tmp_path / "keys"),
                }
            )
        )
        s3.process.kill()  # the object store goes away
        s3.process.wait(10)
        async with smtp_client(gw) as client:
            await client.sendmail("dr@clinic.test", ["r@dest.test"], make_message("Lab"))
        await wait_until(lambda: mta.received, what="delivered all the same")
        errors = "sealgate_archive_errors_total"
        await wait_until(
            lambda: (gw.metrics.registry.get_sample_value(errors) or 0) > 0,
            what="journaling failed",
        )
        await asyncio.sleep(1)
        assert len(list(gw.spool.queue_dir.iterdir())) == 1  # kept: not in the archive yet

        back = await asyncio.to_thread(start_s3, tmp_path, s3.port)  # on the same address
        servers.append(back)
        back.bucket(object_lock=False)  # an emulator forgets everything: the bucket again
        await wait_until(  # the archive tries again every few seconds
            lambda: not list(gw.spool.queue_dir.iterdir()), timeout=30, what="spool file gone"
        )
        await gw.stop()
        verified = await asyncio.to_thread(
            run_sealgate, "archive", "verify", "--config", str(tmp_path / "config.yaml")
        )
        assert verified.returncode == 0 and "archive OK" in verified.stdout, verified.stdout
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(10)
