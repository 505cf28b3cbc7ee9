"""http - a small HTTP/1.1 client for posting webhook events: kept-alive TLS
connections per endpoint, each carrying requests back to back (`Endpoint.post_all`:
pipelining, RFC 9112 9.3.2 - one write for several events, their answers read
together: a third of the CPU per event of one request at a time, for the client and
for the server).

Hand-written instead of aiohttp's client: an event is one POST with a few headers
whose answer is only its status, and aiohttp's general machinery cost about four
times the CPU per event (bench/integrations.py: the main process's share of each
event); answers are parsed from the bytes as they arrive (`_parse`), without a
stream reader's call per line, in order, an interim (1xx) one passed over.  What a
server did not take because it closed the connection after an answer
(``Connection: close``, or the end of the connection) is sent again on a new one
(an event carries its ``webhook-id``: a receiver that got one twice knows it); one
that answers the first of the requests sent back to back but not those behind it
in time is sent one at a time from then on (`Endpoint.pipelining`).  What it reads
of an answer is bounded: a head of at most 64 KiB, 100 header lines of 8 KiB, a
body of at most 1 MiB (Content-Length or chunked; read and dropped, so the
connection can be used again) - an answer without a length, or one with
``Connection: close``, ends the connection.  Of the headers only ``Retry-After`` is
handed on (in seconds, or as an HTTP date).  Names resolve through the gateway's
resolver (``dns.nameservers``); the certificate is verified as for every HTTPS the
gateway makes (system CAs plus ``tls.ca_file``, the host name).
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast
from urllib.parse import urlsplit

from gateway.errors import SealgateError
from gateway.probe.dns import Resolver
from gateway.probe.https import addresses

MAX_LINE = 8192
MAX_HEADERS = 100
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
# the header fields an answer is read for (`_parse`); the others are passed over
_READ = frozenset({b"connection", b"content-length", b"transfer-encoding", b"retry-after"})


class HttpError(SealgateError):
    """Why no answer came (connection, TLS, a malformed answer)."""


class Answer(NamedTuple):
    status: int
    retry_after: float | None = None  # seconds the server asked the client to wait


class _Connection(asyncio.Protocol):
    """One TLS connection carrying requests back to back (pipelined: RFC 9112 9.3.2),
    whose answers are parsed in order from what arrived as it arrives (`_parse`),
    without a reader layer between."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._expected = 0  # answers still to come for the requests sent
        self._answers: list[Answer] = []  # those come, not yet handed on
        self._error: Exception | None = None  # why no more will come
        self._changed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's TLS transport (uvloop's is no asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._expected:
            self._take(eof=False)
        elif len(self._buffer) > MAX_LINE:  # nothing asked for: not kept for it
            self.close()

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        self.closed = True
        if self._expected:
            self._take(eof=True)

    def _take(self, eof: bool) -> None:
        """The answers that are all there, in order; an interim (1xx) one is passed
        over.  After one that ends the connection (or at its end) no more come."""
        try:
            while self._expected and self._error is None:
                parsed = _parse(self._buffer, eof)
                if parsed is None:
                    if eof:
                        self._error = (
                            HttpError("the answer is cut off") if self._buffer else _Stale()
                        )
                    break
                answer, keep, used = parsed
                del self._buffer[:used]
                if 100 <= answer.status < 200:
                    continue
                self._answers.append(answer)
                self._expected -= 1
                if not keep:
                    self.close()
                    self._error = _Stale()  # the rest were not taken (RFC 9112 9.6)
        except HttpError as e:
            self._error = e
        if self._error is not None:
            self._expected = 0
        changed = self._changed
        if changed is not None and not changed.done() and (self._answers or self._error):
            changed.set_result(None)

    async def exchange(
        self, requests: Sequence[bytes], timeout: float
    ) -> tuple[list[Answer], Exception | None]:
        """Send ``requests`` back to back; the answers that came, in order, and why
        the rest got none (None: all answered).  _Stale: the connection ended (or
        said it would) before their answers began; TimeoutError: none came within
        ``timeout`` of the last one (or of sending)."""
        assert self.transport is not None
        if self.closed or self._buffer:  # closed, or sent what nobody asked for
            return [], _Stale()
        loop = asyncio.get_running_loop()
        self._expected, self._answers, self._error = len(requests), [], None
        self.transport.write(b"".join(requests))
        got: list[Answer] = []
        try:
            async with asyncio.timeout(timeout) as deadline:
                while self._expected or self._answers:
                    if not self._answers and self._error is None:
                        self._changed = loop.create_future()
                        await self._changed
                    got += self._answers
                    self._answers = []
                    deadline.reschedule(loop.time() + timeout)
                    if self._error is not None:
                        return got, self._error
        except TimeoutError as e:
            self.close()  # answers still owed: the connection is in no state
            return got, e
        except BaseException:  # cancelled: the same
            self.close()
            raise
        finally:
            self._changed = None
        return got, None

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
        # whether the server takes requests sent back to back (`post_all`): not when
        # it answered the first of them and not those behind it in time
        self.pipelining = True
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        self.close_soon()

    def close_soon(self) -> None:
        """Close the idle connections (those in use close when their answer came)."""
        idle, self._idle, self.size = self._idle, [], 0
        for conn in idle:
            conn.close()

    def request(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        """A POST of ``body`` to the URL, as sent."""
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.authority}",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    async def post(self, body: bytes, headers: Mapping[str, str], timeout: float) -> Answer:
        """POST ``body``; the answer.  HttpError or TimeoutError when none came."""
        answers, error = await self.post_all([self.request(body, headers)], timeout)
        if error is not None:
            raise error
        return answers[0]

    async def post_all(
        self, requests: Sequence[bytes], timeout: float
    ) -> tuple[list[Answer], Exception | None]:
        """Send ``requests`` (`request`) back to back on one connection; the answers
        that came, in order, and why the rest got none (HttpError, TimeoutError;
        None: all answered).  A kept connection the server had closed meanwhile is
        replaced; what a server did not take because it closed the connection after
        an answer (``Connection: close``) is sent again on a new one."""
        got: list[Answer] = []
        while len(got) < len(requests):
            reused = bool(self._idle)
            try:
                async with asyncio.timeout(timeout):
                    conn = self._idle.pop() if reused else await self._open()
            except (HttpError, TimeoutError) as e:
                return got, e
            sent = requests[len(got) :]
            answers, error = await conn.exchange(sent, timeout)
            got += answers
            if isinstance(error, TimeoutError) and answers and len(sent) > 1:
                self.pipelining = False
            if error is None and not conn.closed and len(self._idle) < self.size:
                self._idle.append(conn)
            else:
                conn.close()
            if isinstance(error, _Stale) and (answers or reused):
                continue  # nothing of the rest was taken: on another connection
            if isinstance(error, _Stale):
                return got, HttpError("the server closed the connection without an answer")
            if error is not None:
                return got, error
        return got, None

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


