"""Graceful shutdown: stop listening, let a message in DATA finish, then close."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import RawSmtp, queued


async def test_stop_lets_a_message_in_data_finish_and_refuses_new_connections(gateway_factory):
    gw = await gateway_factory({"relay.require_tls": False})
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    await s.writer.drain()
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(gw.stop(grace=5))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waiting for the message in DATA
    with pytest.raises((AssertionError, OSError)):
        await RawSmtp.open(gw)  # the listener is closed
    s.send(b"second half\r\n.\r\n")
    assert (await s.reply()).startswith("250 2.0.0")
    assert (await s.reply()).startswith("421 4.3.2")  # then the session is closed
    await asyncio.wait_for(stopping, 5)
    await s.close()
    assert len(queued(gw)) == 1
