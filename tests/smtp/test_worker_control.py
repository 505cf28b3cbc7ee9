"""The control line from an SMTP worker to the main process: ``queued`` hands over the
bytes and envelope of a message that is not large, so the main process need not read
back from the spool what the worker had in memory."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import pytest

from gateway.config import load_config_text
from gateway.model import Purpose
from gateway.smtp.workers import (
    HAND_OVER_MAX,
    WorkerPool,
    _Control,
    _handed_over,
    _Recording,
    _Worker,
)
from gateway.spool import Spool
from gateway.spool.store import SPILL_THRESHOLD, read_message
from gateway.spool.submit import Submitter


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool", io_threads=2)
    s.open()
    s.start_io()
    yield s
    s.close()


async def test_queued_hands_over_what_the_spool_holds_and_announces_large_ones(spool):
    worker_end, main_end = socket.socketpair()
    control = await _Control.open(worker_end)
    reader, writer = await asyncio.open_connection(sock=main_end)
    submitter = Submitter(spool, "gw.test", "X-Sealgate", _Recording(False, control.send).queued)
    # a non-UTF-8 local part (as a client without SMTPUTF8 may send it): byte for byte
    recipients = ["b\udce9@example.net", "c@example.net"]
    small = b"Subject: x\r\n\r\n" + b".line\r\n{not json}\r\n" * 1000
    large = b"Subject: y\r\n\r\n" + b"z" * (max(HAND_OVER_MAX, SPILL_THRESHOLD) + 1)
    try:
        ids = [
            await submitter.submit("s@clinic.test", recipients, data, Purpose.MESSAGE)
            for data in (small, large)
        ]
        first = json.loads(await reader.readline())
        assert (first["type"], first["queue_id"]) == ("queued", ids[0])
        assert await _handed_over(first, reader) == read_message(spool.path_of(ids[0]))
        # announced alone: the main process reads it from the spool
        second = json.loads(await reader.readline())
        assert second == {"type": "queued", "queue_id": ids[1], "size": len(large)}
        assert await _handed_over(second, reader) == (None, None)
    finally:
        writer.close()
        control.writer.close()


async def test_a_worker_dying_while_it_hands_a_message_over_leaves_it_to_the_spool(tmp_path):
    """The line arrived, the bytes did not all: the message is queued all the same
    (read from the spool, where it is durable)."""
    announced = []
    pool = WorkerPool(
        load_config_text(f"state_dir: {tmp_path}\n"),
        None,
        lambda *args: announced.append(args),
    )
    pool.stopping = True  # no restart after the end of the line
    reader = asyncio.StreamReader()
    reader.feed_data(b'{"type":"queued","queue_id":"18T8GGR081BDYBFN","size":4096,')
    reader.feed_data(b'"data":4096,"envelope":300}\n' + b"x" * 1000)
    reader.feed_eof()
    gone = subprocess.Popen(["true"])  # the worker's process, exited
    await pool._listen(_Worker(0, gone), reader)
    assert announced == [("18T8GGR081BDYBFN", 4096, None, None)]


async def test_while_the_main_process_does_not_read_messages_are_announced_alone(
    spool, monkeypatch
):
    monkeypatch.setattr("gateway.smtp.workers.HAND_OVER_BACKLOG", 600_000)
    worker_end, main_end = socket.socketpair()
    control = await _Control.open(worker_end)
    reader, writer = await asyncio.open_connection(sock=main_end)
    submitter = Submitter(
        spool, "gw.test", "X-Sealgate", _Recording(False, control.send, control.unsent).queued
    )
    data = b"Subject: x\r\n\r\n" + b"y" * 200_000
    try:
        for _ in range(8):  # nobody reads meanwhile
            await submitter.submit("s@clinic.test", ["r@example.net"], data, Purpose.MESSAGE)
        assert control.unsent() < 600_000 + 300_000  # what waits unsent stays bounded
        handed = []
        for _ in range(8):
            line = json.loads(await reader.readline())
            handed.append((await _handed_over(line, reader))[1] is not None)
        assert handed[0] and not handed[-1]
    finally:
        writer.close()
        control.writer.close()
