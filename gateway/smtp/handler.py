"""handler - the per-command policy of the SMTP listener (aiosmtpd's ``handle_*``
hooks): HELO/EHLO names and what EHLO offers, STARTTLS client certificates, the
envelope checks at MAIL and RCPT (`gateway.addresses`), the sender binding at MAIL
(`gateway.smtp.binding`), SIZE, free space, relay authorization and recipient
limits, SMTP AUTH (PLAIN, LOGIN; RFC 4954, 4616) with throttling across connections.

Every reply comes from `gateway.smtp.replies`.  Passwords are checked in a thread,
never on the event loop, and only when `AuthThrottle` allows the attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING

from aiosmtpd.smtp import AuthResult

from gateway.addresses import Kind, Problem, check_helo, check_mailbox, check_parameter
from gateway.events import Event, RejectReason
from gateway.observability.logging import get_logger
from gateway.smtp import replies
from gateway.smtp.auth import User, check_credentials

if TYPE_CHECKING:
    from gateway.smtp.context import SmtpContext
    from gateway.smtp.server import GatewayEnvelope, GatewaySession, GatewaySMTP

log = get_logger("gateway.smtp")


class Handler:
    """aiosmtpd hooks: the per-command policy."""

    def __init__(self, ctx: SmtpContext):
        self.ctx = ctx

    async def handle_EHLO(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        problem = check_helo(hostname)
        if problem is not None:
            self.ctx.metrics.reject(RejectReason.BAD_SYNTAX)
            return [replies.BAD_HELO.format(detail=problem.detail)]
        session.host_name = hostname
        server.command_size_limits["MAIL"] = 1024
        tls_active = session.ssl is not None
        out = [
            responses[0],
            f"250-SIZE {self.ctx.config.smtp.max_message_size}",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",
        ]
        if server.tls_context is not None and not tls_active:
            out.append("250-STARTTLS")
        if tls_active:
            out.append("250-REQUIRETLS")  # RFC 8689 4.1: only over TLS
        if tls_active and self.ctx.relay.offers_auth:
            out.append("250-AUTH PLAIN LOGIN")
        out.append(replies.EHLO_LAST)
        return out

    async def handle_HELO(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        hostname: str,
    ) -> str:
        problem = check_helo(hostname)
        if problem is not None:
            self.ctx.metrics.reject(RejectReason.BAD_SYNTAX)
            return replies.BAD_HELO.format(detail=problem.detail)
        session.host_name = hostname
        return replies.HELO_OK.format(hostname=server.hostname)

    def handle_STARTTLS(
        self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope
    ) -> bool:
        sslobj = session.ssl.get("ssl_object") if session.ssl else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der:
            try:
                session.cert = self.ctx.relay.identify_cert(der)
            except ValueError:
                session.cert = None
        return True

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        cfg = self.ctx.config
        if cfg.relay.require_tls and session.ssl is None:
            self.ctx.metrics.reject(RejectReason.TLS_REQUIRED)
            return replies.TLS_REQUIRED
        if address != "<>":
            problem = check_mailbox(address, envelope.smtp_utf8)
            if problem is not None:
                return self._bad_address(problem, replies.BAD_SENDER)
        size = 0
        for option in mail_options:
            if not check_parameter(option):
                self.ctx.metrics.reject(RejectReason.BAD_SYNTAX)
                return replies.BAD_PARAMETER
            key, _, value = option.partition("=")
            if key.upper() == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    return replies.SYNTAX_SIZE
                size = int(value)
                if size > cfg.smtp.max_message_size:
                    self.ctx.metrics.reject(RejectReason.MESSAGE_TOO_BIG)
                    return replies.SIZE_EXCEEDED_MAIL.format(limit=cfg.smtp.max_message_size)
        refusal = self.ctx.binding.check_sender(address, self._user(session))
        if refusal is not None:
            self.ctx.metrics.reject(refusal.reason)
            peer = session.peer or ("?", 0)
            log.warning(
                Event.SENDER_REFUSED,
                client_ip=str(peer[0]),
                reason=refusal.reason.value,
                mail_from=self.ctx.redact(address) if address != "<>" else "<>",
            )
            return refusal.reply
        if self.ctx.free_space() < cfg.spool.min_free_space + size:
            self.ctx.metrics.reject(RejectReason.SPOOL_ERROR)
            return replies.INSUFFICIENT_STORAGE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        problem = check_mailbox(address, envelope.smtp_utf8)
        if problem is not None:
            return self._bad_address(problem, replies.BAD_RECIPIENT)
        limit = self.ctx.config.smtp.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            self.ctx.metrics.reject(RejectReason.TOO_MANY_RECIPIENTS)
            return replies.TOO_MANY_RECIPIENTS.format(limit=limit)
        authorized_by = self._authorization(session)
        if authorized_by is None:
            self.ctx.metrics.reject(RejectReason.RELAY_DENIED)
            peer = session.peer or ("?", 0)
            log.warning(
                Event.RELAY_DENIED,
                client_ip=str(peer[0]),
                tls=session.ssl is not None,
                rcpt=self.ctx.redact(address),
            )
            return replies.RELAY_DENIED.format(address=address)
        envelope.authorized_by = authorized_by
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.rcpt_option_list.append(list(rcpt_options))
        return replies.RECIPIENT_OK

    def _bad_address(self, problem: Problem, template: str) -> str:
        self.ctx.metrics.reject(RejectReason.BAD_SYNTAX)
        if problem.kind is Kind.NEEDS_SMTPUTF8:
            return replies.NEEDS_SMTPUTF8
        return template.format(detail=problem.detail)

    def _user(self, session: GatewaySession) -> User | None:
        if session.authenticated and session.auth_user:
            return self.ctx.relay.users.get(session.auth_user)
        return None

    def _authorization(self, session: GatewaySession) -> str | None:
        relay = self.ctx.relay
        if session.authenticated and session.auth_user:
            return "smtp-auth"
        if session.cert is not None and session.cert.matched:
            return "client-cert"
        peer = session.peer or ("", 0)
        if relay.network_allows(str(peer[0])):
            return "network"
        return None

    # -- SMTP AUTH (RFC 4954, 4616); the builtin mechanisms check passwords on the loop

    async def auth_PLAIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        blob = await self._first_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push(replies.AUTH_BAD_BASE64)
            return AuthResult(success=False, handled=True)
        return await self._verify(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        user = await self._first_response(server, args, "Username:")
        if user is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(server, user, password)

    @staticmethod
    async def _first_response(server: GatewaySMTP, args: list[str], prompt: str) -> bytes | None:
        """The client's first response: given with the AUTH command (RFC 4954 4), else
        asked for with ``prompt``; None when it is missing, aborted or not base64 (the
        client has been told)."""
        if len(args) == 1:
            answer = await server.challenge_auth(prompt)
            return answer if isinstance(answer, bytes) else None
        try:
            return base64.b64decode(args[1], validate=True)
        except (binascii.Error, ValueError):  # ValueError: not ASCII
            await server.push(replies.AUTH_BAD_BASE64)
            return None

    async def _verify(self, server: GatewaySMTP, user_b: bytes, password: bytes) -> AuthResult:
        session = server.gw_session
        user = user_b.decode("utf-8", "replace")
        peer = session.peer or ("?", 0)
        throttle = self.ctx.auth_throttle
        assert throttle is not None
        if not throttle.allows(str(peer[0]), user):  # before any hashing
            self.ctx.metrics.auth.labels("throttled").inc()
            self.ctx.metrics.reject(RejectReason.AUTH_FAILED)
            log.warning(Event.AUTH_THROTTLED, client_ip=str(peer[0]))
            await server.push(replies.AUTH_THROTTLED)
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        ok = await asyncio.get_running_loop().run_in_executor(
            None, check_credentials, self.ctx.relay.users, user, password
        )
        if ok:
            throttle.succeeded(user)
            session.auth_user = user
            self.ctx.metrics.auth.labels("success").inc()
            log.info(Event.AUTH_SUCCEEDED, client_ip=str(peer[0]), user=user)
            return AuthResult(success=True, auth_data=user, message=replies.AUTH_OK)
        session.auth_failures += 1
        throttle.failed(str(peer[0]), user)
        self.ctx.metrics.auth.labels("failure").inc()
        self.ctx.metrics.reject(RejectReason.AUTH_FAILED)
        log.warning(Event.AUTH_FAILED, client_ip=str(peer[0]), failures=session.auth_failures)
        if session.auth_failures >= self.ctx.config.smtp.max_auth_failures:
            await server.push(replies.AUTH_TOO_MANY.format(hostname=server.hostname))
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
