#!/usr/bin/env python3
"""The full hostile battery against the daemon on loopback (``make hostile``).

    .venv/bin/python bench/hostile.py [--seed 13] [--scale 1.0] [--json]

``sealgate run`` in a process of its own, with the shipped defaults (SMTP workers,
archive, portal) plus what the test world needs: the DNS fixture, recipient servers
with STARTTLS and a test CA (one answers 4xx for ever, one takes seconds), domains
whose DNS is silent, fails or answers garbage, ``relay.networks: 127.0.0.0/8``, an
archive API token, and ``delivery.max_queue_lifetime: 60s`` so that "nothing stuck
past the lifetime" is checked within the run.  Three phases:

1. about 2,900 seeded sessions of ``tests/hostile/battery.py`` (mutated command
   streams, hostile addresses and HELO names, MIME shapes, faults, slow clients,
   the hostile world, portal and archive-API attacks), 8 at a time;
2. a flood of 200 slow clients (one byte every 50 ms, from 200 addresses) while a
   normal client's transaction is timed, against the same client's time at rest;
3. ``kill -9`` of one SMTP worker while 10 clients send, without a restart: every
   message acknowledged by then must reach the queue (the main process restarts the
   worker and looks in the spool for what it acknowledged but could not announce);
4. ``kill -9`` of the daemon while 10 clients send, then a restart.

Then the check (`battery.check`, reading the daemon's queue state, archive and log):
the daemon answers, every message acknowledged with 250 is delivered, bounced (with
a DSN) or waiting with a reason, and archived; nothing is past the queue lifetime;
no error-level log line and no traceback.  Prints the figures the README's
"Robustness" section quotes; exits 1 if a target is missed.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402
import yaml  # noqa: E402

from gateway.archive.service import open_archive  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.queue.store import QueueStore  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.hostile import battery  # noqa: E402
from tests.support.dns import DnsFixture  # noqa: E402
from tests.support.mta import RecipientMta  # noqa: E402

FULL = {
    "mutation": 1100,
    "address": 700,
    "mime": 260,
    "fault": 400,
    "slow": 100,
    "world": 60,
    "web": 300,
}
TOKEN = "t-admin-hostile-bench-0123456789"  # noqa: S105 - a test token on loopback
FLOOD = 200


class Daemon(battery.Observed):
    """``sealgate run`` in a process of its own, observed through its files."""

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.path = root / "config.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.config = load_config(self.path)
        c = self.config
        self.smtp = (c.listen.smtp.host, c.listen.smtp.port)
        self.http = (c.listen.http.host, c.listen.http.port)
        self.portal = (c.portal.listen.host, c.portal.listen.port)
        self.api = (c.api.listen.host, c.api.listen.port)
        self.console = (c.console.listen.host, c.console.listen.port)
        self.lifetime = c.delivery.max_queue_lifetime
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._store: QueueStore | None = None
        self._archive: Any = None
        self.expected_errors: set[str] = set()  # log events a phase caused on purpose

    async def start(self) -> None:
        self.starts += 1
        out = open(self.root / f"daemon-{self.starts}.log", "wb")  # noqa: SIM115
        err = open(self.root / f"daemon-{self.starts}.err", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.path)],
            stdout=out,
            stderr=err,
            cwd=self.root,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = (self.root / f"daemon-{self.starts}.err").read_text()[-2000:]
                raise RuntimeError(f"the daemon exited ({self.process.returncode}): {said}")
            if await battery.http_status(*self.http, "/readyz") == 200:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the daemon did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self._store is not None:
            self._store.close()
        if self._archive is not None:
            self._archive.index.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _state(self) -> QueueStore:
        if self._store is None:
            self._store = QueueStore(self.config.state_dir / "queue.db")
        return self._store

    def message(self, queue_id: str) -> dict[str, Any] | None:
        return self._state().message(queue_id)

    def recipients(self, queue_id: str) -> list[Any]:
        return self._state().recipients(queue_id)

    def archived(self, queue_id: str) -> bool:
        if self._archive is None:
            self._archive = open_archive(self.config, "gw.sealgate.test", create=False)
        return bool(self._archive.has(queue_id))

    def _log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for path in sorted(self.root.glob("daemon-*.log")):
            for raw in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(raw))
        return lines

    def errors(self) -> list[str]:
        return [
            f"{e.get('event')} {e.get('error_type', '')}"
            for e in self._log_lines()
            if e.get("level") in ("error", "critical")
            and e.get("event") not in self.expected_errors
        ]

    def tracebacks(self) -> list[str]:
        found = [str(e.get("event")) for e in self._log_lines() if "exception" in e]
        for path in sorted(self.root.glob("daemon-*.err")):
            text = path.read_text(errors="replace")
            found += [f"{path.name}: Traceback"] * text.count("Traceback")
        return found


async def timed_normal(host: str, port: int, n: int) -> list[float]:
    return [await battery.normal_transaction(host, port) for _ in range(n)]


async def flood(daemon: Daemon) -> dict[str, Any]:
    """``FLOOD`` slow clients at once (a byte every 50 ms from their own addresses)
    while a normal client's transaction is timed; the same client at rest first."""
    host, port = daemon.smtp
    rest = await timed_normal(host, port, 10)
    stop = asyncio.Event()

    async def slow(n: int) -> None:
        source = f"127.0.1.{1 + n % 250}"
        with contextlib.suppress(Exception):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            await reader.readline()
            line = b"EHLO slow.test\r\nNOOP\r\n" * 50
            for i in range(len(line)):
                if stop.is_set():
                    break
                writer.write(line[i : i + 1])
                await asyncio.sleep(0.05)
            writer.close()

    slow_tasks = [asyncio.create_task(slow(n)) for n in range(FLOOD)]
    await asyncio.sleep(1.0)  # all connected and dribbling
    loaded = await timed_normal(host, port, 20)
    stop.set()
    await asyncio.gather(*slow_tasks)
    return {
        "slow_clients": FLOOD,
        "normal_ms_p50_at_rest": round(statistics.median(rest) * 1000, 1),
        "normal_ms_p50_in_flood": round(statistics.median(loaded) * 1000, 1),
        "normal_ms_max_in_flood": round(max(loaded) * 1000, 1),
    }


