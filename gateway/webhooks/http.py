"""http - a small HTTP/1.1 client for posting webhook events: kept-alive TLS
connections per endpoint, one request at a time on each.

Hand-written instead of aiohttp's client: an event is one POST with a few headers
whose answer is only its status, and aiohttp's general machinery cost about four
times the CPU per event (bench/integrations.py: the main process's share of each
event).  What it reads of an answer is bounded: the status line and at most 100
header lines of 8 KiB, a body of at most 1 MiB (Content-Length or chunked; read and
dropped, so the connection can be used again) - an answer without a length, or one
with ``Connection: close``, ends the connection.  Names resolve through the
gateway's resolver (``dns.nameservers``); the certificate is verified as for every
HTTPS the gateway makes (system CAs plus ``tls.ca_file``, the host name).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

from gateway.errors import SealgateError
from gateway.probe.dns import Resolver
from gateway.probe.https import addresses

MAX_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024


class HttpError(SealgateError):
    """Why no answer came (connection, TLS, a malformed answer)."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Endpoint:
    """The connections to one URL's host."""

    def __init__(self, url: str, ctx: ssl.SSLContext, resolver: Resolver, size: int = 16):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{url!r} is not an https:// URL")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 443
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.authority = parts.netloc.rpartition("@")[2]
        self.ctx, self.resolver, self.size = ctx, resolver, size
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        self.close_soon()

    def close_soon(self) -> None:
        """Close the idle connections (those in use close when their answer came)."""
        idle, self._idle, self.size = self._idle, [], 0
        for conn in idle:
            conn.close()

    async def post(self, body: bytes, headers: dict[str, str], timeout: float) -> int:
        """POST ``body``; the answer's status.  HttpError when none came; a kept
        connection the server had closed meanwhile is replaced once."""
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.authority}",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(timeout):
            while self._idle:
                conn = self._idle.pop()
                try:
                    return await self._exchange(conn, request)
                except _Stale:
                    conn.close()  # closed while idle: nothing was taken
            return await self._exchange(await self._open(), request, fresh=True)

    async def _open(self) -> _Connection:
        try:
            ips = await addresses(self.host, self.resolver)
        except SealgateError as e:
            raise HttpError(str(e)) from None
        if not ips:
            raise HttpError(f"{self.host} has no address")
        last: Exception | None = None
        for ip in ips:
            try:
                reader, writer = await asyncio.open_connection(
                    ip, self.port, ssl=self.ctx, server_hostname=self.host, limit=MAX_LINE * 2
                )
                return _Connection(reader, writer)
            except ssl.SSLError as e:
                raise HttpError(f"TLS with {self.host} failed: {e}") from None
            except OSError as e:
                last = e
        raise HttpError(f"cannot connect to {self.host}:{self.port}: {last}")

    async def _exchange(self, conn: _Connection, request: bytes, fresh: bool = False) -> int:
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            line = await conn.reader.readline()
            if not line:
                if not fresh:
                    raise _Stale
                raise HttpError("the server closed the connection without an answer")
            status, keep = await _answer(conn.reader, line)
        except (_Stale, HttpError):
            conn.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            conn.close()
            if not fresh and isinstance(e, ConnectionError):
                raise _Stale from None
            raise HttpError(f"{type(e).__name__}: {e}") from None
        except BaseException:  # cancelled (the timeout): the connection is in no state
            conn.close()
            raise
        if keep and len(self._idle) < self.size:
            self._idle.append(conn)
        else:
            conn.close()
        return status


class _Stale(Exception):
    """A kept connection that the server closed: try a new one."""


async def _answer(reader: asyncio.StreamReader, line: bytes) -> tuple[int, bool]:
    """The status of an answer whose status line is ``line``, its body read and
    dropped; whether the connection can carry another request."""
    version, _, rest = line.decode("latin-1").strip().partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise HttpError(f"not an HTTP answer: {line[:60]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n"):
            break
        if not raw or len(raw) > MAX_LINE:
            raise HttpError("the answer's header is cut off or too long")
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError("the answer has too many header lines")
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if status in (204, 304) or 100 <= status < 200:
        return status, keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        await _chunks(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= MAX_BODY:
            raise HttpError("the answer's body is too large")
        await reader.readexactly(length)
    else:  # the body runs to the end of the connection
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readexactly(MAX_BODY)
        keep = False
    return status, keep


async def _chunks(reader: asyncio.StreamReader) -> None:
    total = 0
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        total += size
        if total > MAX_BODY:
            raise HttpError("the answer's body is too large")
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        await reader.readexactly(size + 2)
