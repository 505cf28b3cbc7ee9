"""The portal store: messages waiting for their recipients, sealed each with its own
data key (`gateway.archive.sealing`, the archive's master keys), found by the SHA-256
of their link's token (the token itself is never stored), with their one-time codes,
lockouts and sessions.  A message's content is kept once however many of its
recipients it waits for (``contents``); each recipient's item holds a sealed pointer
to it, and the last item revoked or expired removes it.

SQLite at ``<state_dir>/portal/portal.db``; the daemon's portal uses it from one
thread, ``sealgate portal revoke`` from another process (SQLite serialises them).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.archive.sealing import MasterKeys, open_sealed, seal
from gateway.batching import Outcome
from gateway.model import PortalAuth
from gateway.storage.database import Database, Schema, batch
from gateway.storage.migrations import Versioned, prepare

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    queue_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    created {real} NOT NULL,
    expires {real} NOT NULL,
    sealed {blob},
    revoked {real},
    revoked_by TEXT,
    first_pickup {real},
    pickups INTEGER NOT NULL DEFAULT 0,
    failed_codes INTEGER NOT NULL DEFAULT 0,
    locked_until {real} NOT NULL DEFAULT 0,
    codes_sent INTEGER NOT NULL DEFAULT 0,
    auth TEXT NOT NULL DEFAULT 'code',
    passphrase TEXT
);
CREATE INDEX IF NOT EXISTS items_by_queue_id ON items(queue_id);
CREATE INDEX IF NOT EXISTS items_by_expiry ON items(expires) WHERE sealed IS NOT NULL;
CREATE TABLE IF NOT EXISTS codes (
    item_id TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    expires {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    sid_sha256 TEXT PRIMARY KEY,
    item_id TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires {real} NOT NULL,
    stage TEXT NOT NULL DEFAULT 'open'
);
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    password TEXT NOT NULL,
    created {real} NOT NULL,
    updated {real} NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    locked_until {real} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS resets (
    address TEXT NOT NULL,
    at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS resets_by_address ON resets(address, at);
CREATE TABLE IF NOT EXISTS oidc_states (
    state_sha256 TEXT PRIMARY KEY,
    item_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    nonce TEXT NOT NULL,
    verifier TEXT NOT NULL,
    browser_sha256 TEXT NOT NULL,
    expires {real} NOT NULL
);
""")
# Columns added since the first release: added to an existing (SQLite) database at open.
MIGRATIONS = (
    ("items", "auth", "TEXT NOT NULL DEFAULT 'code'"),
    ("items", "passphrase", "TEXT"),
    ("sessions", "stage", "TEXT NOT NULL DEFAULT 'open'"),
)


def _version_1(db: Database) -> None:
    """The tables (a file from before versions were recorded gets the columns it
    lacks)."""
    db.create(SCHEMA)
    for table, column, kind in MIGRATIONS:
        db.add_column(table, column, kind)


RATES = Schema("""
CREATE TABLE IF NOT EXISTS rates (
    key TEXT PRIMARY KEY,
    window_start {real} NOT NULL,
    hits INTEGER NOT NULL
);
""")


# version 2: request rates counted in the store (shared by the nodes of a cluster)
# version 3: a message's content kept once for all its recipients (``contents``): an
# item's ``sealed`` is then its sealed pointer to it (``content``), still NULL once
# the item is revoked or expired - the last such item takes the content with it.
# Items from before keep the content in ``sealed`` itself.
def _version_3(db: Database) -> None:
    db.create(
        Schema("""
CREATE TABLE IF NOT EXISTS contents (
    id TEXT PRIMARY KEY,
    sealed {blob} NOT NULL
)
""")
    )
    db.add_column("items", "content", "TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS items_by_content ON items(content)")


VERSIONED = Versioned("portal", (_version_1, RATES, _version_3))

