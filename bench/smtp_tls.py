#!/usr/bin/env python3
"""The two ends of bench/relay_tls.py: a load generator and a recipient server, both
speaking SMTP with STARTTLS (``smtp-source`` and ``smtp-sink`` have no STARTTLS).

    smtp_tls.py source --port P --ca CA --messages N --sessions S --size B [--per-session K]
    smtp_tls.py sink --port P --cert CHAIN --key KEY --count FILE

``source`` opens ``--sessions`` connections at a time, each: greeting, EHLO,
STARTTLS (the server's certificate verified against ``--ca``, for the name
``127.0.0.1``), EHLO, then ``--per-session`` messages of ``--size`` bytes (MAIL,
RCPT, DATA), QUIT - until ``--messages`` are sent; it fails on any reply that is not
the expected one.  ``sink`` offers STARTTLS and PIPELINING, takes every message, and
appends a line per connection (``c``) and per message (``m``) to ``--count``, so
the reuse of sessions (messages per connection) is measured at the receiving end,
the same way for every sender.  Both run on uvloop, written for little CPU per
message: each is on the same two cores as what is measured, the same for Postfix
and for Sealgate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from pathlib import Path

import uvloop


def message(size: int) -> bytes:
    head = b"From: source@bench.test\r\nTo: sink@sink.test\r\nSubject: tls bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def _reply(reader: asyncio.StreamReader, expect: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(expect):
            raise RuntimeError(f"expected {expect!r}, got {line[:200]!r}")
        if line[3:4] != b"-":
            return


async def _session(
    port: int, ctx: ssl.SSLContext, messages: list[list[str]], body: bytes, stamp: bool
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader, b"220")
    writer.write(b"EHLO source.bench.test\r\n")
    await _reply(reader, b"250")
    writer.write(b"STARTTLS\r\n")
    await _reply(reader, b"220")
    await writer.start_tls(ctx, server_hostname="127.0.0.1")
    writer.write(b"EHLO source.bench.test\r\n")
    await _reply(reader, b"250")
    for rcpts in messages:
        writer.write(b"MAIL FROM:<source@bench.test>\r\n")
        await _reply(reader, b"250")
        for rcpt in rcpts:
            writer.write(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
            await _reply(reader, b"250")
        writer.write(b"DATA\r\n")
        await _reply(reader, b"354")
        sent = b"X-Bench-Sent: %.6f\r\n" % time.time() if stamp else b""
        writer.write(sent + body + b".\r\n")
        await _reply(reader, b"250")
    writer.write(b"QUIT\r\n")
    await _reply(reader, b"221")
    writer.close()


async def source(args: argparse.Namespace) -> None:
    """Every message to sink@sink.test, or (``--plan``: a JSON list of recipient
    lists) to the plan's recipients, each message stamped with the time it was sent
    (``X-Bench-Sent``, for `bench/world.py`'s latencies)."""
    ctx = ssl.create_default_context(cafile=args.ca)
    body = message(args.size)
    plan: list[list[str]] = (
        json.loads(Path(args.plan).read_text())
        if args.plan
        else [["sink@sink.test"]] * args.messages
    )
    plan.reverse()  # taken from the end: in order

    async def worker() -> None:
        while plan:
            group = [plan.pop() for _ in range(min(args.per_session, len(plan)))]
            await asyncio.wait_for(_session(args.port, ctx, group, body, bool(args.plan)), 300)

    await asyncio.gather(*(worker() for _ in range(args.sessions)))


class _Sink(asyncio.Protocol):
    """One connection: replies line by line (pipelined commands are answered in
    order), the message's lines skipped until the lone dot."""

    def __init__(self, ctx: ssl.SSLContext, count: int):
        self.ctx, self.count = ctx, count
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        os.write(self.count, b"c\n")
        self.transport.write(b"220 sink.bench.test ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    # keep what could be the start of the end marker
                    self.buffer = self.buffer[-4:]
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                os.write(self.count, b"m\n")
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                tls = self.transport.get_extra_info("sslcontext") is not None
                extensions = [b"PIPELINING", b"SIZE 104857600", b"8BITMIME"]
                if not tls:
                    extensions.append(b"STARTTLS")
                lines = [b"sink.bench.test", *extensions]
                replies.append(
                    b"".join(
                        b"250" + (b" " if i == len(lines) - 1 else b"-") + t + b"\r\n"
                        for i, t in enumerate(lines)
                    )
                )
            elif verb == b"STAR":
                self.transport.write(b"".join(replies) + b"220 2.0.0 Ready to start TLS\r\n")  # type: ignore[attr-defined]
                asyncio.get_running_loop().create_task(self._start_tls())
                return
            elif verb == b"DATA":
                # an end marker right after the 354 is the first line of the data
                self.buffer = b"\r\n" + self.buffer
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            self.transport.write(b"".join(replies))  # type: ignore[attr-defined]

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.ctx, server_side=True)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError):
            self.transport.close()


async def sink(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    count = os.open(args.count, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Sink(ctx, count), "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    src = sub.add_parser("source")
    src.add_argument("--port", type=int, required=True)
    src.add_argument("--ca", required=True)
    src.add_argument("--messages", type=int, default=3000)
    src.add_argument("--sessions", type=int, default=20)
    src.add_argument("--size", type=int, default=4096)
    src.add_argument("--per-session", type=int, default=1)
    src.add_argument("--plan", help="JSON: a list of recipient lists, one per message")
    snk = sub.add_parser("sink")
    snk.add_argument("--port", type=int, required=True)
    snk.add_argument("--cert", required=True)
    snk.add_argument("--key", required=True)
    snk.add_argument("--count", required=True)
    args = parser.parse_args()
    uvloop.run(source(args) if args.role == "source" else sink(args))  # a sink runs until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
