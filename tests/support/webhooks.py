"""A webhook receiver on loopback: HTTPS with a certificate from the test CA, every
request kept (headers with lower-case names, body); ``status`` is what it answers
(with ``answer_headers``).
Stopped and started again on the same port, it is a receiver that was down."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from standardwebhooks import Webhook

from tests.support.net import abort


@dataclass
class Receiver:
    host: str
    port: int
    cert: tuple[Path, Path]
    status: int = 204
    answer_headers: dict[str, str] = field(default_factory=dict)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _transports: set = field(default_factory=set)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # A TLS connection still in its closing handshake when the test's loop ends
        # would never close its socket: cut every connection the receiver served.
        for transport in self._transports:
            abort(transport)
        self._transports.clear()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.transport is not None:
            self._transports.add(request.transport)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append((headers, await request.read()))
        return web.Response(status=self.status, headers=self.answer_headers)

    def verified(self, secret: str) -> list[dict]:
        """Every request's event, each checked with the Standard Webhooks library
        (raises on a bad signature)."""
        hook = Webhook(secret)
        return [hook.verify(body, headers) for headers, body in self.received]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP request from a raw server's stream: its head and its body (by its
    Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)
