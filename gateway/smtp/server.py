"""smtp - the inbound listener: accept mail from authorized clients, durably.

Built on aiosmtpd.  `GatewaySMTP` (one per connection) adds what the library lacks:
connection limits, a 421 on timeout, and its own DATA phase (`gateway.smtp.data`)
that streams to the spool instead of buffering the message.  `Handler` holds the
per-command policy: STARTTLS before MAIL, SIZE, relay authorization at RCPT,
recipient limits, AUTH after TLS.

Replies come from `gateway.smtp.replies`.  Temporary problems (spool, internal
errors) get 4xx so the client retries; nothing is ever answered 250 before the spool
says the message is on disk.  Logs carry no subject or body, and addresses only as
configured (`logging.addresses`).

RFCs: 5321 (SMTP), 3207 (STARTTLS), 4954 (AUTH), 1870 (SIZE), 6152 (8BITMIME),
6531 (SMTPUTF8), 2034/3463 (enhanced status codes), 2920 (PIPELINING), 3848
(Received "with" protocol names), 3461 (DSN) and 8689 (REQUIRETLS): the parameters
of these two are taken out before aiosmtpd reads the command.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime
import email.utils
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    _Missing,
    login_always_fail,
    syntax,
)
from aiosmtpd.smtp import Envelope as AioEnvelope

from gateway.crypto.dkim_verify import MessageDigest
from gateway.errors import SpoolError
from gateway.events import Event, RejectReason
from gateway.model import ClientInfo, Envelope, Recipient
from gateway.observability.logging import get_logger
from gateway.smtp import parameters, replies
from gateway.smtp.binding import Refusal
from gateway.smtp.context import SmtpContext
from gateway.smtp.data import DataProblem, MessageScanner
from gateway.smtp.passphrase import PassphraseFilter

log = get_logger("gateway.smtp")

_READ_LIMIT = 64 * 1024  # StreamReader limit: command lines and DATA chunk size
DATA_CHUNK = 64 * 1024  # message data checked and written at a time (at most)
_COMMAND_LIMITS = {"MAIL": 1024, "RCPT": 1024}  # RFC 5321 512 plus ESMTP parameters
_SMTP_VERBS = tuple(name[5:] for name in dir(SMTP) if name.startswith("smtp_"))
_VERB_SET = frozenset(_SMTP_VERBS)
_SIMPLE_PATH = re.compile(
    r"\s*<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)?)>(.*)",
    re.S,
)
_PROBLEM_REPLY = {
    DataProblem.TOO_BIG: (replies.MESSAGE_TOO_BIG, RejectReason.MESSAGE_TOO_BIG),
    DataProblem.LINE_TOO_LONG: (replies.LINE_TOO_LONG, RejectReason.LINE_TOO_LONG),
    DataProblem.BARE_LINE_ENDING: (replies.BARE_LINE_ENDING, RejectReason.BARE_LINE_ENDING),
    DataProblem.MAIL_LOOP: (replies.MAIL_LOOP, RejectReason.MAIL_LOOP),
}


class GatewaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.auth_failures = 0
        self.auth_user: str | None = None
        self.cert: Any = None  # CertIdentity once a client certificate is seen


class GatewayEnvelope(AioEnvelope):
    def __init__(self) -> None:
        super().__init__()
        self.authorized_by = ""
        self.rcpt_option_list: list[list[str]] = []


class _Verbs:
    """aiosmtpd's table of a session's ``smtp_*`` methods (``get``, ``items``), each
    bound when the session asks for it: a session uses five or six of the twenty,
    and binding them all took a twentieth of a short session's work."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: SMTP | None):
        self._protocol = protocol

    def get(self, verb: str) -> Any:
        if self._protocol is None or verb not in _VERB_SET:
            return None
        return getattr(self._protocol, "smtp_" + verb)

    def items(self) -> list[tuple[str, Any]]:
        return [(verb, self.get(verb)) for verb in _SMTP_VERBS]


