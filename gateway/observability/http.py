"""The ops HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 responder on asyncio streams (GET and HEAD, one request
per connection, bounded header size and time): the ops endpoints need nothing more,
and keeping a web framework out of the daemon's core keeps its attack surface small.

- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 when the SMTP listener is up and the spool is writable, else 503
  with the reason.
- ``/metrics``: Prometheus text format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            host=self.listen.host,
            port=self.listen.port,
            reuse_address=True,
            limit=_MAX_HEAD,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            status, ctype, body, method = self._route(head)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body, method = "400 Bad Request", "text/plain", b"bad request\n", "GET"
        except Exception as e:  # never let one request take the listener down
            log.error(Event.HTTP_ERROR, error=str(e)[:200])
            status, ctype, body, method = (
                "500 Internal Server Error",
                "text/plain",
                b"error\n",
                "GET",
            )
        headers = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\n\r\n"
        ).encode()
        try:
            writer.write(headers + (body if method != "HEAD" else b""))
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _route(self, head: bytes) -> tuple[str, str, bytes, str]:
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
        method, target, _version = request_line.split(" ", 2)
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n", method
        if path == "/metrics":
            return (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render_metrics(),
                method,
            )
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n", method
        if path == "/readyz":
            reason = self.readiness()
            if reason is None:
                return "200 OK", "text/plain", b"ready\n", method
            return "503 Service Unavailable", "text/plain", f"{reason}\n".encode(), method
        return "404 Not Found", "text/plain", b"not found\n", method
