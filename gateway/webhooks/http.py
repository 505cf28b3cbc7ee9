"""http - a small HTTP/1.1 client for posting webhook events: kept-alive TLS
connections per endpoint, one request at a time on each.

Hand-written instead of aiohttp's client: an event is one POST with a few headers
whose answer is only its status, and aiohttp's general machinery cost about four
times the CPU per event (bench/integrations.py: the main process's share of each
event); an answer is parsed from the bytes as they arrive (`_parse`), without a
stream reader's call per line.  What it reads of an answer is bounded: the status
line and at most 100 header lines of 8 KiB, a body of at most 1 MiB (Content-Length
or chunked; read and dropped, so the connection can be used again) - an answer
without a length, or one with ``Connection: close``, ends the connection.  Of the
headers only ``Retry-After`` is handed on (in seconds, or as an HTTP date).  Names
resolve through the gateway's resolver (``dns.nameservers``); the certificate is
verified as for every HTTPS the gateway makes (system CAs plus ``tls.ca_file``, the
host name).
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from typing import NamedTuple, cast
from urllib.parse import urlsplit

from gateway.errors import SealgateError
from gateway.probe.dns import Resolver
from gateway.probe.https import addresses

MAX_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024


class HttpError(SealgateError):
    """Why no answer came (connection, TLS, a malformed answer)."""


class Answer(NamedTuple):
    status: int
    retry_after: float | None = None  # seconds the server asked the client to wait


class _Connection(asyncio.Protocol):
    """One TLS connection carrying one request at a time; the answer is parsed from
    what arrived as it arrives (`_parse`), without a reader layer between."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[Answer, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's TLS transport (uvloop's is no asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._answer is not None and not self._answer.done():
            self._settle(eof=False)
        elif len(self._buffer) > MAX_LINE:  # nothing asked for: not kept for it
            self.close()

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._settle(eof=True)

    def _settle(self, eof: bool) -> None:
        assert self._answer is not None
        try:
            parsed = _parse(self._buffer, eof)
        except HttpError as e:
            self._answer.set_exception(e)
            return
        if parsed is not None:
            answer, keep, used = parsed
            del self._buffer[:used]
            self._answer.set_result((answer, keep and not self.closed))
        elif eof:
            self._answer.set_exception(
                _Stale() if not self._buffer else HttpError("the answer is cut off")
            )

    async def request(self, data: bytes) -> tuple[Answer, bool]:
        """Send ``data``; the answer and whether the connection can carry another
        request.  _Stale: closed before any answer began."""
        assert self.transport is not None
        if self.closed or self._buffer:  # closed, or sent what nobody asked for
            raise _Stale
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


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

    async def post(self, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
        """POST ``body``; the answer.  HttpError when none came; a kept connection
        the server had closed meanwhile is replaced once."""
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
                    pass  # closed while idle: nothing was taken
            try:
                return await self._exchange(await self._open(), request)
            except _Stale:
                raise HttpError("the server closed the connection without an answer") from None

    async def _open(self) -> _Connection:
        try:
            ips = await addresses(self.host, self.resolver)
        except SealgateError as e:
            raise HttpError(str(e)) from None
        if not ips:
            raise HttpError(f"{self.host} has no address")
        loop = asyncio.get_running_loop()
        last: Exception | None = None
        for ip in ips:
            try:
                _, conn = await loop.create_connection(
                    _Connection, ip, self.port, ssl=self.ctx, server_hostname=self.host
                )
                return conn
            except ssl.SSLError as e:
                raise HttpError(f"TLS with {self.host} failed: {e}") from None
            except OSError as e:
                last = e
        raise HttpError(f"cannot connect to {self.host}:{self.port}: {last}")

    async def _exchange(self, conn: _Connection, request: bytes) -> Answer:
        try:
            answer, keep = await conn.request(request)
        except BaseException:  # also cancelled (the timeout): the connection is in no state
            conn.close()
            raise
        if keep and len(self._idle) < self.size:
            self._idle.append(conn)
        else:
            conn.close()
        return answer


class _Stale(Exception):
    """A kept connection that the server closed: try a new one."""


def _parse(buffer: bytearray, eof: bool) -> tuple[Answer, bool, int] | None:
    """The answer at the start of ``buffer``, whether the connection can carry
    another request, and how many bytes it took - or None while it is not all there
    (``eof``: nothing more will come).  HttpError for what is not an answer or is
    too large."""
    pos, status, keep = 0, 0, False
    headers: dict[str, str] = {}
    for n in range(MAX_HEADERS + 2):
        end = buffer.find(b"\n", pos, pos + MAX_LINE)
        if end < 0:
            _unfinished(buffer, pos)
            return None
        line, pos = bytes(buffer[pos : end + 1]), end + 1
        if n == 0:
            version, _, rest = line.decode("latin-1").strip().partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                raise HttpError(f"not an HTTP answer: {line[:60]!r}")
            status, keep = int(rest[:3]), version == "HTTP/1.1"
        elif line in (b"\r\n", b"\n"):
            break
        else:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError("the answer has too many header lines")
    keep = keep and headers.get("connection", "").lower() != "close"
    answer = Answer(status, _seconds(headers.get("retry-after")))
    if status in (204, 304) or 100 <= status < 200:
        return answer, keep, pos
    if "chunked" in headers.get("transfer-encoding", "").lower():
        used = _chunks(buffer, pos)
        return None if used is None else (answer, keep, used)
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpError("the answer's Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise HttpError("the answer's body is too large")
        return (answer, keep, pos + length) if len(buffer) >= pos + length else None
    # the body runs to the end of the connection (read no further than MAX_BODY)
    if eof or len(buffer) - pos >= MAX_BODY:
        return answer, False, len(buffer)
    return None


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After value (RFC 9110 10.2.3: seconds, or an HTTP date) as seconds
    from now; None when there is none or it makes no sense."""
    if not retry_after:
        return None
    if retry_after.isdigit():
        return float(retry_after)
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _chunks(buffer: bytearray, pos: int) -> int | None:
    """Where a chunked body that starts at ``pos`` ends (None: not all there)."""
    total = 0
    while True:
        end = buffer.find(b"\n", pos)
        if end < 0:
            _unfinished(buffer, pos)
            return None
        try:
            size = int(bytes(buffer[pos:end]).split(b";")[0].strip() or b"x", 16)
        except ValueError:
            raise HttpError("the answer's chunk size is not a number") from None
        total += size
        if size < 0 or total > MAX_BODY:
            raise HttpError("the answer's body is too large")
        pos = end + 1
        if size == 0:
            while True:  # trailers, to the empty line
                end = buffer.find(b"\n", pos)
                if end < 0:
                    _unfinished(buffer, pos)
                    return None
                line, pos = bytes(buffer[pos : end + 1]), end + 1
                if line in (b"\r\n", b"\n"):
                    return pos
        if len(buffer) < pos + size + 2:
            return None
        pos += size + 2


def _unfinished(buffer: bytearray, pos: int) -> None:
    """A line that has not ended yet: more is to come, unless it is too long."""
    if len(buffer) - pos >= MAX_LINE:
        raise HttpError("a line of the answer is cut off or too long")
