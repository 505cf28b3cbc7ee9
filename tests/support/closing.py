"""SMTP clients that a test has finished with, closed before the test ends.

Over STARTTLS, a client's ``close()`` starts the TLS shutdown and the socket closes a
few turns of the event loop later.  When the test's loop closes first, the socket is
garbage-collected in a later test as an unclosed transport (a ResourceWarning, which
this suite turns into an error in whichever test it lands).
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import TracebackType

import aiosmtplib

CLOSE_WITHIN = 5.0  # seconds: a loopback TLS shutdown takes a few loop turns


async def socket_closed(sock: socket.socket | None, timeout: float = CLOSE_WITHIN) -> bool:
    """Wait until ``sock`` (a transport's ``get_extra_info("socket")``) has closed;
    False if it is still open after ``timeout``, and the warning then names the test."""
    deadline = time.monotonic() + timeout
    while sock is not None and sock.fileno() != -1:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def socket_of(client: aiosmtplib.SMTP) -> socket.socket | None:
    transport = client.transport
    return transport.get_extra_info("socket") if transport is not None else None


class ClosingSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, whose ``async with`` ends once its socket has closed."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        sock = socket_of(self)
        try:
            await super().__aexit__(exc_type, exc, traceback)
        finally:
            await socket_closed(sock)
