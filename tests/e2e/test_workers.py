"""SMTP worker processes: shared listener, metrics summed in the main process, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.layout import StateLayout
from gateway.model import Purpose
from gateway.spool import Spool
from gateway.spool.submit import Submitter
from tests.conftest import load_test_config, make_message, run_sealgate, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import wait_until


@pytest.fixture
def daemon(tmp_path):
    path = write_config(tmp_path, {"smtp.workers": 2})
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    d.start()
    yield d
    d.kill()


def _get(d: Daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{d.http}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def _worker_pids(d: Daemon) -> list[int]:
    """The daemon's SMTP workers: its children running `gateway.smtp.workers` (not
    another child it may have for a moment, such as a gpg it runs to encrypt)."""
    out = subprocess.run(
        ["pgrep", "-P", str(d.proc.pid), "-f", "gateway.smtp.workers"],
        capture_output=True,
        text=True,
    )
    return sorted(map(int, out.stdout.split()))


async def _send(d: Daemon, count: int) -> None:
    for _ in range(count):  # a new connection each: both workers get some
        async with d.smtp_client() as client:
            await client.sendmail("s@clinic.test", ["r@example.test"], make_message())


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_two_workers_serve_and_the_main_process_sums_their_metrics(daemon):
    assert len(_worker_pids(daemon)) == 2
    await _send(daemon, 12)

    def counted() -> bool:
        text = _get(daemon, "/metrics")[1]
        accepted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sealgate_messages_accepted_total{")
        )
        return accepted == 12 and _sample(text, "sealgate_spool_messages") == 12

    _wait_for(counted)
    log = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    accepted = [e for e in log if e["event"] == "smtp.message-accepted"]
    assert len(accepted) == 12
    assert {e["worker"] for e in accepted} <= {0, 1}  # each line names its worker


async def test_a_worker_that_dies_is_restarted_and_counters_do_not_go_back(daemon):
    await _send(daemon, 4)
    _wait_for(
        lambda: "sealgate_acceptance_latency_seconds_count 4.0" in _get(daemon, "/metrics")[1]
    )
    victim = _worker_pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(
        lambda: (
            len(_worker_pids(daemon)) == 2
            and victim not in _worker_pids(daemon)
            and _get(daemon, "/readyz")[0] == 200
        )
    )
    await _send(daemon, 2)
    _wait_for(
        lambda: "sealgate_acceptance_latency_seconds_count 6.0" in _get(daemon, "/metrics")[1]
    )
    assert "smtp.worker-exited" in daemon.log_path.read_text()


async def test_sigterm_stops_the_workers_and_the_main_process_cleanly(daemon):
    workers = _worker_pids(daemon)
    assert daemon.terminate() == 0

    def gone(pid: int) -> bool:  # or a zombie waiting for its (exited) parent's reaper
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    _wait_for(lambda: all(gone(pid) for pid in workers))
    assert all(gone(pid) for pid in workers)


def test_workers_run_at_the_configured_lower_priority(tmp_path):
    def nice(pid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, pid)

    path = write_config(tmp_path, {"smtp.workers": 2, "smtp.worker_nice": 5})
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    d.start()
    try:
        workers = _worker_pids(d)
        assert len(workers) == 2
        assert [nice(pid) - nice(d.proc.pid) for pid in workers] == [5, 5]
    finally:
        d.kill()


def test_workers_run_at_the_main_process_priority_by_default(daemon):
    main = os.getpriority(os.PRIO_PROCESS, daemon.proc.pid)
    workers = _worker_pids(daemon)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in workers] == [main, main]


async def test_what_a_dead_worker_spooled_but_never_announced_is_delivered(tmp_path, world, pki):
    """A worker acknowledged a message (its spool file is durable), then died before
    its ``queued`` line reached the main process: the main process finds the file
    when the worker is gone, instead of leaving it until the next start."""
    mta = await world.mta("mx.dest.test", "127.0.0.44")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    path = write_config(tmp_path, world.config({"smtp.workers": 2}))
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(d.start)
    spool = Spool(StateLayout(d.config.state_dir).spool)
    spool.start_io()  # as a worker's: writes into the queue, announces nothing
    try:
        stray = await Submitter(spool, "gw.test", "X-Sealgate", lambda *_: None).submit(
            "s@clinic.test", ["r@dest.test"], make_message(), Purpose.MESSAGE
        )
        await asyncio.sleep(1.0)
        assert mta.received == []  # nobody knows of it
        victim = _worker_pids(d)[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: mta.received, timeout=20, what="the stray delivered")
        assert [m.rcpt_tos for m in mta.received] == [["r@dest.test"]]
        adopted = [
            json.loads(line)
            for line in d.log_path.read_text().splitlines()
            if '"queue.strays-adopted"' in line
        ]
        assert [(a["messages"], a["queue_ids"]) for a in adopted] == [(1, [stray])]
        metrics = _get(d, "/metrics")[1]
        assert _sample(metrics, "sealgate_smtp_worker_exits_total") == 1
        assert _sample(metrics, "sealgate_queue_strays_adopted_total") == 1
        # and it is done, as any message: its file gone, the archive has it
        await wait_until(lambda: not spool.path_of(stray).exists(), what="spool file removed")
        out = run_sealgate(
            "archive", "search", "--json", "--queue-id", stray, "--config", str(path)
        )
        assert [json.loads(line)["queue_id"] for line in out.stdout.splitlines()] == [stray]
    finally:
        spool.close()
        d.kill()
