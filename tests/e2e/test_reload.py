"""SIGHUP re-reads routes, TLS settings and the policy; sessions and the queue carry on."""

from __future__ import annotations

import asyncio
import json
import signal

import yaml

from tests.conftest import load_test_config, make_message, run_sealgate, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import tls_only, wait_until


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
        async with daemon.smtp_client() as open_session:
            await _send(daemon, "a@partner.test")
            await wait_until(lambda: old.received, what="delivery on the old route")

            quits = old.quits  # the probe's connection ended with QUIT too
            data = yaml.safe_load(path.read_text())
            data["routes"] = {"partner.test": "new.partner.test"}
            path.write_text(yaml.safe_dump(data))
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: "app.reloaded" in daemon.log_path.read_text(), what="reload logged"
            )
            # the idle session was established under the old settings: closed, not reused
            await wait_until(lambda: old.quits == quits + 1, what="idle session closed at reload")
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


def _queue(daemon: Daemon) -> list[dict]:
    out = run_sealgate("queue", "list", "--json", "--state-dir", str(daemon.config.state_dir))
    return [json.loads(line) for line in out.stdout.splitlines()]


async def test_sighup_swaps_the_policy_and_a_bad_policy_keeps_the_old_one(tmp_path, world, pki):
    plain = await world.mta("mx.legacy.test", "127.0.0.53", cert=None)
    world.dns.add("legacy.test", "MX", "10 mx.legacy.test.")
    policy = tmp_path / "site-policy.yaml"
    policy.write_text(tls_only("verify"))
    settings = world.config(
        {"delivery.retry_schedule": ["1h"], "smtp.workers": 1, "policy.file": str(policy)}
    )
    path = write_config(tmp_path, settings)
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        await _send(daemon, "a@legacy.test")
        await wait_until(
            lambda: any(r["state"] == "held" for m in _queue(daemon) for r in m["recipients"]),
            what="held: no STARTTLS at verify",
        )
        (held,) = _queue(daemon)

        rule = (
            "  - name: legacy-lab\n    when: {recipient_domain: legacy.test}\n"
            "    then: {modes: [tls], tls_level: may}\n    stop: true\n"
        )
        policy.write_text(tls_only("verify", rules=rule))
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "app.reloaded" in daemon.log_path.read_text(), what="reloaded")
        run_sealgate(
            "queue", "retry", held["queue_id"], "--state-dir", str(daemon.config.state_dir)
        )
        await wait_until(lambda: plain.received, what="delivery under the new policy")

        policy.write_text("version: 1\nrules:\n  - name: x\n    then:\n      modes: [fax]\n")
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "app.reload-failed" in daemon.log_path.read_text(), what="bad policy reported"
        )
        await _send(daemon, "b@legacy.test")  # the rule of the last good policy still applies
        await wait_until(lambda: len(plain.received) == 2, what="delivery after the bad reload")
        failed = [
            json.loads(line)
            for line in daemon.log_path.read_text().splitlines()
            if '"app.reload-failed"' in line
        ]
        assert failed[0]["error"] == (
            f"{policy}:5: rules[x].then.modes: 'fax' is not one of: tls, smime, pgp, portal"
        )
        reloaded = [
            json.loads(line)
            for line in daemon.log_path.read_text().splitlines()
            if '"app.reloaded"' in line
        ]
        assert reloaded[0]["policy"].startswith("site-policy.yaml@")
        assert daemon.proc.poll() is None
    finally:
        daemon.kill()
