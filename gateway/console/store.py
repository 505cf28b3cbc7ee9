"""The console store: local accounts (Argon2id password, TOTP secret sealed with the
archive's master keys, roles, lockout), sessions, sign-ins with a provider under way,
and the overview's counts of finished days.

SQLite at ``<state_dir>/console/console.db`` (the daemon's console uses it from one
thread, ``sealgate console user ...`` from another process), or the shared database
(``storage.database``): a session opened on one node is good on every node.

Session ids and sign-in states are kept only as their SHA-256 (the cookie's value is
never stored).  Failures are counted per account in one write transaction from the
stored count, so simultaneous wrong passwords cannot get past the limit; a TOTP time
step, once used, is refused again (RFC 6238 5.2) by the same kind of update.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.archive.sealing import MasterKeys, open_sealed, seal
from gateway.storage.database import Database, Schema
from gateway.storage.migrations import Versioned, prepare

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password TEXT NOT NULL,
    totp {blob} NOT NULL,
    roles TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    locked_until {real} NOT NULL DEFAULT 0,
    last_step {int} NOT NULL DEFAULT 0,
    created {real} NOT NULL,
    updated {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    sid_sha256 TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    display TEXT NOT NULL,
    roles TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created {real} NOT NULL,
    seen {real} NOT NULL,
    expires {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions(expires);
CREATE TABLE IF NOT EXISTS oidc_states (
    state_sha256 TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    nonce TEXT NOT NULL,
    verifier TEXT NOT NULL,
    browser_sha256 TEXT NOT NULL,
    expires {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS daily (
    day TEXT PRIMARY KEY,
    counts TEXT NOT NULL
);
""")
VERSIONED = Versioned("console", (SCHEMA,))

OIDC_STATE_TTL = 600.0  # a sign-in at the provider must come back within this


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Check(enum.Enum):
    RIGHT = "right"
    WRONG = "wrong"
    LOCKED = "locked"  # this failure locked the account
    REFUSED = "refused"  # locked or disabled: nothing compared


@dataclass(frozen=True)
class User:
    name: str
    password: str  # Argon2id (PHC string)
    roles: tuple[str, ...]
    disabled: bool
    failed: int
    locked_until: float
    created: float


@dataclass(frozen=True)
class Session:
    identity: str  # who: "local:<name>" or "<provider>:<sub>"
    display: str  # shown and recorded: the name, or the provider's email/name
    roles: frozenset[str]
    csrf: str
    created: float


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r for r in text.split(",") if r)