OPEN, SET_PASSWORD = "open", "set-password"  # session stages
# where attempts are counted: table, key column, failures column, locked-until column
_ITEM_COUNTS = ("items", "id", "failed_codes", "locked_until")
_ACCOUNT_COUNTS = ("accounts", "address", "failed", "locked_until")
CODE_DIGITS = 8  # 10^8: with 5 tries per lockout, a guess succeeds 1 in 20 million


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Item:
    id: str
    queue_id: str
    recipient: str
    sender: str
    created: float
    expires: float
    revoked: float | None
    first_pickup: float | None
    failed_codes: int
    locked_until: float
    gone: bool  # content deleted (expired and swept, or revoked)
    auth: PortalAuth = PortalAuth.CODE  # how its recipient signs in

    def state(self, now: float) -> str:
        """'revoked', 'expired', 'locked' or 'open'."""
        if self.revoked is not None:
            return "revoked"
        if self.expires <= now or self.gone:
            return "expired"
        if self.locked_until > now:
            return "locked"
        return "open"


class CodeCheck(enum.Enum):
    RIGHT = "right"
    WRONG = "wrong"
    LOCKED = "locked"  # this wrong code locked the link
    REFUSED = "refused"  # the link was locked: not compared


@dataclass(eq=False)
class Deposit:
    """`PortalStore.deposit` as a job of a batch (`PortalStore.deposit_all`)."""

    store: PortalStore
    queue_id: str
    recipient: str
    sender: str
    data: bytes
    expires: float
    auth: PortalAuth = PortalAuth.CODE
    passphrase: str | None = None
    content: str | None = None  # the data's `PortalStore.content_id`, once taken

    def content_id(self) -> str:
        if self.content is None:
            self.content = self.store.content_id(self.queue_id, self.data)
        return self.content

    def __call__(self) -> tuple[Item, str]:
        return self.store.deposit(
            self.queue_id,
            self.recipient,
            self.sender,
            self.data,
            self.expires,
            self.auth,
            self.passphrase,
            self.content_id(),
        )


