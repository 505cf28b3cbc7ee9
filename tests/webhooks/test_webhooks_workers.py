"""The daemon posts every webhook event, signed, each message's in order: without
SMTP worker processes from its main process (uvloop's event loop, not the test's);
with them from a process of its own, at the lowest priority (the main process
delivers and wakes it when it wrote some), apart from the SMTP workers."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from gateway.smtp.workers import WEBHOOK_NICE
from gateway.webhooks.events import new_secret
from tests.conftest import free_port, leaf_files, load_test_config, write_config
from tests.e2e.daemon import Daemon
from tests.support.webhooks import Receiver
from tests.support.world import wait_until


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_daemon_posts_every_event(tmp_path, world, pki, workers):
    mx = await world.mta("mx.dest.test", "127.0.0.41")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    leaf = pki.ca.issue_cert("hooks.ehr.test")
    chain, key = leaf_files(leaf, tmp_path, "hooks")
    world.dns.add("hooks.ehr.test", "A", "127.0.0.91")
    receiver = await Receiver("127.0.0.91", free_port(), (chain, key)).start()
    secret = new_secret()
    (tmp_path / "hook.secret").write_text(secret)
    endpoint = {
        "name": "ehr",
        "url": f"https://hooks.ehr.test:{receiver.port}/hooks",
        "secret_file": str(tmp_path / "hook.secret"),
    }
    path = write_config(
        tmp_path,
        world.config({"smtp.workers": workers, "webhooks.endpoints": [endpoint]}),
    )
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        async with daemon.smtp_client() as client:
            for i in range(5):
                await client.sendmail(
                    "s@clinic.test", [f"r{i}@dest.test"], b"Subject: x\r\n\r\nx\r\n"
                )
        await wait_until(lambda: len(mx.received) == 5, timeout=20, what="deliveries")
        await wait_until(lambda: len(receiver.received) == 10, timeout=20, what="ten events")
        events = receiver.verified(secret)
        by_message: dict[str, list[str]] = {}
        for e in events:
            by_message.setdefault(e["data"]["queue_id"], []).append(e["type"])
        assert len(by_message) == 5
        assert all(kinds == ["accepted", "delivered"] for kinds in by_message.values())
        assert '"level": "error"' not in daemon.log_path.read_text()
        children = subprocess.run(
            ["pgrep", "-f", "-a", "gateway.smtp.workers"], capture_output=True, text=True
        ).stdout.splitlines()
        ours = [line for line in children if str(tmp_path) in line]
        hooks = [line for line in ours if "--webhooks-only" in line]
        if workers == 1:
            assert ours == []  # the main process posted them
        else:
            assert len(ours) == 3 and len(hooks) == 1  # two SMTP workers and the poster
            pid = int(hooks[0].split()[0])
            threads = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            nice = {t: os.getpriority(os.PRIO_PROCESS, t) for t in threads}  # per thread
            # the posting after mail; the thread writing the outbox, in the queue's
            # database beside the main process's writer, not (it holds the lock)
            assert nice[pid] == WEBHOOK_NICE, nice
            assert sorted(nice.values()) == [0] + [WEBHOOK_NICE] * (len(threads) - 1), nice
    finally:
        daemon.kill()
        await receiver.stop()