class _Stale(Exception):
    """A kept connection that the server closed: try a new one."""


def _parse(buffer: bytearray, eof: bool) -> tuple[Answer, bool, int] | None:
    """The answer at the start of ``buffer``, whether the connection can carry
    another request, and how many bytes it took - or None while it is not all there
    (``eof``: nothing more will come).  HttpError for what is not an answer or is
    too large."""
    head = _head(buffer)
    if head is None:
        return None
    status, keep, headers, pos = head
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


def _head(buffer: bytearray) -> tuple[int, bool, dict[str, str], int] | None:
    """The head of the answer at the start of ``buffer``: its status, whether it is
    HTTP/1.1, the header fields read (`_READ`, names in lower case) and where it
    ends - None while it is not all there (what is, is checked)."""
    end = _head_end(buffer)
    if end < 0:
        first_end = buffer.find(b"\n", 0, MAX_LINE)
        if first_end >= 0:
            _status(bytes(buffer[:first_end]))
        else:
            _unfinished(buffer, 0)
        if len(buffer) >= MAX_HEAD:
            raise HttpError("the answer's head is too long")
        return None
    head = bytes(buffer[:end])
    first, *fields = head.split(b"\n")
    if len(fields) > MAX_HEADERS:
        raise HttpError("the answer has too many header lines")
    if len(head) >= MAX_LINE and any(len(line) >= MAX_LINE for line in (first, *fields)):
        raise HttpError("a line of the answer is cut off or too long")
    status, http11 = _status(first)
    headers: dict[str, str] = {}
    for field in fields:
        name, _, value = field.partition(b":")
        name = name.strip().lower()
        if name in _READ:
            headers[name.decode()] = value.strip().decode("latin-1")
    return status, http11, headers, end + (3 if buffer[end + 1] == 13 else 2)  # "\n\r\n"


def _head_end(buffer: bytearray) -> int:
    """Where the last line of the head at the start of ``buffer`` ends (its
    newline), the empty line after it; -1 while there is none."""
    crlf = buffer.find(b"\n\r\n")
    lf = buffer.find(b"\n\n", 0, len(buffer) if crlf < 0 else crlf + 1)  # not past it
    return lf if lf >= 0 else crlf


def _status(line: bytes) -> tuple[int, bool]:
    """The status of an answer's first line, and whether it is HTTP/1.1."""
    version, _, rest = line.decode("latin-1").strip().partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise HttpError(f"not an HTTP answer: {line[:60]!r}")
    return int(rest[:3]), version == "HTTP/1.1"


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
