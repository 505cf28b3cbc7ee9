"""sessions - idle SMTP sessions kept for the next message to the same server.

After a transaction ends cleanly, `deliver` hands its session here instead of sending
QUIT; the next delivery to the same MX host and port *at the same TLS level* takes it
and skips connect, greeting, EHLO and STARTTLS (after Postfix's connection cache,
``smtp_connection_cache_on_demand``).  Limits, as in Postfix:

- ``idle_time``: an unused session is closed (QUIT) after this long - or after as
  long as it took to open (connect, greeting, EHLO, STARTTLS), up to `KEPT_MAX`: a
  session with a slow server is worth keeping for what another would cost;
- ``max_age``: a session is not reused once it is this old
  (``smtp_connection_reuse_time_limit``);
- ``max_messages``: transactions per session (1 turns reuse off);
- at most ``per_key`` idle sessions per server, more are closed.

Security: the key holds everything the session's security was established for (MX
host, port, TLS level, TLSA records), and a cache belongs to one set of delivery
settings (CA file, HELO name): `QueueManager.apply` starts a new cache on reload, so
a session verified under old settings is never reused under new ones. A session
established at ``may`` in plaintext can therefore never carry mail that requires
``verify``.

A cached session may have been closed by the server meanwhile; `deliver` notices at
MAIL FROM (disconnect or 421) and opens a new one, which is safe because nothing of
the message was sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiosmtplib

from gateway.background import Background
from gateway.delivery.results import SessionEvidence


@dataclass(frozen=True)
class SessionKey:
    host: str  # the MX host name (as routed), not the address
    port: int
    level: str  # TlsLevel label
    tlsa: str = ""  # digest of the TLSA records a DANE session was verified with


KEPT_MAX = 60.0  # seconds: the longest an idle session is kept however slow it was to open


@dataclass(frozen=True)
class ReuseLimits:
    idle_time: float = 2.0
    max_age: float = 300.0
    max_messages: int = 100


@dataclass(eq=False)
class Session:
    smtp: aiosmtplib.SMTP
    evidence: SessionEvidence  # of the connection, as established
    opened: float = field(default_factory=time.monotonic)
    setup: float = 0.0  # seconds it took to open
    transactions: int = 0  # completed on this connection
    _idle: asyncio.TimerHandle | None = None


class SessionCache:
    def __init__(self, limits: ReuseLimits, per_key: int):
        self.limits = limits
        self.per_key = per_key
        self._idle: dict[SessionKey, list[Session]] = defaultdict(list)
        self._closing = Background()  # QUITs under way
        self.closed = False

    def take(self, key: SessionKey) -> Session | None:
        """An idle session to ``key`` that is still usable, most recent first."""
        idle = self._idle.get(key)
        while idle:
            session = idle.pop()
            if session._idle is not None:
                session._idle.cancel()
                session._idle = None
            if session.smtp.is_connected and not self._too_old(session):
                return session
            self._quit(session)
        return None

    def give(self, key: SessionKey, session: Session) -> None:
        """A session whose transaction ended cleanly: keep it, or say goodbye."""
        session.transactions += 1
        idle = self._idle[key]
        if (
            self.closed
            or session.transactions >= self.limits.max_messages
            or self._too_old(session)
            or len(idle) >= self.per_key
            or not session.smtp.is_connected
        ):
            self._quit(session)
            return
        idle.append(session)
        kept = max(self.limits.idle_time, min(session.setup, KEPT_MAX))
        session._idle = asyncio.get_running_loop().call_later(kept, self._expire, key, session)

    def idle_sessions(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """Quit every idle session; sessions given back later are quit too."""
        self.closed = True
        for sessions in self._idle.values():
            for session in sessions:
                if session._idle is not None:
                    session._idle.cancel()
                self._quit(session)
        self._idle.clear()
        await self._closing.settle(5)

    def _too_old(self, session: Session) -> bool:
        return time.monotonic() - session.opened >= self.limits.max_age

    def _expire(self, key: SessionKey, session: Session) -> None:
        idle = self._idle.get(key)
        if idle and session in idle:
            idle.remove(session)
            if not idle:
                del self._idle[key]
        session._idle = None
        self._quit(session)

    def _quit(self, session: Session) -> None:
        self._closing.run(quit_session(session.smtp))


async def quit_session(smtp: aiosmtplib.SMTP) -> None:
    """QUIT politely, but never wait long or fail for it; the socket is closed in
    every case (also after a failed TLS handshake, where the session may no longer
    count as connected)."""
    try:
        if smtp.is_connected:
            smtp.timeout = min(smtp.timeout or 10.0, 10.0)
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        smtp.close()
