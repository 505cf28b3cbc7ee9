"""A finished SMTP session's objects are freed when it ends, not by the garbage
collector's passes (gateway.smtp.server.GatewaySMTP._unlink)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from tests.conftest import RawSmtp
from tests.support.net import reset
from tests.support.world import wait_until


@pytest.mark.parametrize(
    "ending",
    [
        "QUIT",
        "QUIT after a message",
        "the client hangs up",
        "QUIT over TLS",
        "the client resets the connection mid-DATA",
    ],
)
async def test_a_finished_session_is_freed_by_reference_counting(gateway_factory, ending):
    gw = await gateway_factory({"relay.require_tls": False})
    s = await RawSmtp.open(gw)
    (protocol,) = gw.smtp.ctx.sessions
    session = weakref.ref(protocol)
    del protocol
    gc.collect()
    gc.disable()  # nothing but reference counting frees it now
    try:
        assert (await s.command("EHLO client.test")).startswith("250")
        if ending == "QUIT over TLS":
            await s.starttls()
            assert (await s.command("EHLO client.test")).startswith("250")
        if ending == "QUIT after a message":
            await s.begin_data()
            assert (await s.command("Subject: x\r\n\r\nbody\r\n.")).startswith("250")
        if ending.endswith("mid-DATA"):
            # the command loop is cancelled after connection_lost; the DATA handler's
            # cleanup must not arm a timer that holds the session (and fires on it)
            await s.begin_data()
            s.send(b"Subject: x\r\n\r\nhalf a mess")
            await asyncio.sleep(0.1)
            reset(s.writer)
        if ending.startswith("QUIT"):
            assert (await s.command("QUIT")).startswith("221")
            # the server hangs up first: nothing of the client's TLS is left closing
            # when the test's loop ends
            assert await asyncio.wait_for(s.reader.read(), 5) == b""
        await s.close()
        await wait_until(lambda: session() is None, timeout=5, what="the session freed")
    finally:
        gc.enable()
