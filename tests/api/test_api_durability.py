"""A 202 from the message API is a promise like SMTP's 250: the daemon killed with
SIGKILL right after it, the message is delivered once the daemon is back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.request

from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import wait_until

KEY = "sgk_durable-0123456789"


def submit(daemon: Daemon, body: dict) -> tuple[int, dict]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its self-signed certificate
    request = urllib.request.Request(
        f"https://{daemon.api}/api/v1/messages",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10, context=ctx) as r:  # noqa: S310 - loopback
        return r.status, json.loads(r.read())


async def test_kill_9_right_after_the_202_then_restart_delivers_it(tmp_path, world):
    slow = await world.mta("mx.dest.test", "127.0.0.41", data_delay=5.0)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    keys = [
        {"name": "ehr", "scopes": ["send"], "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    ]
    path = write_config(
        tmp_path, world.config({"delivery.retry_schedule": ["1s"], "api.keys": keys})
    )
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        message = {
            "from": "doctor@clinic.test",
            "to": ["r@dest.test"],
            "subject": "Results",
            "text": "Normal.",
        }
        status, body = await asyncio.to_thread(submit, daemon, message)
        assert status == 202
        daemon.kill()  # SIGKILL: nothing is flushed, nothing is closed
        assert slow.received == []
        slow.data_delay = 0.0
        await asyncio.to_thread(daemon.start)
        await wait_until(lambda: slow.received, timeout=30, what="delivery after the restart")
        (received,) = slow.received
        assert received.rcpt_tos == ["r@dest.test"]
        assert f"with HTTPS id {body['id']}".encode() in received.data
    finally:
        daemon.kill()