class GatewaySMTP(SMTP):
    line_length_limit = _READ_LIMIT

    def __init__(self, ctx: SmtpContext):
        # The state aiosmtpd.smtp.SMTP.__init__ sets up, for our fixed settings, without
        # its per-connection inspect.getmembers()/dir() scans: with a new connection per
        # message those scans were a fifth of the CPU spent on each message.  Kept in
        # step with aiosmtpd 1.4.x (pinned in pyproject.toml); the tests drive every
        # command through it.
        self.ctx = ctx
        loop = asyncio.get_running_loop()
        self.__ident__ = "ESMTP Sealgate"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        handler = ctx.handler
        self.event_handler = handler
        self.data_size_limit = None  # SIZE is ours: advertised and checked by Handler
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # Per instance: aiosmtpd's class-level dict is shared by all connections.
        self.command_size_limits = collections.defaultdict(lambda: 512, _COMMAND_LIMITS)
        self.hostname = ctx.hostname
        self.tls_context = ctx.tls_context
        self.require_starttls = False  # MAIL before STARTTLS: Handler answers 530 5.7.0
        self._timeout_duration = ctx.config.smtp.command_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # loop time the session times out at (`_reset_timeout`)
        self._lost = False  # connection_lost has run
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = (
            {
                name: _AuthMechAttr(getattr(handler, "auth_" + name), False)
                for name in ("PLAIN", "LOGIN")
            }
            if ctx.relay.offers_auth
            else {}
        )
        self._handle_hooks = ctx.hooks
        self._ehlo_hook_ver = "new"
        self._smtp_methods = _Verbs(self)  # type: ignore[assignment]
        self._enforce_call_limit = False
        self._client_ip: str | None = None
        self._refused = False
        self.in_transaction = False
        self._continued: list[bytes] = []
        self._greeted = False  # the 220 greeting carries no enhanced code
        self._in_hello = False  # nor do HELO/EHLO replies (RFC 2034 section 3)

    async def push(self, status: str | bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client is gone (or TLS failed under us): nobody to answer
        line = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        if self._greeted and not self._in_hello:
            line = replies.with_enhanced_code(line)
        self._greeted = True
        # aiosmtpd pushes a multi-line reply (EHLO) line by line, a send() each; send it
        # in one piece instead: continuation lines ("250-...") wait for the last line.
        if line[3:4] == b"-":
            self._continued.append(line + b"\r\n")
            return
        if self._continued:
            line = b"".join(self._continued) + line
            self._continued.clear()
        self._writer.write(line + b"\r\n")
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Fast path for the plain <local@domain> form; the library's RFC 5322 parser
        # handles everything else (quoted local parts, address literals...).
        m = _SIMPLE_PATH.match(arg)
        if m:
            return m.group(1) or "<>", m.group(2)
        return super()._getaddr(arg)

    @property
    def gw_session(self) -> GatewaySession:
        assert isinstance(self.session, GatewaySession)
        return self.session

    @property
    def gw_envelope(self) -> GatewayEnvelope:
        assert isinstance(self.envelope, GatewayEnvelope)
        return self.envelope

    def _write_raw(self, reply: str) -> None:
        """Write a reply outside the command loop (timeouts, shutdown).  By what the
        transport can do, not its class: uvloop's (the SMTP workers' loop) is no
        `asyncio.WriteTransport`."""
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")

    def _create_session(self) -> GatewaySession:
        return GatewaySession(self.loop)

    def _create_envelope(self) -> GatewayEnvelope:
        return GatewayEnvelope()

    # -- connection accounting ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            peer = transport.get_extra_info("peername") or ("?", 0)
            ip = str(peer[0])
            refusal = self._admit(ip)
            if refusal is not None:
                self._refused = True
                transport.write(refusal.format(hostname=self.ctx.hostname).encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self._client_ip = ip
            # asyncio reads into a fresh 256 KiB buffer per recv() and shrinks it: past
            # glibc's mmap threshold that is an mmap/mremap/munmap per read.  64 KiB
            # stays on the heap and still matches the DATA chunk size.
            if hasattr(transport, "max_size"):
                transport.max_size = _READ_LIMIT
            self.ctx.sessions.add(self)
            self.ctx.metrics.connections.labels("accepted").inc()
            self.ctx.metrics.connections_active.inc()
        super().connection_made(transport)

    def _admit(self, ip: str) -> str | None:
        ctx = self.ctx
        if ctx.stopping:
            return replies.SHUTTING_DOWN
        if sum(ctx.connections.values()) >= ctx.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif ctx.connections[ip] >= ctx.max_connections_per_ip:
            refusal = replies.TOO_MANY_FROM_IP
        else:
            ctx.connections[ip] += 1
            return None
        ctx.metrics.connections.labels("refused").inc()
        ctx.metrics.reject(RejectReason.CONNECTION_LIMIT)
        log.warning(Event.CONNECTION_REFUSED, client_ip=ip, reason="connection_limit")
        return refusal

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._lost = True
        if self._client_ip is not None:
            self.ctx.connections[self._client_ip] -= 1
            if self.ctx.connections[self._client_ip] <= 0:
                del self.ctx.connections[self._client_ip]
            self._client_ip = None
            self.ctx.sessions.discard(self)
            self.ctx.metrics.connections_active.dec()
        super().connection_lost(error)  # cancels the command loop (if QUIT has not)
        task = self._handler_coroutine
        if task is None or task.done():
            self._unlink()
        else:
            task.add_done_callback(lambda _: self._unlink())

    def _unlink(self) -> None:
        """The session is over and its command loop has ended: drop the references
        that make its objects a cycle - the loop's task (its CancelledError's
        traceback holds the loop's frames, which hold this protocol), the table of
        bound ``smtp_*`` methods, the stream writer and the callback that made it,
        the TLS layer - so that they are freed by reference counting at once, not
        by the garbage collector's passes (~50 objects a session)."""
        self._handler_coroutine = None
        self._smtp_methods = _Verbs(None)  # type: ignore[assignment]
        self._client_connected_cb = None
        self._stream_writer = None
        self._writer = None  # type: ignore[assignment]
        self._tls_protocol = None
        self._original_transport = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The session ends ``duration`` (the command timeout by default) from now
        unless something moves it again.  aiosmtpd cancels and schedules a timer for
        every command; here one timer stays armed while it would fire no later than
        the deadline, and `_on_timer` re-arms it for the deadline if it fires early -
        a reset is a subtraction, not a heap operation (~9 a session).  Once the
        connection is lost (a command being handled is cancelled, and its cleanup
        resets the timer) nothing is armed: a timer would fire on the dead session."""
        handle = self._timeout_handle
        if self._lost:  # the connection is gone (a reset mid-DATA): no timer
            if handle is not None:
                handle.cancel()
            return
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        if handle is not None:
            if handle.when() <= deadline and not handle.cancelled():
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        if self.loop.time() < self._deadline:  # moved since it was armed
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_timer)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        self._write_raw(replies.TIMEOUT.format(hostname=self.hostname))
        self.ctx.metrics.reject(RejectReason.TIMEOUT)
        log.info(Event.TIMEOUT, client_ip=self._client_ip, in_data=self.in_transaction)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def data_received(self, data: bytes) -> None:
        # While a message streams in, any received byte proves the client alive.
        if self.in_transaction:
            self._reset_timeout(self.ctx.config.smtp.data_timeout)
        super().data_received(data)

    def close_for_shutdown(self) -> None:
        self._write_raw(replies.SHUTTING_DOWN.format(hostname=self.hostname))
        if self.transport is not None:
            self.transport.close()

    # HELP lists (and explains) only the commands with a syntax note, ours as well
    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_hello = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL, with the DSN extension's RET and ENVID (RFC 3461) and REQUIRETLS (RFC
        8689, over TLS only) taken out first and kept in the envelope as written
        (`gateway.smtp.parameters`)."""
        await self._with_parameters(super().smtp_MAIL, arg, parameters.MAIL_KEYS)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT, with NOTIFY and ORCPT taken out first and kept with the recipient."""
        await self._with_parameters(super().smtp_RCPT, arg, parameters.RCPT_KEYS)

    async def _with_parameters(
        self,
        command: Callable[[str | None], Awaitable[None]],
        arg: str | None,
        keys: tuple[str, ...],
    ) -> None:
        if arg is None or self.session is None or not self.session.extended_smtp:
            await command(arg)  # parameters after HELO: aiosmtpd's syntax error
            return
        try:
            arg, taken = parameters.take(arg, keys)
        except parameters.ParameterError as e:
            self.ctx.metrics.reject(RejectReason.BAD_SYNTAX)
            await self.push(replies.BAD_EXTENSION_PARAMETER.format(detail=e))
            return
        if parameters.REQUIRETLS in taken and self.session.ssl is None:
            self.ctx.metrics.reject(RejectReason.TLS_REQUIRED)
            await self.push(replies.REQUIRETLS_WITHOUT_TLS)
            return
        envelope = self.gw_envelope
        sender, recipients = envelope.mail_from, len(envelope.rcpt_tos)
        await command(arg)
        if not taken:
            return
        if keys is parameters.MAIL_KEYS and envelope.mail_from and not sender:
            envelope.mail_options.extend(taken)
        elif keys is parameters.RCPT_KEYS and len(envelope.rcpt_tos) > recipients:
            envelope.rcpt_options.extend(taken)
            envelope.rcpt_option_list[-1].extend(taken)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_hello = False

    async def handle_exception(self, error: Exception) -> str:
        """The reply to an exception in a command.  Client-made ends of a session (a
        failed TLS handshake, a connection gone while we answered) are one line at
        info, no traceback: any client can cause them.  Anything else is ours: an
        error with its type, and 451 so that the client tries again."""
        if isinstance(error, TLSSetupException):
            self.ctx.metrics.reject(RejectReason.TLS_HANDSHAKE)
            cause = error.__cause__
            log.info(
                Event.TLS_FAILED,
                client_ip=self._client_ip,
                error_type=type(cause).__name__,
                error=str(cause)[:200],
            )
            return replies.SHUTTING_DOWN  # never sent: aiosmtpd closes the connection
        if self.transport is None or self.transport.is_closing():
            log.info(
                Event.CONNECTION_LOST, client_ip=self._client_ip, error_type=type(error).__name__
            )
            return replies.SHUTTING_DOWN  # never sent: push() has nobody to answer
        log.error(
            Event.SESSION_ERROR,
            client_ip=self._client_ip,
            error_type=type(error).__name__,
            error=str(error)[:200],
        )
        return replies.INTERNAL_ERROR

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> _Missing | bytes:
        """aiosmtpd's, with a syntax reply for an over-long or non-ASCII answer
        (its own raises, and the client got 451)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        # the AUTH challenge (RFC 4954 4): "334 " and the base64 text, nothing else
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        line = await self._read_line()
        if line is None:
            await self.push(replies.COMMAND_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push(replies.AUTH_ABORTED)
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push(replies.AUTH_BAD_BASE64)
            return MISSING

    async def _read_line(self) -> bytes | None:
        """One line from the client; None when it was longer than the read limit (it
        is read to its end and dropped)."""
        try:
            return await self._reader.readuntil()
        except asyncio.IncompleteReadError as e:
            raise ConnectionResetError("connection closed") from e
        except asyncio.LimitOverrunError as e:
            consumed = e.consumed
        while True:
            await self._reader.read(consumed)
            try:
                await self._reader.readuntil()
                return None
            except asyncio.IncompleteReadError as e:
                raise ConnectionResetError("connection closed") from e
            except asyncio.LimitOverrunError as e:
                consumed = e.consumed

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:  # RFC 3207 4.2: no second handshake
            await self.push(replies.TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    # -- DATA ---------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if not self.gw_envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.SYNTAX_DATA)
            return
        await self.push(replies.START_DATA)
        self.in_transaction = True
        self._reset_timeout(self.ctx.config.smtp.data_timeout)
        try:
            reply = await self._receive_message()
        finally:
            self.in_transaction = False
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            self._reset_timeout()  # back to the command timeout
        await self.push(reply)

    async def _receive_message(self) -> str:
        ctx, cfg = self.ctx, self.ctx.config.smtp
        writer = ctx.submitter.begin()
        queue_id = writer.queue_id
        scanner = MessageScanner(
            cfg.max_message_size, cfg.max_line_length, cfg.max_received_headers
        )
        try:
            refusal, hashed = await self._take_message(scanner, writer)
        except BaseException:
            # The client went away before the message was whole and checked (mid-DATA,
            # or while its DKIM key was looked up): nothing was promised, nothing is
            # kept.  (Once its commit has begun, the spool undoes it itself.)
            writer.abort_soon()
            raise
        if refusal is not None:
            return refusal
        started = time.perf_counter()
        try:
            envelope = await writer.commit(
                lambda size, sha: self._make_envelope(
                    queue_id, size, sha, hashed, scanner.data_is_wire
                )
            )
        except SpoolError as e:
            log.error(Event.SPOOL_WRITE_FAILED, queue_id=queue_id, error=str(e))
            return self._rejected(RejectReason.SPOOL_ERROR, replies.SPOOL_ERROR, writer.size)
        latency = time.perf_counter() - started
        self._accepted(envelope, latency)
        return replies.QUEUED.format(queue_id=queue_id)

    async def _take_message(self, scanner: MessageScanner, writer: Any) -> tuple[str | None, str]:
        """Read the message into ``writer`` and check it: (the refusal, if it is
        refused - and then nothing of it is kept; the hash of its portal passphrase)."""
        ctx, cfg = self.ctx, self.ctx.config.smtp
        digest = ctx.binding.digest_for(self.gw_envelope.authorized_by)
        passphrase = PassphraseFilter(ctx.config.portal.passphrase_header)
        await self._read_data(scanner, writer, digest, passphrase)
        await writer.write(passphrase.finish())
        scanner.finish()
        if scanner.problem is not None:
            await writer.abort()
            template, reason = _PROBLEM_REPLY[scanner.problem]
            limit = (
                cfg.max_message_size
                if scanner.problem is DataProblem.TOO_BIG
                else cfg.max_line_length
            )
            return self._rejected(
                reason,
                template.format(limit=limit, count=scanner.received_headers),
                scanner.wire_size,
            ), ""
        if digest is not None:
            refusal = await ctx.binding.check_message(digest)
            if refusal is not None:
                await writer.abort()
                return self._not_bound(refusal, writer.size), ""
        hashed = ""
        if passphrase.value:  # only its hash goes on, to the portal
            from gateway.portal.credentials import hash_secret

            hashed = await asyncio.get_running_loop().run_in_executor(
                None, hash_secret, passphrase.value
            )
        return None, hashed

    async def _read_data(
        self,
        scanner: MessageScanner,
        writer: Any,
        digest: MessageDigest | None,
        passphrase: PassphraseFilter,
    ) -> None:
        """Read up to and excluding CRLF "." CRLF, feeding the scanner chunk by chunk
        (and the binding's digest, when the message is to be checked); the portal
        passphrase header never reaches the writer."""
        reader = self._reader
        last2 = b"\r\n"  # the CRLF that ended the DATA command line
        # Every line that ends in "." ends a read (prose: most sentences); the pieces
        # are checked and written together, up to DATA_CHUNK bytes at a time.
        pieces: list[bytes] = []
        held = 0
        while True:
            try:
                piece = await reader.readuntil(b".\r\n")
                found = True
            except asyncio.LimitOverrunError as e:
                piece = await reader.read(e.consumed)
                found = False
            except asyncio.IncompleteReadError as e:
                raise ConnectionResetError("connection closed during DATA") from e
            before = piece[-5:-3] if len(piece) >= 5 else (last2 + piece[:-3])[-2:]
            final = found and before == b"\r\n"
            pieces.append(piece[:-3] if final else piece)
            held += len(piece)
            if final or held >= DATA_CHUNK:
                data = scanner.feed(b"".join(pieces))  # one piece: itself, not a copy
                pieces, held = [], 0
                if digest is not None:
                    digest.feed(data)
                await writer.write(passphrase.feed(data))
            if final:
                return
            last2 = piece[-2:] if len(piece) >= 2 else (last2 + piece)[-2:]

    # -- outcomes -----------------------------------------------------------------

    def _client_info(self) -> ClientInfo:
        session = self.gw_session
        peer = session.peer or ("?", 0)
        version = cipher = None
        if session.ssl:
            sslobj = session.ssl.get("ssl_object")
            if sslobj is not None:
                version = sslobj.version()
                cipher = (sslobj.cipher() or (None,))[0]
        cert = session.cert
        return ClientInfo(
            ip=str(peer[0]),
            port=int(peer[1]),
            helo=session.host_name or "",
            tls_version=version,
            tls_cipher=cipher,
            client_cert_sha256=cert.sha256 if cert else None,
            client_cert_subject=cert.subject if cert else None,
            authorized_by=self.gw_envelope.authorized_by,
            auth_user=session.auth_user,
        )

    def _make_envelope(
        self,
        queue_id: str,
        size: int,
        sha256: str,
        passphrase: str = "",
        data_is_wire: bool = False,
    ) -> Envelope:
        now = datetime.datetime.now(datetime.UTC)
        client = self._client_info()
        env = self.gw_envelope
        mail_from = "" if env.mail_from in (None, "<>") else str(env.mail_from)
        recipients = tuple(
            Recipient(a, tuple(o)) for a, o in zip(env.rcpt_tos, env.rcpt_option_list, strict=True)
        )
        trace = received_header(
            client,
            self.hostname,
            queue_id,
            self.gw_session.extended_smtp,
            bool(self.gw_session.authenticated),
            now,
        )
        trace += f"{self.ctx.config.smtp.marker_header}: {self.hostname}\r\n"
        return Envelope(
            queue_id=queue_id,
            received_at=now.isoformat(timespec="microseconds"),
            mail_from=mail_from,
            mail_options=tuple(env.mail_options),
            recipients=recipients,
            client=client,
            size=size,
            sha256=sha256,
            trace_headers=trace,
            portal_passphrase=passphrase,
            data_is_wire=data_is_wire,
        )

    def _accepted(self, envelope: Envelope, latency: float) -> None:
        m = self.ctx.metrics
        m.messages_accepted.labels(m.tls_label(envelope.client.tls_version)).inc()
        m.accepted_bytes.inc(envelope.size)
        m.message_size.observe(envelope.size)
        m.acceptance_latency.observe(latency)
        redact = self.ctx.redact
        log.info(
            Event.MESSAGE_ACCEPTED,
            result="accepted",
            queue_id=envelope.queue_id,
            client_ip=envelope.client.ip,
            tls_version=envelope.client.tls_version,
            size=envelope.size,
            recipients=len(envelope.recipients),
            authorized_by=envelope.client.authorized_by,
            mail_from=redact(envelope.mail_from) if envelope.mail_from else "<>",
            rcpt=[redact(r.address) for r in envelope.recipients]
            if redact.mode != "omit"
            else None,
            latency_ms=round(latency * 1000, 2),
        )

    def _not_bound(self, refusal: Refusal, size: int) -> str:
        """A message the tenant and sender binding does not allow."""
        client = self._client_info()
        log.warning(
            Event.BINDING_REFUSED,
            reason=refusal.reason.value,
            client_ip=client.ip,
            authorized_by=client.authorized_by,
            dkim=list(refusal.signers) or None,
            reply=refusal.reply[:9],
        )
        return self._rejected(refusal.reason, refusal.reply, size)

    def _rejected(self, reason: RejectReason, reply: str, size: int) -> str:
        self.ctx.metrics.reject(reason)
        client = self._client_info()
        log.info(
            Event.MESSAGE_REJECTED,
            result="rejected",
            reason=reason.value,
            client_ip=client.ip,
            tls_version=client.tls_version,
            size=size,
            reply=reply[:3],
        )
        return reply


def received_header(
    client: ClientInfo,
    hostname: str,
    queue_id: str,
    esmtp: bool,
    authenticated: bool,
    when: datetime.datetime,
    protocol: str | None = None,
) -> str:
    """Our Received trace field (RFC 5321 4.4), protocol names per RFC 3848 (or
    ``protocol``: the message API's HTTPS)."""
    proto = "ESMTP" if esmtp else "SMTP"
    if client.tls_version:
        proto += "S"
    if authenticated:
        proto += "A"
    proto = protocol or proto
    helo = "".join(c for c in client.helo if 32 < ord(c) < 127 and c not in "()\\")[:255]
    ip = f"IPv6:{client.ip}" if ":" in client.ip else client.ip
    header = f"Received: from {helo or 'unknown'} (unknown [{ip}])\r\n\tby {hostname} (Sealgate)"
    if client.tls_version:
        header += f"\r\n\t(using {client.tls_version} with cipher {client.tls_cipher})"
    header += f"\r\n\twith {proto} id {queue_id};\r\n\t{_date(when)}\r\n"
    return header


_last_date: tuple[datetime.datetime, str] | None = None


def _date(when: datetime.datetime) -> str:
    """``when`` as RFC 5322 writes a date: to the second, so made once a second."""
    global _last_date
    second = when.replace(microsecond=0)
    if _last_date is None or _last_date[0] != second or _last_date[0].tzinfo != second.tzinfo:
        _last_date = (second, email.utils.format_datetime(second))
    return _last_date[1]


class SmtpServer:
    """The listening socket and its sessions."""

    def __init__(self, ctx: SmtpContext):
        self.ctx = ctx
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``listen.smtp``, or on ``sock`` inherited from the main process."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: GatewaySMTP(self.ctx), sock=sock, backlog=512
            )
            return
        listen = self.ctx.config.listen.smtp
        self._server = await loop.create_server(
            lambda: GatewaySMTP(self.ctx),
            host=listen.host,
            port=listen.port,
            reuse_address=True,
            backlog=512,
        )

    @property
    def sockets(self) -> list[Any]:
        # asyncio's or uvloop's server: both have ``sockets``
        return list(getattr(self._server, "sockets", None) or [])

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening; let messages in DATA finish (up to ``grace``), then close."""
        self.ctx.stopping = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while any(s.in_transaction for s in self.ctx.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.ctx.sessions):
            session.close_for_shutdown()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)
