#!/usr/bin/env python3
"""An SMTP load at a set rate: the open-loop counterpart of ``smtp-source``.

    paced.py --port P --rate R [--messages N] [--sessions S] [--size B]

``smtp-source`` sends as fast as its sessions are answered (a closed loop): with
fewer sessions the load is lighter only if the server is not saturated, so it cannot
offer a given rate.  This one starts message k at ``k / R`` seconds, whatever the
server does - the way mail arrives from many senders - each, as ``smtp-source``
does, on a new connection: greeting, EHLO, MAIL, RCPT, DATA, the message, QUIT.  At
most ``--sessions`` connections are open at once; a message whose time has come
while all are busy starts when one is free, and that delay is reported (``late``):
a late start means the server could not keep up with the rate.

Prints one JSON object: messages sent, seconds, the rate achieved, how late the
starts were (p50, p99, worst, in ms) and the client's own view of acceptance
(the final dot to the 250, p50 and p99 in ms).  Any reply that is not the expected
one fails the run.  A `uvloop` event loop and one protocol object per connection:
little CPU per message, since it runs on the cores it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import uvloop
from smtp_tls import message  # the same message as bench/relay_tls.py's load

# (the reply code expected, what to send after it); the last step's reply ends it
STEPS = (
    (b"220", b"EHLO source.bench.test\r\n"),
    (b"250", b"MAIL FROM:<sender@bench.test>\r\n"),
    (b"250", b"RCPT TO:<rcpt@example.test>\r\n"),
    (b"250", b"DATA\r\n"),
    (b"354", None),  # the message
    (b"250", b"QUIT\r\n"),
    (b"221", None),
)
DOT = 4  # the step whose reply is the message's acceptance


class _Transaction(asyncio.Protocol):
    """One connection, one message: each reply checked, then the next command."""

    def __init__(self, body: bytes, done: asyncio.Future[float]):
        self.body, self.done = body, done
        self.step = 0
        self.buffer = b""
        self.dot_sent = 0.0
        self.accepted = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] == b"-":
                continue  # a multiline reply goes on
            expected, command = STEPS[self.step]
            if not line.startswith(expected):
                got = line[:200]
                self._fail(RuntimeError(f"step {self.step}: expected {expected!r}, got {got!r}"))
                return
            if self.step == DOT + 1:
                self.accepted = time.perf_counter() - self.dot_sent
            if self.step == DOT:
                self.dot_sent = time.perf_counter()
                self.transport.write(self.body + b".\r\n")
            elif command is not None:
                self.transport.write(command)
            self.step += 1
            if self.step == len(STEPS):
                self.transport.close()
                if not self.done.done():
                    self.done.set_result(self.accepted)
                return

    def _fail(self, error: BaseException) -> None:
        self.transport.abort()
        if not self.done.done():
            self.done.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError(f"closed at step {self.step}"))


async def run(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    body = message(args.size)
    slots = asyncio.Semaphore(args.sessions)
    late: list[float] = []
    accepted: list[float] = []

    async def one(scheduled: float) -> None:
        async with slots:
            late.append(max(0.0, loop.time() - scheduled))
            done: asyncio.Future[float] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: _Transaction(body, done), "127.0.0.1", args.port
            )
            try:
                accepted.append(await asyncio.wait_for(done, args.timeout))
            finally:
                transport.close()

    started = loop.time()
    tasks = []
    for k in range(args.messages):
        scheduled = started + k / args.rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    seconds = loop.time() - started

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "messages": args.messages,
        "seconds": seconds,
        "rate": args.messages / seconds,
        "late_p50_ms": ms(late, 0.5),
        "late_p99_ms": ms(late, 0.99),
        "late_max_ms": 1000 * max(late),
        "accepted_p50_ms": 1000 * statistics.median(accepted),
        "accepted_p99_ms": ms(accepted, 0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages a second")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20, help="connections open at most")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=120, help="seconds a message may take")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
