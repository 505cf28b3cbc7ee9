"""The ops HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 responder on asyncio streams (GET and HEAD, one request
per connection, bounded header size and time): the ops endpoints need nothing more,
and keeping a web framework out of the daemon's core keeps its attack surface small.

- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 when the SMTP listener is up and the spool is writable, else 503
  with the reason.
- ``/metrics``: Prometheus text format.

Nothing else: what serves message content or evidence is on the HTTPS API listener
(`gateway.api.server`), never here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

from gateway.config import HostPort
from gateway.events import Event
from gateway.observability.logging import get_logger

log = get_logger("gateway.http")

_MAX_HEAD = 8192
_TIMEOUT = 5.0


class OpsHttpServer:
    def __init__(
        self,
        listen: HostPort,
        render_metrics: Callable[[], bytes],
        readiness: Callable[[], str | None],
    ):
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
        # where it listens: the port taken, when ``listen.http`` names port 0 (the
        # server is asyncio's or uvloop's: both have ``sockets``)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            method, path = self._parse(head)
            status, ctype, body = self._route(method, path)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        except Exception as e:  # never let one request take the listener down
            log.error(Event.HTTP_ERROR, error=str(e)[:200])
            status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
        headers = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n"
        ).encode()
        try:
            writer.write(headers + (body if method != "HEAD" else b""))
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _parse(head: bytes) -> tuple[str, str]:
        """(method, path) of the request line; ValueError when malformed."""
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        for line in lines[1:]:
            if line and ":" not in line:
                raise ValueError("malformed header")
        return method, urlsplit(target).path

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
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
