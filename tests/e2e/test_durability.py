"""No loss: every message answered 250 survives ``kill -9`` of the daemon, byte for byte."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest

from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon

N_MESSAGES = 120
CONNECTIONS = 6


@pytest.fixture(params=[1, 2], ids=["in-process", "2-workers"])
def daemon(tmp_path, request):
    path = write_config(tmp_path, {"smtp.workers": request.param})
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    yield d
    d.kill()


def _message(i: int, rng: random.Random) -> bytes:
    body = "".join(
        rng.choice(["x" * rng.randint(0, 900), ".dot", "", "é ü"]) + "\r\n"
        for _ in range(rng.randint(1, 200))
    )
    return (
        f"From: s@clinic.test\r\nTo: r{i}@example.test\r\nSubject: durable {i}\r\n"
        f"Message-ID: <{i}@clinic.test>\r\n\r\n{body}"
    ).encode()


async def _send_all(daemon: Daemon, messages: list[bytes]) -> dict[str, tuple[int, bytes]]:
    acked: dict[str, tuple[int, bytes]] = {}
    queue = list(enumerate(messages))

    async def worker() -> None:
        client = daemon.smtp_client(timeout=20)
        async with client:
            while queue:
                i, message = queue.pop(0)
                _, reply = await client.sendmail("s@clinic.test", [f"r{i}@example.test"], message)
                queue_id = reply.rsplit(" ", 1)[1]
                acked[queue_id] = (i, message)
                if len(acked) == len(messages):
                    daemon.kill()  # SIGKILL right after the last "250"
                    return

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)), return_exceptions=True)
    return acked


def _queue_list(config_path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "queue", "list", "--json", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


async def test_every_acknowledged_message_survives_kill_9_byte_for_byte(daemon):
    rng = random.Random(7)
    messages = [_message(i, rng) for i in range(N_MESSAGES)]
    daemon.start()
    acked = await _send_all(daemon, messages)
    assert len(acked) == N_MESSAGES
    assert daemon.proc.returncode == -9

    daemon.start()  # recovery at start: everything is found again
    assert daemon.terminate() == 0
    log = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    recovered = [e for e in log if e["event"] == "spool.recovered"]
    assert recovered[-1]["messages"] == N_MESSAGES
    assert recovered[-1]["corrupt"] == 0

    from gateway.spool.store import read_message

    listed = _queue_list(daemon.config_path)
    assert sorted(item["queue_id"] for item in listed) == sorted(acked)
    spool_dir = daemon.config.state_dir / "spool" / "queue"
    for queue_id, (i, sent) in acked.items():
        envelope, stored = read_message(spool_dir / queue_id, verify=True)
        assert stored == sent
        assert [r.address for r in envelope.recipients] == [f"r{i}@example.test"]
