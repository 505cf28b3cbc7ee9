"""Recipient mail servers for delivery tests: aiosmtpd on 127.0.0.x addresses.

Each can offer STARTTLS with a given certificate (or not at all), refuse chosen
recipients, answer DATA with a chosen reply, and records everything it received,
including whether the session was encrypted.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from tests.support.net import abort


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls_version: str | None
    connection: int = 0  # which connection (1, 2, ...) carried it
    requiretls: bool = False  # MAIL FROM carried REQUIRETLS (RFC 8689)
    dsn: list[str] = field(default_factory=list)  # DSN parameters of MAIL and RCPTs
    mail_options: list[str] = field(default_factory=list)  # MAIL's parameters


@dataclass
class RecipientMta:
    host: str
    port: int
    cert: tuple[Path, Path] | None = None  # (chain, key); None: no STARTTLS
    rcpt_replies: dict[str, str | bytes] = field(default_factory=dict)
    data_reply: str | bytes | None = None  # bytes: sent as they are (not UTF-8, say)
    data_replies: list[str | bytes] = field(default_factory=list)  # used first, one per DATA
    received: list[Received] = field(default_factory=list)
    cert_der: bytes = b""
    attempts: int = 0
    data_delay: float = 0.0  # seconds before answering DATA
    ehlo_delay: float = 0.0  # seconds before answering EHLO (a slow server)
    rcpt_delay: float = 0.0  # seconds before answering RCPT
    close_after_data: bool = False  # drop the connection after each message, no reply
    utf8: bool = True  # offers SMTPUTF8
    requiretls: bool = False  # offers REQUIRETLS after STARTTLS (RFC 8689)
    dsn: bool = False  # offers DSN (RFC 3461): records the parameters it is given
    pipelining: bool = True  # offers PIPELINING (RFC 2920), as most servers do
    # what arrived at once from "MAIL" on (a pipelined group is one piece)
    groups: list[bytes] = field(default_factory=list)
    hung_up: int = 0  # connections it closed after a message (close_after_data)
    connections: int = 0
    quits: int = 0
    in_data: int = 0  # DATA commands being answered right now
    most_in_data: int = 0  # the most at once
    _server: asyncio.AbstractServer | None = None
    _sessions: list[SMTP] = field(default_factory=list)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.ehlo_delay:
            await asyncio.sleep(self.ehlo_delay)
        if self.requiretls and session.ssl:
            responses.insert(-1, "250-REQUIRETLS")
        if self.dsn:
            responses.insert(-1, "250-DSN")
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str | bytes:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | bytes:
        sslobj = session.ssl.get("ssl_object") if session.ssl else None
        reply = self.data_replies.pop(0) if self.data_replies else self.data_reply
        self.attempts += 1
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        try:
            if self.data_delay:
                await asyncio.sleep(self.data_delay)
        finally:
            self.in_data -= 1
        if reply is None or reply[:1] in ("2", b"2"):
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from
            self.received.append(
                Received(
                    sender,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    sslobj.version() if sslobj else None,
                    server.connection_number,
                    getattr(envelope, "requiretls", False),
                    list(getattr(envelope, "dsn", [])),
                    list(envelope.mail_options),
                )
            )
        if self.close_after_data:
            # like a server whose idle timeout is shorter than the client's: the
            # reply arrives, then the connection is gone
            def hang_up() -> None:
                server.transport.close()
                self.hung_up += 1

            asyncio.get_running_loop().call_later(0.05, hang_up)
        return reply or "250 2.0.0 Ok: queued"

    async def start(self) -> RecipientMta:
        ctx = None
        if self.cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
        loop = asyncio.get_running_loop()

        def connection() -> SMTP:
            self.connections += 1
            smtp = _Smtp(self, tls_context=ctx, enable_SMTPUTF8=self.utf8, hostname=self.host)
            smtp.connection_number = self.connections  # type: ignore[attr-defined]
            self._sessions.append(smtp)
            return smtp

        self._server = await loop.create_server(connection, host=self.host, port=self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Connections still open (a gateway's idle session, a killed gateway's socket
        # whose end the loop has not read yet) are closed here: left to the garbage
        # collector they warn "unclosed transport" in whichever later test it runs.
        for smtp in self._sessions:
            if smtp.transport is not None:
                abort(smtp.transport)
        self._sessions.clear()
        await asyncio.sleep(0)


class _Smtp(SMTP):
    """aiosmtpd, taking REQUIRETLS and the DSN parameters off MAIL and RCPT (it
    refuses parameters it does not know) when its MTA offers them, and noting them
    in the envelope."""

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"MAIL "):
            self.event_handler.groups.append(bytes(data))
        super().data_received(data)

    def _strip(self, arg: str | None, keys: tuple[str, ...]) -> tuple[str | None, list[str]]:
        if not arg:
            return arg, []
        words = arg.split()
        taken = [w for w in words[1:] if w.split("=")[0].upper() in keys]
        return " ".join(w for w in words if w not in taken), taken

    async def smtp_MAIL(self, arg: str | None) -> None:
        mta = self.event_handler
        keys = ("RET", "ENVID") if mta.dsn else ()
        if mta.requiretls and self.session and self.session.ssl:
            keys += ("REQUIRETLS",)
        arg, taken = self._strip(arg, keys)
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from:
            self.envelope.requiretls = "REQUIRETLS" in taken  # type: ignore[attr-defined]
            self.envelope.dsn = [t for t in taken if t != "REQUIRETLS"]  # type: ignore[attr-defined]

    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, taken = self._strip(arg, ("NOTIFY", "ORCPT") if self.event_handler.dsn else ())
        await super().smtp_RCPT(arg)
        if taken and self.envelope is not None:
            self.envelope.dsn = [*getattr(self.envelope, "dsn", []), *taken]  # type: ignore[attr-defined]
