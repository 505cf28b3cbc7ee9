"""server - the HTTPS API listener (``api.listen``, aiohttp over TLS).

APIs that hand out message content, evidence or the access record are served here
and nowhere else: never in plaintext, never beside ``/metrics`` (the ops listener
keeps ``/metrics``, ``/healthz`` and ``/readyz`` only).  A client that speaks plain
HTTP to this port gets no HTTP answer at all - the TLS handshake fails first.

- ``/archive/...``: the archive API (`gateway.archive.api`), when
  ``archive.api_tokens`` are set; 404 otherwise;
- ``/api/...``: the message API (`gateway.api.v1`) and its OpenAPI document.

Limits: request bodies up to 256 KiB (the archive API) or a message's size in
base64 and 1 MiB more (the message API), handlers up to 300 s (an export of many
messages takes a while).  A request aiohttp's parser refuses is one info line
(``api.bad-request``), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import Config, HostPort
from gateway.events import Event
from gateway.observability.logging import get_logger

log = get_logger("gateway.api")

MAX_BODY = 256 * 1024
PEER_HEADER = "x-sealgate-peer"  # the client's address, as a worker forwards a request
HANDLER_TIMEOUT = 300.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent: percent-encoded, without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    peer: str
    query_string: str = ""  # as sent (a name given twice: both)
    tls_version: str | None = None  # of the connection (not of a forwarded request)
    tls_cipher: str | None = None


@dataclass(frozen=True)
class Response:
    status: str  # "200 OK"
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class ServerLog(logging.Logger):
    """The logger aiohttp's request handler reports errors to.  A request the parser
    refuses (a 4xx: a header too long, a bad method, a broken body) is the client's
    doing: one info line, no traceback - any client could fill the error log
    otherwise.  Anything else is ours: an error with its type."""

    def __init__(self, name: str, bad_request: Event, error: Event) -> None:
        super().__init__(name)
        self._bad_request, self._error = bad_request, error
        self._events = get_logger(name)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 500) < 500:
            self._events.info(self._bad_request, status=error.code, error_type=type(error).__name__)
            return
        self._events.error(
            self._error,
            error_type=type(error).__name__ if error else None,
            error=str(error)[:200] if error else str(msg)[:200],
        )

    def debug(self, msg: object, *args: object, **kw: Any) -> None:
        pass  # aiohttp's debug lines (non-HTTP on the port) are not ours to keep


def api_cert_paths(config: Config, hostname: str) -> tuple[Path, Path]:
    """The API's certificate and key (`gateway.tls.listener_pair`)."""
    from gateway.tls import listener_pair

    return listener_pair(config, hostname, config.api.cert_file, config.api.key_file)


def api_tls(config: Config, hostname: str) -> ssl.SSLContext:
    from gateway.tls import server_context

    return server_context(*api_cert_paths(config, hostname))


class ApiServer:
    def __init__(
        self,
        listen: HostPort,
        tls: ssl.SSLContext,
        archive: Handler | None,
        messages: Handler | None = None,
        max_message: int = 0,
    ):
        self.listen, self.tls = listen, tls
        self.archive, self.messages = archive, messages
        # a message submitted as JSON: its attachments in base64 (4/3) and the rest
        self.max_body = max(MAX_BODY, max_message * 4 // 3 + 1024 * 1024)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] = (listen.host, listen.port)  # at start: the port taken
        self.internal = False  # on the Unix socket the workers forward to

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/archive", self._archive)
        # [\s\S]: any character, a percent-encoded line break in a path too
        app.router.add_route("*", r"/archive/{tail:[\s\S]*}", self._archive)
        app.router.add_route("*", r"/api/{tail:[\s\S]*}", self._messages)
        return app

    async def start(self, sock: socket.socket | None = None, unix: Path | None = None) -> None:
        """Listen on ``api.listen``, on ``sock`` (bound already: the workers share
        it), or on the Unix socket ``unix``: the workers' way to the main process,
        where the peer address comes from the worker (`PEER_HEADER`)."""
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            logger=ServerLog("gateway.api.http", Event.API_BAD_REQUEST, Event.API_ERROR),
        )
        await self._runner.setup()
        site: web.BaseSite
        if unix is not None:
            self.internal = True
            site = web.UnixSite(self._runner, str(unix))
            await site.start()
            unix.chmod(0o600)
            return
        if sock is not None:
            site = web.SockSite(self._runner, sock, ssl_context=self.tls)
        else:
            site = web.TCPSite(
                self._runner, self.listen.host, self.listen.port, ssl_context=self.tls
            )
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.address = (host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _archive(self, request: web.Request) -> web.StreamResponse:
        if self.archive is None:
            return web.json_response({"error": "the archive API is not configured"}, status=404)
        if (request.content_length or 0) > MAX_BODY:
            return web.json_response({"error": "the body is too large"}, status=413)
        return await self._answer(self.archive, request)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if self.messages is None:
            return web.json_response({"error": "the message API is not configured"}, status=404)
        return await self._answer(self.messages, request)

    async def _answer(self, handler: Handler, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.remote or ""
        if self.internal:  # from a worker, which names the client
            peer = headers.pop(PEER_HEADER, "")
        else:
            headers.pop(PEER_HEADER, None)
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        cipher = sslobj.cipher() if sslobj is not None else None
        ours = Request(
            request.method,
            request.rel_url.raw_path,
            dict(request.query.items()),
            headers,
            body,
            peer,
            request.rel_url.raw_query_string,
            sslobj.version() if sslobj is not None else None,
            cipher[0] if cipher else None,
        )
        answer = await asyncio.wait_for(handler(ours), HANDLER_TIMEOUT)
        headers = {
            "Content-Type": answer.content_type,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            **answer.headers,
        }
        return web.Response(status=int(answer.status[:3]), body=answer.body, headers=headers)