class ConsoleStore:
    def __init__(
        self, db: Database, keys: MasterKeys, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        prepare(db, VERSIONED)
        self.keys = keys
        self.clock = clock

    def close(self) -> None:
        self.db.close()

    # -- local accounts ---------------------------------------------------------------

    def add_user(self, name: str, password: str, totp: str, roles: tuple[str, ...]) -> None:
        """A new account (``password``: its Argon2id hash; ``totp``: the base32 secret,
        sealed here).  ValueError: the name is taken."""
        now = self.clock()
        with self.db.transaction():
            if self.db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise ValueError(f"there is already an account {name!r}")
            self.db.execute(
                "INSERT INTO users(name, password, totp, roles, created, updated) "
                "VALUES (?,?,?,?,?,?)",
                (name, password, self._seal(name, totp), ",".join(roles), now, now),
            )

    def reset_user(
        self,
        name: str,
        password: str | None = None,
        totp: str | None = None,
        roles: tuple[str, ...] | None = None,
    ) -> None:
        """New credentials and/or roles; enabled and unlocked again (KeyError: none)."""
        sets = ["disabled=0", "failed=0", "locked_until=0", "updated=?"]
        args: list[Any] = [self.clock()]
        if password is not None:
            sets.append("password=?")
            args.append(password)
        if totp is not None:
            sets += ["totp=?", "last_step=0"]
            args.append(self._seal(name, totp))
        if roles is not None:
            sets.append("roles=?")
            args.append(",".join(roles))
        with self.db.transaction():
            changed = self.db.execute(
                f"UPDATE users SET {', '.join(sets)} WHERE name=?",  # noqa: S608 - fixed fragments
                (*args, name),
            ).rowcount
            if not changed:
                raise KeyError(name)
            self.db.execute("DELETE FROM sessions WHERE identity=?", (f"local:{name}",))

    def disable_user(self, name: str) -> None:
        """No more sign-ins; the account's sessions end now (KeyError: none)."""
        with self.db.transaction():
            changed = self.db.execute(
                "UPDATE users SET disabled=1, updated=? WHERE name=?", (self.clock(), name)
            ).rowcount
            if not changed:
                raise KeyError(name)
            self.db.execute("DELETE FROM sessions WHERE identity=?", (f"local:{name}",))

    def user(self, name: str) -> User | None:
        row = self.db.execute(
            "SELECT name, password, roles, disabled, failed, locked_until, created "
            "FROM users WHERE name=?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        return User(row[0], row[1], _roles(row[2]), bool(row[3]), int(row[4]), row[5], row[6])

    def users(self) -> list[User]:
        names = [r[0] for r in self.db.execute("SELECT name FROM users ORDER BY name")]
        return [u for n in names if (u := self.user(n)) is not None]

    def totp_secret(self, name: str) -> str | None:
        row = self.db.execute("SELECT totp FROM users WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        return open_sealed(bytes(row[0]), f"console-totp-{name}", self.keys).decode()

    def _seal(self, name: str, totp: str) -> bytes:
        return seal(totp.encode(), f"console-totp-{name}", self.keys)

    def check(
        self,
        name: str,
        right: Callable[[User | None], int | None],
        max_failures: int,
        lockout: float,
    ) -> Check:
        """One sign-in of a local account.  ``right(user)``: the TOTP time step its
        password and code matched, or None.  A right answer whose step is not newer
        than the last one used counts as wrong (a replayed code); the
        ``max_failures``-th failure in a row locks the account for ``lockout``.
        While it is locked or disabled nothing is compared (REFUSED); an unknown name
        is WRONG after the same work (the caller answers the same for both)."""
        now = self.clock()
        user = self.user(name)
        if user is None:
            right(None)  # the same work as for a real account: time tells nothing
            return Check.WRONG
        if user.disabled or user.locked_until > now:
            return Check.REFUSED
        step = right(user)  # Argon2id outside the transaction: it takes tens of ms
        with self.db.transaction():
            if step is not None:
                used = self.db.execute(
                    "UPDATE users SET last_step=?, failed=0 WHERE name=? AND last_step < ? "
                    "AND disabled=0 AND locked_until <= ?",
                    (step, name, step, now),
                ).rowcount
                if used:
                    return Check.RIGHT
            row = self.db.execute(
                f"SELECT failed, locked_until FROM users WHERE name=?{self.db.lock_rows}",  # noqa: S608 - a fixed clause
                (name,),
            ).fetchone()
            if row is None or row[1] > now:
                return Check.REFUSED
            failed = int(row[0]) + 1
            if failed >= max_failures:
                self.db.execute(
                    "UPDATE users SET failed=0, locked_until=? WHERE name=?", (now + lockout, name)
                )
                return Check.LOCKED
            self.db.execute("UPDATE users SET failed=? WHERE name=?", (failed, name))
            return Check.WRONG

    # -- sessions ---------------------------------------------------------------------

    def new_session(
        self, identity: str, display: str, roles: frozenset[str], lifetime: float
    ) -> tuple[str, str]:
        """(session id for the cookie, CSRF token for its forms)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        now = self.clock()
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                (
                    _sha(sid),
                    identity,
                    display,
                    ",".join(sorted(roles)),
                    csrf,
                    now,
                    now,
                    now + lifetime,
                ),
            )
        return sid, csrf

    def session(self, sid: str, idle: float) -> Session | None:
        """The live session of ``sid`` (seen within ``idle`` seconds and not past its
        lifetime), marked as seen now; None otherwise (an ended one is deleted)."""
        now = self.clock()
        key = _sha(sid)
        row = self.db.execute(
            "SELECT identity, display, roles, csrf, created, seen, expires FROM sessions "
            "WHERE sid_sha256=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        if row[5] + idle <= now or row[6] <= now:
            with self.db.transaction():
                self.db.execute("DELETE FROM sessions WHERE sid_sha256=?", (key,))
            return None
        with self.db.transaction():
            self.db.execute("UPDATE sessions SET seen=? WHERE sid_sha256=?", (now, key))
        return Session(row[0], row[1], frozenset(_roles(row[2])), row[3], row[4])

    def end_session(self, sid: str) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM sessions WHERE sid_sha256=?", (_sha(sid),))

    # -- sign-in with a provider --------------------------------------------------------

    def put_oidc_state(
        self, state: str, provider: str, nonce: str, verifier: str, browser: str
    ) -> None:
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO oidc_states VALUES (?,?,?,?,?,?)",
                (
                    _sha(state),
                    provider,
                    nonce,
                    verifier,
                    _sha(browser),
                    self.clock() + OIDC_STATE_TTL,
                ),
            )

    def take_oidc_state(self, state: str, browser: str) -> tuple[str, str, str] | None:
        """(provider, nonce, verifier) of a sign-in this browser started, used up;
        None when unknown, expired or begun in another browser."""
        with self.db.transaction():
            row = self.db.execute(
                "DELETE FROM oidc_states WHERE state_sha256=? "
                "RETURNING provider, nonce, verifier, browser_sha256, expires",
                (_sha(state),),
            ).fetchone()
        if (
            row is None
            or row[4] <= self.clock()
            or not secrets.compare_digest(row[3], _sha(browser))
        ):
            return None
        return str(row[0]), str(row[1]), str(row[2])

    # -- upkeep -----------------------------------------------------------------------

    def prune(self) -> None:
        now = self.clock()
        with self.db.transaction():
            self.db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            self.db.execute("DELETE FROM oidc_states WHERE expires <= ?", (now,))

    # -- the overview's counts of finished days -----------------------------------------

    def days(self, first: str, last: str) -> dict[str, dict[str, Any]]:
        rows = self.db.execute(
            "SELECT day, counts FROM daily WHERE day >= ? AND day <= ?", (first, last)
        ).fetchall()
        return {str(d): json.loads(c) for d, c in rows}

    def put_days(self, counts: dict[str, dict[str, Any]]) -> None:
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO daily VALUES (?,?) ON CONFLICT (day) DO UPDATE SET "
                "counts = excluded.counts",
                [(d, json.dumps(c, sort_keys=True)) for d, c in counts.items()],
            )