class Senders:
    """10 clients sending five messages a session, over and over, until stopped; what
    was acknowledged goes into the report."""

    def __init__(self, daemon: Daemon, report: battery.Report):
        self.daemon, self.report = daemon, report
        self.running = True
        self.tasks = [asyncio.create_task(self._send()) for _ in range(10)]

    async def _send(self) -> None:
        while self.running:
            session = battery.Session(*self.daemon.smtp)
            try:
                await session.open()
                await session.hello()
                for _ in range(5):
                    await session.transaction(b"a@clinic.test", b"k@tls.test", battery.message())
            except Exception:  # noqa: BLE001, S110 - the kill cuts them off
                pass
            finally:
                self.report.acknowledged += session.acknowledged
                await session.close()

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)


async def kill_a_worker_during_load(daemon: Daemon, report: battery.Report) -> dict[str, Any]:
    """10 clients send; one SMTP worker is killed with SIGKILL a second in, the others
    go on; the daemon is not restarted.  Every message acknowledged meanwhile must be
    known to the queue within 30 s (its worker announced it, or the main process
    found it in the spool)."""
    assert daemon.process is not None
    before = len(report.acknowledged)
    senders = Senders(daemon, report)
    await asyncio.sleep(1.0)
    children = subprocess.run(
        ["pgrep", "-P", str(daemon.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    os.kill(int(children[0]), signal.SIGKILL)
    daemon.expected_errors.add("smtp.worker-exited")
    await asyncio.sleep(1.0)
    await senders.stop()
    acknowledged = list(dict.fromkeys(report.acknowledged[before:]))
    deadline = time.monotonic() + 30
    while any(daemon.message(q) is None for q in acknowledged) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    unknown = [q for q in acknowledged if daemon.message(q) is None]
    report.problems += [f"{q}: acknowledged as a worker died, not queued" for q in unknown]
    adopted = sum(
        int(e.get("messages", 0))
        for e in daemon._log_lines()
        if e.get("event") == "queue.strays-adopted"
    )
    return {"acknowledged": len(acknowledged), "not_queued": len(unknown), "adopted": adopted}


async def kill_during_load(daemon: Daemon, report: battery.Report) -> dict[str, Any]:
    """10 clients send; the daemon is killed with SIGKILL a second in, then started
    again.  Every message acknowledged before the kill must be delivered later."""
    before = len(report.acknowledged)
    senders = Senders(daemon, report)
    await asyncio.sleep(1.0)
    daemon.kill()
    await senders.stop()
    acknowledged = len(report.acknowledged) - before
    await daemon.start()
    return {"acknowledged_before_kill": acknowledged}


async def main(seed: int, scale: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sealgate-hostile-") as tmp:
        root = Path(tmp)
        ca = trustme.CA()
        ca_file = root / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        dns = await DnsFixture().start()
        port = free_port()
        mtas: list[RecipientMta] = []

        async def mta(name: str, ip: str, **kwargs: Any) -> None:
            leaf = ca.issue_cert(name)
            chain, key = root / f"{name}.pem", root / f"{name}.key"
            leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
            leaf.private_key_pem.write_to_path(str(key))
            dns.add(name, "A", ip)
            mtas.append(await RecipientMta(ip, port, (chain, key), **kwargs).start())

        await mta("mx.tls.test", "127.0.0.41")
        await mta("mx.clinic.test", "127.0.0.42")
        dns.add("tls.test", "MX", "10 mx.tls.test.")
        dns.add("clinic.test", "MX", "10 mx.clinic.test.")
        await battery.hostile_world(dns, mta)
        daemon = Daemon(
            root,
            {
                "state_dir": str(root / "state"),
                "listen": {"smtp": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"},
                "portal": {"listen": f"127.0.0.1:{free_port()}"},
                "api": {"listen": f"127.0.0.1:{free_port()}"},
                "console": {"listen": f"127.0.0.1:{free_port()}"},
                "smtp": {"hostname": "gw.sealgate.test"},
                "relay": {"networks": ["127.0.0.0/8"]},
                "dns": {"nameservers": [dns.nameserver]},
                "delivery": {"port": port, "max_queue_lifetime": "60s", "retry_schedule": ["2s"]},
                "tls": {"ca_file": str(ca_file)},
                "archive": {
                    "api_tokens": [
                        {
                            "name": "bench-admin",
                            "role": "admin",
                            "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        }
                    ]
                },
            },
        )
        per_category = {k: max(1, round(n * scale)) for k, n in FULL.items()}
        summary: dict[str, Any] = {}
        try:
            await daemon.start()
            started = time.monotonic()
            web = battery.WebTargets(daemon.portal, daemon.api, TOKEN, daemon.console)
            report = await battery.run(*daemon.smtp, seed, per_category, web=web)
            summary["battery_seconds"] = round(time.monotonic() - started, 1)
            summary["flood"] = await flood(daemon)
            summary["worker_kill"] = await kill_a_worker_during_load(daemon, report)
            summary["kill"] = await kill_during_load(daemon, report)
            report.cases["worker kill-9 senders"] = 10
            report.cases["kill-9 senders"] = 10
            report.cases["slow-client flood"] = FLOOD
            await battery.check(daemon, report, timeout=120)
        finally:
            daemon.stop()
            for server in mtas:
                await server.stop()
            await dns.stop()
        summary.update(report.summary())
        summary["seed"] = seed
        summary["workers"] = os.cpu_count()
        return summary


def markdown(summary: dict[str, Any]) -> str:
    """The figures as the README's Robustness section shows them."""
    cases = summary["cases"]
    rows = ["| cases | sessions |", "|---|---:|"]
    rows += [f"| {name} | {cases[name]:,} |" for name in (*FULL, "slow-client flood")]
    rows.append(
        f"| kill -9 of an SMTP worker under load (senders) | {cases['worker kill-9 senders']} |"
    )
    rows.append(f"| kill -9 under load (senders) | {cases['kill-9 senders']} |")
    rows.append(f"| **total** | **{summary['total']:,}** |")
    flood = summary["flood"]
    outcome = [
        "",
        "| outcome | figure |",
        "|---|---:|",
        f"| messages acknowledged with 250 | {summary['acknowledged']:,} |",
        f"| of them acknowledged while a worker was killed / not queued without a restart | "
        f"{summary['worker_kill']['acknowledged']} / {summary['worker_kill']['not_queued']} |",
        f"| of them acknowledged just before `kill -9` | "
        f"{summary['kill']['acknowledged_before_kill']} |",
        f"| delivered or bounced with a DSN | {summary['delivered_or_bounced']:,} |",
        f"| crashes | {summary['crashes']} |",
        f"| acknowledged and lost | {summary['lost']} |",
        f"| acknowledged and not archived | {summary['unarchived']} |",
        f"| past `delivery.max_queue_lifetime` | {summary['stuck_past_lifetime']} |",
        f"| error-level log lines / tracebacks | "
        f"{summary['errors_logged']} / {summary['tracebacks']} |",
        f"| normal client, whole transaction, p50 at rest | {flood['normal_ms_p50_at_rest']} ms |",
        f"| the same among {flood['slow_clients']} slow clients: p50 / max | "
        f"{flood['normal_ms_p50_in_flood']} / {flood['normal_ms_max_in_flood']} ms |",
        f"| the same during the battery (8 hostile sessions at a time): p50 / max | "
        f"{summary['normal_client_ms_p50']} / {summary['normal_client_ms_max']} ms |",
    ]
    return "\n".join(rows + outcome)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full run")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the README's Robustness figures"
    )
    args = parser.parse_args()
    # the battery's own clients write after the daemon hung up on them: asyncio warns
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    summary = asyncio.run(main(args.seed, args.scale))
    met = not summary["problems"] and all(
        summary[k] == 0
        for k in ("crashes", "lost", "unarchived", "stuck_past_lifetime", "tracebacks")
    )
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=1))
        for problem in summary["problems"][:30]:
            print("PROBLEM", problem)
        print(
            "targets (0 crashes, lost, unarchived, stuck, tracebacks):", "met" if met else "MISSED"
        )
    if args.markdown:
        print(markdown(summary))
    sys.exit(0 if met else 1)
