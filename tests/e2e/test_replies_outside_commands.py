"""The replies the daemon writes outside a command - the idle timeout's and the
shutdown's 421 (RFC 5321 4.5.3.2, 3.8) - on both of its event loops: libuv's in the
SMTP worker processes and, with ``smtp.workers: 1``, in the main process (where
these replies were once skipped: its transport is no `asyncio.WriteTransport`)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon


@pytest.fixture(params=[1, 2], ids=["in-main-process", "in-workers"])
def daemon(request, tmp_path):
    path = write_config(tmp_path, {"smtp.workers": request.param, "smtp.command_timeout": "2s"})
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    d.start()
    yield d
    d.kill()


async def _greeted(d: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(d.smtp.host, d.smtp.port)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
    return reader, writer


async def test_an_idle_client_is_told_421_before_its_connection_is_closed(daemon):
    reader, writer = await _greeted(daemon)
    try:
        reply = await asyncio.wait_for(reader.readline(), 10)  # the timeout is 2 s
        assert reply.startswith(b"421 4.4.2 ")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed
    finally:
        writer.close()


async def test_a_client_connected_when_the_daemon_stops_is_told_421(daemon):
    reader, writer = await _greeted(daemon)
    try:
        stopped = asyncio.get_running_loop().run_in_executor(None, daemon.terminate)
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply.startswith(b"421 4.3.2 ")
        assert await stopped == 0
    finally:
        writer.close()