class PortalStore:
    def __init__(
        self,
        where: Path | Database,
        keys: MasterKeys,
        clock: Callable[[], float] = time.time,
    ):
        """``where``: the SQLite file (``<state_dir>/portal/portal.db``), or an open
        `Database` (SQLite or PostgreSQL)."""
        if not isinstance(where, Database):
            where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            where = Database.sqlite(where)
        self.db = where
        prepare(self.db, VERSIONED)
        self.keys = keys
        self.clock = clock  # every expiry, lockout and session is measured by it

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return self.db.transaction()

    def hit(self, key: str, limit: int, window: float, now: float | None = None) -> bool:
        """Count one request for ``key`` in its current window of ``window`` seconds;
        False once there were ``limit`` already (every node counts in the same row)."""
        now = self.clock() if now is None else now
        start = now - now % window
        row = self.db.execute(
            "INSERT INTO rates VALUES (?,?,1) ON CONFLICT (key) DO UPDATE SET "
            "hits = CASE WHEN rates.window_start < excluded.window_start THEN 1 "
            "ELSE rates.hits + 1 END, "
            "window_start = excluded.window_start RETURNING hits",
            (key, start),
        ).fetchone()
        return int(row[0]) <= limit

    def ids(self) -> list[str]:
        """Every item's id, oldest first."""
        return [r[0] for r in self.db.execute("SELECT id FROM items ORDER BY created")]

    # -- items ----------------------------------------------------------------------

    def deposit(
        self,
        queue_id: str,
        recipient: str,
        sender: str,
        data: bytes,
        expires: float,
        auth: PortalAuth = PortalAuth.CODE,
        passphrase: str | None = None,
        content: str | None = None,
    ) -> tuple[Item, str]:
        """Keep ``data`` for ``recipient`` until ``expires``, opened by ``auth``
        (``passphrase``: its Argon2id hash); returns the item and the token of its
        link (256 random bits; only its digest is stored).  ``content``: the data's
        `content_id`, when the caller took it already."""
        item_id = f"p-{secrets.token_hex(12)}"
        token = secrets.token_urlsafe(32)
        now = self.clock()
        content_id = content or self.content_id(queue_id, data)
        with self._tx():
            # the row is locked until this commits: a revocation or sweep that would
            # remove the content as unused waits, then sees this item
            found = self.db.execute(
                "UPDATE contents SET id=id WHERE id=? RETURNING id", (content_id,)
            ).fetchone()
            if found is None:
                self.db.execute(
                    "INSERT INTO contents(id, sealed) VALUES (?,?) ON CONFLICT (id) "
                    "DO UPDATE SET id=excluded.id",
                    (content_id, seal(data, content_id, self.keys)),
                )
            self.db.execute(
                "INSERT INTO items(id, token_sha256, queue_id, recipient, sender, created, "
                "expires, sealed, auth, passphrase, content) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    item_id,
                    _sha(token),
                    queue_id,
                    recipient,
                    sender,
                    now,
                    expires,
                    seal(content_id.encode(), item_id, self.keys),
                    auth.value,
                    passphrase,
                    content_id,
                ),
            )
        item = self.item_by_id(item_id)
        assert item is not None
        return item, token

    def deposit_all(self, jobs: list[Callable[[], Any]]) -> list[Outcome]:
        """Deposits (`Deposit`s) in one transaction, a savepoint each (`batch`: one
        that fails fails alone), made in the order of the content rows they lock.  A
        deposit holds its content's row until the batch commits, so two nodes
        depositing copies of the same messages at once, each in its own order, could
        each wait for the other's row (PostgreSQL would end one batch as a deadlock;
        SQLite has one writer at a time); in one order, one only waits for the other.
        The outcomes are in the order of ``jobs``."""

        def lock(i: int) -> str:
            job = jobs[i]
            return job.content_id() if isinstance(job, Deposit) else ""

        order = sorted(range(len(jobs)), key=lock)
        outcomes = batch(self.db, [jobs[i] for i in order])
        in_place: list[Outcome] = [(None, None)] * len(jobs)
        for i, outcome in zip(order, outcomes, strict=True):
            in_place[i] = outcome
        return in_place

    def content_id(self, queue_id: str, data: bytes) -> str:
        """One content for every recipient of the message, by its bytes (a copy
        changed for one recipient is another content) - through a keyed digest, so
        that the store does not tell a reader who guesses a message's bytes whether
        they were sent (a key of its own, derived from the current master key)."""
        master = self.keys.keys[self.keys.current]
        key = hmac.new(master, b"sealgate portal content id", hashlib.sha256).digest()
        return f"pc-{queue_id}-{hmac.new(key, data, hashlib.sha256).hexdigest()[:32]}"

    _COLUMNS = (
        "SELECT id, queue_id, recipient, sender, created, expires, revoked, first_pickup, "
        "failed_codes, locked_until, sealed IS NULL, auth FROM items "
    )

    def _item(self, row: tuple[Any, ...] | None) -> Item | None:
        if row is None:
            return None
        (item_id, queue_id, recipient, sender, created, expires, revoked, first_pickup,
         failed, locked_until, gone, auth) = row  # fmt: skip
        return Item(
            item_id, queue_id, recipient, sender, created, expires, revoked, first_pickup,
            failed, locked_until, bool(gone), PortalAuth(auth),
        )  # fmt: skip

    def item(self, token: str) -> Item | None:
        sql = self._COLUMNS + "WHERE token_sha256 = ?"
        return self._item(self.db.execute(sql, (_sha(token),)).fetchone())

    def item_by_id(self, item_id: str) -> Item | None:
        return self._item(self.db.execute(self._COLUMNS + "WHERE id = ?", (item_id,)).fetchone())

    def items_of(self, queue_id: str) -> list[Item]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM items WHERE queue_id=?", (queue_id,))]
        return [i for i in map(self.item_by_id, ids) if i is not None]

    def content(self, item: Item) -> bytes:
        row = self.db.execute(
            "SELECT i.sealed, i.content, c.sealed FROM items i "
            "LEFT JOIN contents c ON c.id = i.content WHERE i.id=?",
            (item.id,),
        ).fetchone()
        if row is None or row[0] is None:
            raise KeyError(item.id)
        sealed, content_id, content = row
        opened = open_sealed(bytes(sealed), item.id, self.keys)
        if content_id is None:
            return opened  # an item from before version 3: the content itself
        if opened != content_id.encode() or content is None:
            raise KeyError(item.id)  # its pointer altered, or the content gone
        return open_sealed(bytes(content), content_id, self.keys)

    def _drop_unused(self, item_ids: list[str]) -> None:
        """In a transaction that ended these items: their content, if no other item
        still uses it (the row locked first, so a deposit under way either commits
        its item before this looks, or makes the content again after)."""
        if not item_ids:
            return
        sql = "SELECT DISTINCT content FROM items WHERE content IS NOT NULL AND id IN ({marks})"
        for (content_id,) in list(self.db.among(sql, item_ids)):
            locked = self.db.execute(
                "SELECT id FROM contents WHERE id=?" + self.db.lock_rows,  # noqa: S608 - a fixed clause
                (content_id,),
            ).fetchone()
            used = self.db.execute(
                "SELECT 1 FROM items WHERE content=? AND sealed IS NOT NULL LIMIT 1",
                (content_id,),
            ).fetchone()
            if locked is not None and used is None:
                self.db.execute("DELETE FROM contents WHERE id=?", (content_id,))

    def picked_up(self, item: Item, now: float) -> bool:
        """Count a pickup; True when it is the first."""
        with self._tx():
            self.db.execute(
                "UPDATE items SET pickups = pickups + 1, first_pickup = coalesce(first_pickup, ?) "
                "WHERE id=?",
                (now, item.id),
            )
        return item.first_pickup is None

    def revoke(self, item_id: str, actor: str) -> bool:
        """Revoke a link: its content is deleted at once, its sessions end."""
        with self._tx():
            changed = self.db.execute(
                "UPDATE items SET revoked=?, revoked_by=?, sealed=NULL "
                "WHERE id=? AND revoked IS NULL",
                (self.clock(), actor, item_id),
            ).rowcount
            self.db.execute("DELETE FROM sessions WHERE item_id=?", (item_id,))
            self.db.execute("DELETE FROM codes WHERE item_id=?", (item_id,))
            self._drop_unused([item_id])
        return bool(changed)

    def sweep(self, now: float) -> list[Item]:
        """Delete the content of expired items; returns those never picked up (each
        once, whichever node sweeps: the rows are taken in the transaction)."""
        unread = []
        with self._tx():
            rows = [
                r[0]
                for r in self.db.execute(
                    "SELECT id FROM items i WHERE sealed IS NOT NULL AND expires <= ?"  # noqa: S608 - a fixed clause
                    + self.db.claim_rows("i"),
                    (now,),
                )
            ]
            for item_id in rows:
                item = self.item_by_id(item_id)
                if item is not None and item.first_pickup is None:
                    unread.append(item)
                self.db.execute("UPDATE items SET sealed=NULL WHERE id=?", (item_id,))
                self.db.execute("DELETE FROM sessions WHERE item_id=?", (item_id,))
            self._drop_unused(rows)
            self.db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            self.db.execute("DELETE FROM codes WHERE expires <= ?", (now,))
            self.db.execute("DELETE FROM rates WHERE window_start < ?", (now - 3600,))
        return unread

    # -- one-time codes -----------------------------------------------------------------

    def new_code(self, item: Item, ttl: float) -> str:
        """A fresh code for the item (earlier ones stop working)."""
        code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
        with self._tx():
            self.db.execute("DELETE FROM codes WHERE item_id=?", (item.id,))
            self.db.execute(
                "INSERT INTO codes VALUES (?,?,?)",
                (item.id, _sha(item.id + code), self.clock() + ttl),
            )
            self.db.execute("UPDATE items SET codes_sent = codes_sent + 1 WHERE id=?", (item.id,))
        return code

    def passphrase_of(self, item: Item) -> str | None:
        """The Argon2id hash of the item's passphrase."""
        row = self.db.execute("SELECT passphrase FROM items WHERE id=?", (item.id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def count_attempt(
        self, item: Item, right: bool, max_attempts: int, lockout: float
    ) -> CodeCheck:
        """Record a passphrase attempt checked outside the database (hashing is slow):
        a right one clears the count, the ``max_attempts``-th wrong one in a row locks
        the link for ``lockout``."""
        with self._tx():
            return self._counted(_ITEM_COUNTS, item.id, lambda: right, max_attempts, lockout)

    def _counted(
        self,
        where: tuple[str, str, str, str],
        key: str,
        right: Callable[[], bool],
        max_attempts: int,
        lockout: float,
    ) -> CodeCheck:
        """Inside a write transaction: while ``key`` is locked nothing is compared
        (REFUSED); else ``right()`` decides: a right attempt clears the count, a wrong
        one counts and the ``max_attempts``-th in a row locks for ``lockout``.  Counted
        from the stored count, never from what was read before the request: attempts
        made at the same time cannot get past the limit."""
        table, key_col, failed_col, lock_col = where
        now = self.clock()
        state = self.db.execute(
            f"SELECT {failed_col}, {lock_col} FROM {table} WHERE {key_col}=?"  # noqa: S608 - fixed names
            + self.db.lock_rows,
            (key,),
        ).fetchone()
        if state is None or state[1] > now:
            return CodeCheck.REFUSED
        if right():
            self.db.execute(f"UPDATE {table} SET {failed_col}=0 WHERE {key_col}=?", (key,))  # noqa: S608 - fixed names
            return CodeCheck.RIGHT
        failed = int(state[0]) + 1
        locked = failed >= max_attempts
        self.db.execute(
            f"UPDATE {table} SET {failed_col}=?, {lock_col}=? WHERE {key_col}=?",  # noqa: S608 - fixed names
            (0 if locked else failed, now + lockout if locked else state[1], key),
        )
        return CodeCheck.LOCKED if locked else CodeCheck.WRONG

    def check_code(self, item: Item, code: str, max_attempts: int, lockout: float) -> CodeCheck:
        """A right code is used up (RIGHT); wrong ones count (WRONG), and the
        ``max_attempts``-th locks the link for ``lockout`` (LOCKED; the code is void);
        while it is locked, nothing is compared (REFUSED).

        Counted in the database, in one write transaction (BEGIN IMMEDIATE), from
        the stored count - never from ``item``, which was read before the request
        body: simultaneous wrong codes cannot get past the limit.  While the link is
        locked no code is compared, the right one included."""
        code = "".join(c for c in code if c.isdigit())
        now = self.clock()

        def right() -> bool:
            row = self.db.execute(
                "SELECT code_sha256 FROM codes WHERE item_id=? AND expires > ?", (item.id, now)
            ).fetchone()
            return row is not None and hmac.compare_digest(row[0], _sha(item.id + code))

        with self._tx():
            checked = self._counted(_ITEM_COUNTS, item.id, right, max_attempts, lockout)
            if checked in (CodeCheck.RIGHT, CodeCheck.LOCKED):  # used up, or void
                self.db.execute("DELETE FROM codes WHERE item_id=?", (item.id,))
        return checked

    def codes_sent(self, item: Item) -> int:
        row = self.db.execute("SELECT codes_sent FROM items WHERE id=?", (item.id,)).fetchone()
        return int(row[0]) if row else 0

    # -- sessions -------------------------------------------------------------------------

    def new_session(self, item: Item, ttl: float, stage: str = OPEN) -> tuple[str, str]:
        """(session id for the cookie, CSRF token for its forms).  ``stage``: `OPEN`
        (the message can be read) or `SET_PASSWORD` (a password must be set first)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        with self._tx():
            self.db.execute(
                "INSERT INTO sessions(sid_sha256, item_id, csrf, expires, stage) "
                "VALUES (?,?,?,?,?)",
                (_sha(sid), item.id, csrf, self.clock() + ttl, stage),
            )
        return sid, csrf

    def session(self, sid: str, item: Item, stage: str = OPEN) -> str | None:
        """The session's CSRF token if ``sid`` is a live session for ``item`` at
        ``stage``."""
        row = self.db.execute(
            "SELECT csrf FROM sessions WHERE sid_sha256=? AND item_id=? AND expires > ? "
            "AND stage=?",
            (_sha(sid), item.id, self.clock(), stage),
        ).fetchone()
        return None if row is None else str(row[0])

    def promote(self, sid: str) -> None:
        """A session that has set its password may read."""
        with self._tx():
            self.db.execute("UPDATE sessions SET stage=? WHERE sid_sha256=?", (OPEN, _sha(sid)))

    # -- recipients' passwords --------------------------------------------------------------

    def password_of(self, address: str) -> str | None:
        row = self.db.execute(
            "SELECT password FROM accounts WHERE address=?", (address.casefold(),)
        ).fetchone()
        return None if row is None else str(row[0])

    def account_locked(self, address: str) -> float:
        """Until when the address's password is locked (0: not)."""
        row = self.db.execute(
            "SELECT locked_until FROM accounts WHERE address=?", (address.casefold(),)
        ).fetchone()
        until = float(row[0]) if row else 0.0
        return until if until > self.clock() else 0.0

    def set_password(self, address: str, encoded: str) -> bool:
        """Set (or replace) the address's password; True when it replaced one."""
        now, key = self.clock(), address.casefold()
        with self._tx():
            replaced = self.db.execute(
                "UPDATE accounts SET password=?, updated=?, failed=0, locked_until=0 "
                "WHERE address=?",
                (encoded, now, key),
            ).rowcount
            if not replaced:
                self.db.execute(
                    "INSERT INTO accounts(address, password, created, updated) VALUES (?,?,?,?)",
                    (key, encoded, now, now),
                )
        return bool(replaced)

    def count_password(
        self, address: str, right: bool, max_attempts: int, lockout: float
    ) -> CodeCheck:
        """Record a password attempt (checked outside the database): failures count per
        address across its messages; the ``max_attempts``-th in a row locks it."""
        with self._tx():
            return self._counted(
                _ACCOUNT_COUNTS, address.casefold(), lambda: right, max_attempts, lockout
            )

    def resets_today(self, address: str) -> int:
        since = self.clock() - 86400
        row = self.db.execute(
            "SELECT count(*) FROM resets WHERE address=? AND at > ?", (address.casefold(), since)
        ).fetchone()
        return int(row[0])

    def note_reset(self, address: str) -> None:
        with self._tx():
            self.db.execute("INSERT INTO resets VALUES (?,?)", (address.casefold(), self.clock()))
            self.db.execute("DELETE FROM resets WHERE at <= ?", (self.clock() - 86400,))

    # -- OpenID Connect sign-ins under way --------------------------------------------------

    def save_oidc(
        self, state: str, item: Item, provider: str, nonce: str, verifier: str, browser: str
    ) -> None:
        with self._tx():
            self.db.execute("DELETE FROM oidc_states WHERE expires <= ?", (self.clock(),))
            self.db.execute(
                "INSERT INTO oidc_states VALUES (?,?,?,?,?,?,?)",
                (
                    _sha(state),
                    item.id,
                    provider,
                    nonce,
                    verifier,
                    _sha(browser),
                    self.clock() + 600,
                ),
            )

    def take_oidc(self, state: str, browser: str) -> tuple[str, str, str, str] | None:
        """(item id, provider, nonce, verifier) of a sign-in under way in this browser;
        used up by this call."""
        with self._tx():
            row = self.db.execute(
                "SELECT item_id, provider, nonce, verifier, browser_sha256 FROM oidc_states "
                "WHERE state_sha256=? AND expires > ?",
                (_sha(state), self.clock()),
            ).fetchone()
            self.db.execute("DELETE FROM oidc_states WHERE state_sha256=?", (_sha(state),))
        if row is None or not hmac.compare_digest(str(row[4]), _sha(browser)):
            return None
        return str(row[0]), str(row[1]), str(row[2]), str(row[3])

    def end_session(self, sid: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM sessions WHERE sid_sha256=?", (_sha(sid),))

    def stats(self) -> Iterator[tuple[str, int]]:
        now = self.clock()
        yield (
            "waiting",
            self.db.execute(
                "SELECT count(*) FROM items "
                "WHERE sealed IS NOT NULL AND expires > ? AND revoked IS NULL",
                (now,),
            ).fetchone()[0],
        )
