"""A worker's ``queued`` line to the main process, with the message handed over.

A worker that kept a spooled message in memory sends its envelope (the canonical
JSON the spool file holds) and its bytes after the line, so the main process need not
read back what was just written.  These tests run a worker's side (`_Control`,
`_Recording`) and the main process's (`WorkerPool._listen`) over a real socket pair,
with messages committed to a real spool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.model import ClientInfo, Envelope, Recipient
from gateway.smtp import workers
from gateway.smtp.workers import WorkerPool, _Control, _Recording, _Worker
from gateway.spool import Spool, new_queue_id
from tests.conftest import load_test_config, write_config
from tests.support.world import wait_until


@dataclasses.dataclass
class _Line:
    """Both ends of a worker's control line; what the main process was told."""

    spool: Spool
    control: _Control  # the worker's end
    recording: _Recording
    proc: subprocess.Popen[bytes]  # stands in for the worker process
    listening: asyncio.Task[None]  # the main process's end
    queued: list[tuple[str, int, Envelope | None, bytes | None]]

    async def commit(self, data: bytes) -> tuple[Envelope, bytes | None]:
        """A message spooled as a worker spools one: its envelope, and its bytes
        when they were kept in memory (as `gateway.spool.submit` hands them on)."""
        writer = self.spool.writer(new_queue_id())
        await writer.write(data)
        env = await writer.commit(
            lambda size, sha: Envelope(
                queue_id=writer.queue_id,
                received_at="2026-12-06T22:00:00+00:00",
                mail_from="s@clinic.test",
                mail_options=(),
                recipients=(Recipient("r@example.test", ("NOTIFY=NEVER",)),),
                client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
                size=size,
                sha256=sha,
            )
        )
        return env, writer.message

    async def told(self, count: int) -> None:
        await wait_until(lambda: len(self.queued) >= count, timeout=5)


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[_Line]:
    spool = Spool(tmp_path / "spool", io_threads=1)
    spool.inline_commits = True  # as in a worker
    spool.open()
    queued: list[tuple[str, int, Envelope | None, bytes | None]] = []

    def on_queued(queue_id: str, size: int, env: Envelope | None, data: bytes | None) -> None:
        queued.append((queue_id, size, env, data))

    pool = WorkerPool(load_test_config(write_config(tmp_path, {})), None, on_queued)
    pool.stopping = True  # a worker that ends is not started again here
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(["sleep", "60"])
    worker = _Worker(0, proc)
    reader, worker.control = await asyncio.open_connection(sock=ours)
    control = await _Control.open(theirs)
    listening = asyncio.get_running_loop().create_task(pool._listen(worker, reader))
    yield _Line(spool, control, _Recording(False, control), proc, listening, queued)
    control.writer.close()
    proc.kill()
    await asyncio.wait_for(listening, 5)
    worker.control.close()
    spool.close()


async def test_a_message_kept_in_memory_is_handed_over_with_its_envelope(line):
    messages = [b"Subject: one\r\n\r\n" + b"x" * 4000 + b"\r\n", b"Subject: two\r\n\r\n.\r\n"]
    sent = [await line.commit(data) for data in messages]
    for env, data in sent:
        assert data is not None
        line.recording.queued(env, data)
    await line.told(2)
    for (env, data), (queue_id, size, got, got_data) in zip(sent, line.queued, strict=True):
        assert (queue_id, size, got_data) == (env.queue_id, env.size, data)
        assert got == env
        # the spool file's own bytes: what the archive journals
        assert got is not None and got.spooled_json is not None
        assert got.spooled_json == line.spool.read(env.queue_id)[0].spooled_json


