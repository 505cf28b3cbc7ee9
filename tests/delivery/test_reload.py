"""SIGHUP re-reads routes and TLS settings; sessions and the queue carry on."""

from __future__ import annotations

import asyncio
import json
import signal

import aiosmtplib
import yaml

from tests.conftest import client_tls, load_test_config, make_message, write_config
from tests.delivery.conftest import wait_until
from tests.e2e.daemon import Daemon


async def _send(daemon: Daemon, rcpt: str) -> None:
    async with daemon.smtp_client() as client:
        await client.sendmail("s@clinic.test", [rcpt], make_message())


async def test_sighup_applies_new_routes_and_rejects_a_bad_file(tmp_path, world, pki):
    old = await world.mta("old.partner.test", "127.0.0.51")
    new = await world.mta("new.partner.test", "127.0.0.52")
    base = world.config(
        {
            "delivery.retry_schedule": ["1s"],
            "delivery.reuse_idle_time": "60s",
            "smtp.workers": 2,
        }
    )
    path = write_config(tmp_path, {**base, "routes": {"partner.test": "old.partner.test"}})
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        async with aiosmtplib.SMTP(
            hostname=daemon.config.listen.smtp.host,
            port=daemon.config.listen.smtp.port,
            start_tls=True,
            tls_context=client_tls(),
            timeout=10,
        ) as open_session:
            await _send(daemon, "a@partner.test")
            await wait_until(lambda: old.received, what="delivery on the old route")

            data = yaml.safe_load(path.read_text())
            data["routes"] = {"partner.test": "new.partner.test"}
            path.write_text(yaml.safe_dump(data))
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: "app.reloaded" in daemon.log_path.read_text(), what="reload logged"
            )
            # the idle session was established under the old settings: closed, not reused
            await wait_until(lambda: old.quits == 1, what="idle session closed at reload")
            await _send(daemon, "b@partner.test")
            await wait_until(lambda: new.received, what="delivery on the new route")
            assert [m.rcpt_tos for m in old.received] == [["a@partner.test"]]

            path.write_text("routes: [not, a, mapping]\n")
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: "app.reload-failed" in daemon.log_path.read_text(),
                what="bad reload reported",
            )
            await _send(daemon, "c@partner.test")  # still running, still the new route
            await wait_until(lambda: len(new.received) == 2, what="delivery after bad reload")
            # a session opened before the reloads is still usable
            assert (await open_session.noop()).code == 250
        failed = [
            json.loads(line)
            for line in daemon.log_path.read_text().splitlines()
            if '"app.reload-failed"' in line
        ]
        assert "routes: expected a mapping" in failed[0]["error"]
        assert daemon.proc.poll() is None
    finally:
        daemon.kill()
