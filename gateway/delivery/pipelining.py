"""pipelining - MAIL, RCPT and DATA sent together (RFC 2920).

To a server that offers PIPELINING, a transaction's commands up to DATA go out in
one write and their replies are read in order: one round trip instead of one per
command, which is most of a delivery's time to a distant or slow server (and a
write, a wake-up and a timer fewer per command here).  DATA is the last command of
the group, as the RFC requires; the message follows once its 354 is read.

aiosmtplib reads one reply per command it wrote itself and drops what arrives in
between, so while a group's replies come in, the session's transport is lent to a
`_Replies` protocol of ours and then given back (``set_protocol``: asyncio's and
uvloop's transports, plain or TLS).  If the connection ends meanwhile, the session's
own protocol is told, as if it had been listening.
"""

from __future__ import annotations

import asyncio
from collections import deque

import aiosmtplib

MAX_REPLY_LINE = 1000  # RFC 5321 4.5.3.1.5: 512; generous, but bounded
MAX_PENDING = 64 * 1024  # bytes of a reply not yet complete


async def pipelined(smtp: aiosmtplib.SMTP, commands: list[bytes]) -> list[aiosmtplib.SMTPResponse]:
    """Send ``commands`` (without their CRLF) in one write; their replies, in order.
    Raises `aiosmtplib.SMTPServerDisconnected` if the connection ends first,
    `aiosmtplib.SMTPReadTimeoutError` (a `TimeoutError`) after ``smtp.timeout``
    without the next reply."""
    for command in commands:
        if b"\r" in command or b"\n" in command:
            raise ValueError("an SMTP command with a line break")
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    replies = _Replies(protocol)
    transport.set_protocol(replies)
    try:
        transport.write(b"".join(c + b"\r\n" for c in commands))  # type: ignore[attr-defined]
        return [await replies.next(smtp.timeout) for _ in commands]
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)


class _Replies(asyncio.Protocol):
    def __init__(self, session: asyncio.BaseProtocol):
        self.session = session  # the protocol the transport goes back to
        self.pending = bytearray()
        self.lines: list[bytes] = []
        self.replies: deque[aiosmtplib.SMTPResponse] = deque()
        self.changed = asyncio.Event()
        self.failed: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while (end := self.pending.find(b"\n")) >= 0 and self.failed is None:
            line = bytes(self.pending[: end + 1])
            del self.pending[: end + 1]
            if len(line) > MAX_REPLY_LINE or not line[:3].isdigit() or line[3:4] not in b" -\r\n":
                self.failed = aiosmtplib.SMTPResponseException(-1, "malformed SMTP reply")
                break
            self.lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":  # the reply's last line
                text = b"\n".join(self.lines).decode("utf-8", "surrogateescape")
                self.replies.append(aiosmtplib.SMTPResponse(int(line[:3]), text))
                self.lines = []
        if len(self.pending) > MAX_PENDING and self.failed is None:
            self.failed = aiosmtplib.SMTPResponseException(-1, "SMTP reply too long")
        self.changed.set()

    def eof_received(self) -> bool:
        self.failed = self.failed or aiosmtplib.SMTPServerDisconnected("unexpected EOF")
        self.changed.set()
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.failed = self.failed or aiosmtplib.SMTPServerDisconnected("connection lost")
        self.changed.set()
        self.session.connection_lost(exc)

    async def next(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        # A group's replies mostly arrive in one piece: the ones in already are
        # taken without a timer (of MAIL, RCPT, DATA: two timers fewer a message).
        if not self.replies:
            try:
                async with asyncio.timeout(timeout):
                    while not self.replies:
                        if self.failed is not None:
                            raise self.failed
                        self.changed.clear()
                        await self.changed.wait()
            except TimeoutError:  # said as aiosmtplib says it of the replies it reads
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None
        return self.replies.popleft()