async def test_a_message_is_announced_without_its_bytes_when_too_big_or_the_line_is_behind(
    line, monkeypatch
):
    """The main process then reads it from the spool: a worker's memory stays
    bounded however far behind the main process falls."""
    big, big_data = await line.commit(b"Subject: big\r\n\r\n" + b"y" * 3000 + b"\r\n")
    monkeypatch.setattr(workers, "HANDOVER_MAX", big.size - 1)
    line.recording.queued(big, big_data)
    monkeypatch.undo()
    behind, behind_data = await line.commit(b"Subject: later\r\n\r\nz\r\n")
    monkeypatch.setattr(workers, "HANDOVER_BACKLOG", 0)
    line.recording.queued(behind, behind_data)
    monkeypatch.undo()
    spilled, _ = await line.commit(b"Subject: spilled\r\n\r\nw\r\n")
    line.recording.queued(spilled, None)  # (its bytes went to disk as they came)
    after, after_data = await line.commit(b"Subject: after\r\n\r\nv\r\n")
    line.recording.queued(after, after_data)
    await line.told(4)
    assert [(q, s, e, d) for q, s, e, d in line.queued[:3]] == [
        (big.queue_id, big.size, None, None),
        (behind.queue_id, behind.size, None, None),
        (spilled.queue_id, spilled.size, None, None),
    ]
    assert line.queued[3] == (after.queue_id, after.size, after, after_data)


def _frame(message: dict[str, Any], payload: bytes) -> bytes:
    return json.dumps(message).encode() + b"\n" + payload


async def test_an_envelope_that_does_not_describe_its_message_is_read_from_the_spool(line):
    """Logged; the next line is read where it begins."""
    one, one_data = await line.commit(b"Subject: one\r\n\r\n1\r\n")
    two, two_data = await line.commit(b"Subject: two\r\n\r\n22\r\n")
    assert one.spooled_json is not None and two.spooled_json is not None and one_data
    broken = b"{" + one.spooled_json[1:-1]  # not JSON
    with capture_logs() as logs:
        for meta in (two.spooled_json, broken):  # another message's; not an envelope
            line.control.send(
                {
                    "type": "queued",
                    "queue_id": one.queue_id,
                    "size": one.size,
                    "envelope": len(meta),
                },
                meta + one_data,
            )
        line.recording.queued(two, two_data)
        await line.told(3)
    assert line.queued == [
        (one.queue_id, one.size, None, None),
        (one.queue_id, one.size, None, None),
        (two.queue_id, two.size, two, two_data),
    ]
    errors = [e for e in logs if e["event"] == "smtp.worker-handover-invalid"]
    assert [e["action"] for e in errors] == ["read from the spool"] * 2
    assert "does not describe it" in errors[0]["error"]
    assert "not valid" in errors[1]["error"]
    assert line.proc.poll() is None  # the worker goes on


@pytest.mark.parametrize(
    "bad", [{"envelope": -1}, {"envelope": "12"}, {"envelope": 10, "size": 10**9}]
)
async def test_a_line_whose_framing_is_lost_ends_the_worker(line, bad):
    """Where its next line begins cannot be known: the worker is ended (then started
    again, and what it spooled is looked for - `tests/e2e/test_workers.py`)."""
    env, _ = await line.commit(b"Subject: x\r\n\r\nx\r\n")
    message = {"type": "queued", "queue_id": env.queue_id, "size": env.size, **bad}
    with capture_logs() as logs:
        line.control.send(message, b"{}" * 20)
        await asyncio.wait_for(line.listening, 5)
    assert line.queued == []
    assert line.proc.wait(5) < 0  # killed
    [error] = [e for e in logs if e["event"] == "smtp.worker-handover-invalid"]
    assert error["action"] == "worker restarted"


async def test_a_worker_gone_in_the_middle_of_a_handover_announced_nothing(line):
    env, data = await line.commit(b"Subject: x\r\n\r\n" + b"x" * 100 + b"\r\n")
    assert env.spooled_json is not None and data is not None
    meta = env.spooled_json
    message = {"type": "queued", "queue_id": env.queue_id, "size": env.size, "envelope": len(meta)}
    line.control.send(message, meta + data[:50])
    line.control.writer.close()
    line.proc.kill()  # (its line closes as it dies)
    await asyncio.wait_for(line.listening, 5)  # ended, not failed
    assert line.queued == []
