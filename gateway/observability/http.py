"""The ops HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 responder on asyncio streams (GET and HEAD, one request
per connection, bounded header size and time): the ops endpoints need nothing more,
and keeping a web framework out of the daemon's core keeps its attack surface small.

- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 when the SMTP listener is up and the spool is writable, else 503
  with the reason.
- ``/metrics``: Prometheus text format.
- ``/archive/...``: the archive API (`gateway.archive.api`), when tokens are set.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from gateway.config import HostPort
from gateway.events import Event
from gateway.observability.logging import get_logger

log = get_logger("gateway.http")

_MAX_HEAD = 8192
_MAX_BODY = 256 * 1024
_TIMEOUT = 5.0
_HANDLER_TIMEOUT = 300.0  # an export of many messages takes a while


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    peer: str


@dataclass(frozen=True)
class Response:
    status: str
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class OpsHttpServer:
    def __init__(
        self,
        listen: HostPort,
        render_metrics: Callable[[], bytes],
        readiness: Callable[[], str | None],
        api: Handler | None = None,
    ):
        self.api = api  # serves /archive/...
        self.listen = listen
        self.render_metrics = render_metrics
        self.readiness = readiness  # returns None when ready, else the reason
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = (listen.host, listen.port)  # at start: the port taken

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            host=self.listen.host,
            port=self.listen.port,
            reuse_address=True,
            limit=_MAX_HEAD,
        )
        assert isinstance(self._server, asyncio.Server)
        # where it listens: the port taken, when ``listen.http`` names port 0
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        extra: dict[str, str] = {}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            request = self._parse(head, writer)
            method = request.method
            length = int(request.headers.get("content-length", "0"))
            if not 0 <= length <= _MAX_BODY:
                raise ValueError("body too large")
            if length:
                body = await asyncio.wait_for(reader.readexactly(length), _TIMEOUT)
                request = dataclasses.replace(request, body=body)
            if self.api is not None and (
                request.path == "/archive" or request.path.startswith("/archive/")
            ):
                r = await asyncio.wait_for(self.api(request), _HANDLER_TIMEOUT)
                status, ctype, body, extra = r.status, r.content_type, r.body, r.headers
            else:
                status, ctype, body = self._route(request)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        except Exception as e:  # never let one request take the listener down
            log.error(Event.HTTP_ERROR, error=str(e)[:200])
            status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
        headers = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            + "\r\n"
        ).encode()
        try:
            writer.write(headers + (body if method != "HEAD" else b""))
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _parse(head: bytes, writer: asyncio.StreamWriter) -> Request:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError("malformed header")
                headers[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        peer = writer.get_extra_info("peername")
        return Request(
            method,
            url.path,
            dict(parse_qsl(url.query)),
            headers,
            b"",
            str(peer[0]) if peer else "",
        )

    def _route(self, request: Request) -> tuple[str, str, bytes]:
        method, path = request.method, request.path
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render_metrics(),
            )
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            reason = self.readiness()
            if reason is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"{reason}\n".encode()
        return "404 Not Found", "text/plain", b"not found\n"
