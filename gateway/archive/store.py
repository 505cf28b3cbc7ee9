"""Where the archive keeps things, behind two interfaces so that other backends -
PostgreSQL for the index, S3-compatible object storage with Object Lock for blobs -
can be added without touching the journal or the mail path:

- `BlobStore`: sealed records by name (embedded default `SqlBlobStore`: rows in
  the index's own database; `FileBlobStore`: a file each).  Contract:
  tests/archive/test_blob_contract.py, which every store must pass.
- `ArchiveIndex`: the log's leaves, the records' metadata, cases and holds,
  checkpoints and settings (``INDEX_SCHEMA``; embedded default SQLite in WAL mode,
  or PostgreSQL).  Contract: tests/archive/test_journal.py on both.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from gateway.durable import fsync_dir, write_file
from gateway.storage.database import Database, Dialect, Schema
from gateway.storage.migrations import Versioned, prepare
from gateway.storage.stores import ARCHIVE_PAGE_SIZE


class BlobStore(Protocol):
    def put(self, name: str, data: bytes, durable: bool = True) -> None: ...
    def make_durable_all(self, names: list[str]) -> None: ...
    def get(self, name: str) -> bytes | None: ...
    def present(self, names: list[str]) -> set[str]: ...
    def delete(self, name: str) -> bool: ...
    def names(self) -> Iterator[str]: ...


def check_name(name: str) -> str:
    """Blob names are record ids: no path separators, no leading dot (every store
    refuses the same names, so records move between stores)."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200:
        raise ValueError(f"{name!r} is not a blob name")
    return name


class FileBlobStore:
    """One file per blob under ``root``, written to a temporary name, fsynced and
    renamed, then the directory fsynced: a blob is either whole or absent."""

    def __init__(self, root: Path):
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def put(self, name: str, data: bytes, durable: bool = True) -> None:
        """Write the blob; with ``durable=False`` the caller makes it durable later
        (`make_durable_all`), e.g. in a batch, while another durable copy exists."""
        # whole or not at all: a full disk never leaves a truncated blob in place
        write_file(self._path(name), data, 0o600, sync=durable)

    def make_durable_all(self, names: list[str]) -> None:
        for name in names:
            fd = os.open(self._path(name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.root)

    def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def present(self, names: list[str]) -> set[str]:
        """Those of ``names`` that are stored (nothing is read)."""
        return {name for name in names if self._path(name).exists()}

    def delete(self, name: str) -> bool:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self) -> Iterator[str]:
        return (p.name for p in self.root.iterdir() if not p.name.startswith("."))


class SqlBlobStore:
    """Blobs as rows of a table in the index's own database (SQLite, or PostgreSQL
    through `gateway.storage.database`): no file-system operation per message (a file
    each cost about 0.6 ms of system time per message here), and a blob and its
    index rows commit together.  On SQLite durable when the write-ahead log is synced
    (`Archive.make_durable`); on PostgreSQL at commit."""

    def __init__(self, db: Database):
        self.db = db
        prepare(self.db, BLOB_VERSIONED)

    def put(self, name: str, data: bytes, durable: bool = True) -> None:
        self.db.write(
            "INSERT INTO blobs(name, data) VALUES (?,?) "
            "ON CONFLICT (name) DO UPDATE SET data=excluded.data",
            (check_name(name), data),
        )

    def make_durable_all(self, names: list[str]) -> None:
        pass  # the write-ahead log sync covers it

    def get(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM blobs WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def present(self, names: list[str]) -> set[str]:
        """Those of ``names`` that are stored (nothing is read)."""
        sql = "SELECT name FROM blobs WHERE name IN ({marks})"
        return {name for (name,) in self.db.among(sql, names)}

    def delete(self, name: str) -> bool:
        return bool(self.db.execute("DELETE FROM blobs WHERE name=?", (name,)).rowcount)

    def names(self) -> Iterator[str]:
        return (r[0] for r in self.db.execute("SELECT name FROM blobs"))


BLOB_SCHEMA = Schema(
    "CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data {blob} NOT NULL)"
)

INDEX_SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS leaves (
    idx {int} PRIMARY KEY,
    hash {blob} NOT NULL,
    kind TEXT NOT NULL,
    record_id TEXT NOT NULL,
    at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS leaves_by_record ON leaves(record_id);
CREATE TABLE IF NOT EXISTS log_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    size {int} NOT NULL
);
-- (WHERE TRUE: so that SQLite does not read ON CONFLICT as a join's ON)
INSERT INTO log_head SELECT 1, coalesce(max(idx), 0) FROM leaves WHERE TRUE ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS messages (
    record_id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    received {real} NOT NULL,
    mail_from TEXT NOT NULL,
    sender_domain TEXT NOT NULL,
    message_id TEXT,
    client_ip TEXT NOT NULL,
    size {int} NOT NULL,
    sha256 TEXT NOT NULL,
    leaf {int} NOT NULL,
    retain_until {real} NOT NULL,
    disposed TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_sender ON messages(mail_from, received);
CREATE INDEX IF NOT EXISTS messages_by_sender_domain ON messages(sender_domain, received);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages(received);
CREATE INDEX IF NOT EXISTS messages_by_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_by_retention ON messages(retain_until) WHERE disposed IS NULL;
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    mode TEXT,
    rule TEXT,
    state TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_id, idx)
);
CREATE INDEX IF NOT EXISTS recipients_by_address ON recipients(address);
CREATE INDEX IF NOT EXISTS recipients_by_domain ON recipients(domain);
CREATE TABLE IF NOT EXISTS copies (
    record_id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size {int} NOT NULL,
    leaf {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS copies_by_message ON copies(queue_id);
CREATE TABLE IF NOT EXISTS cases (
    case_name TEXT PRIMARY KEY,
    query TEXT,
    placed {real} NOT NULL,
    actor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    case_name TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    PRIMARY KEY (case_name, queue_id)
);
CREATE INDEX IF NOT EXISTS holds_by_message ON holds(queue_id);
CREATE TABLE IF NOT EXISTS events (
    record_id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at {real} NOT NULL,
    body TEXT NOT NULL,
    leaf {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_message ON events(queue_id);
CREATE INDEX IF NOT EXISTS events_by_kind ON events(kind, at);
CREATE TABLE IF NOT EXISTS checkpoints (
    size {int} PRIMARY KEY,
    root {blob} NOT NULL,
    note TEXT NOT NULL,
    at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
""")
# Content being written to a blob store outside the index (files, a bucket): its
# name, committed before the content is stored and removed in the transaction that
# commits its record - what a writer that stopped in between left behind is known
# for what it is (`Archive.sweep_unfinished`), not taken for content the log lost.
UNFINISHED_SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS unfinished (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    since {real} NOT NULL
)
""")
INDEX_VERSIONED = Versioned("archive", (INDEX_SCHEMA, UNFINISHED_SCHEMA))
BLOCK = 32  # log positions taken at once, beyond what a batch expects
BLOB_VERSIONED = Versioned("archive_blobs", (BLOB_SCHEMA,))
# Subjects for search: SQLite's full-text index, PostgreSQL's text search (the same
# matching: words, case folded, a phrase in order).
SUBJECTS = {
    Dialect.SQLITE: Schema(
        "CREATE VIRTUAL TABLE IF NOT EXISTS subjects USING fts5(subject, queue_id UNINDEXED)"
    ),
    Dialect.POSTGRESQL: Schema("""
CREATE TABLE IF NOT EXISTS subjects (subject TEXT NOT NULL, queue_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS subjects_by_message ON subjects(queue_id);
CREATE INDEX IF NOT EXISTS subjects_words ON subjects USING GIN (to_tsvector('simple', subject));
"""),
}


class ArchiveIndex:
    """The log's leaves and everything indexed about the records, in a `Database`:
    SQLite (WAL) at a path - the embedded default - or PostgreSQL, shared by every
    node of a cluster.

    The log is one sequence for all writers: a leaf's position comes from the one
    row of ``log_head``, which a writer updates inside its transaction - so on
    PostgreSQL appends from several nodes queue on that row lock and the positions
    stay gapless (a transaction that rolls back gives its number back)."""

    def __init__(self, where: Path | Database, subjects: bool = False):
        if isinstance(where, Database):
            self.db = where
            self.path = Path(where.name) if where.dialect is Dialect.SQLITE else None
        else:
            # NORMAL: commits reach the disk at the latest when `make_durable` syncs
            # the write-ahead log - which the queue does before a spool file may go
            self.db = Database.sqlite(where, synchronous="NORMAL", page_size=ARCHIVE_PAGE_SIZE)
            self.path = where
        prepare(self.db, INDEX_VERSIONED)
        self._block: collections.deque[int] | None = None
        if subjects:  # the index of subjects is made when it is first asked for
            self.db.create(SUBJECTS[self.db.dialect])
        self.subjects = subjects

    def close(self) -> None:
        self.db.close()

    def next_leaf(self) -> int:
        """The next leaf's position (from 0), taken inside the caller's transaction."""
        if self._block is None:
            row = self.db.execute("UPDATE log_head SET size = size + 1 RETURNING size").fetchone()
            return int(row[0]) - 1
        if not self._block:  # used up: another block
            self._take(BLOCK)
        return self._block.popleft()

    def _take(self, size: int) -> None:
        assert self._block is not None
        row = self.db.execute(
            "UPDATE log_head SET size = size + ? RETURNING size", (size,)
        ).fetchone()
        self._block.extend(range(int(row[0]) - size, int(row[0])))

    @contextlib.contextmanager
    def block(self, expected: int = 0) -> Iterator[None]:
        """Inside one transaction (a batch that is undone whole if anything fails):
        positions are taken a block at a time - the first one at once, one for each
        of the ``expected`` leaves, later ones (more leaves than that, or none
        expected) `BLOCK` at a time when needed - and those left over given back
        before it commits.  The row stays locked meanwhile, so nobody else saw
        them and the log has no gap.  (A block taken midway is a statement that
        first sends the writes kept so far, `Database.execute`: it splits each
        table's multi-row statements.)"""
        self._block = collections.deque()
        try:
            if expected:
                self._take(expected)
            yield
            if self._block:
                self.db.execute("UPDATE log_head SET size = size - ?", (len(self._block),))
        finally:
            self._block = None

    def size(self) -> int:
        return int(self.db.execute("SELECT size FROM log_head").fetchone()[0])

    def setting(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def put_setting(self, name: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings VALUES (?,?) "
            "ON CONFLICT (name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    def subject_match(self, text: str) -> tuple[str, list[str]]:
        """A condition on ``m.queue_id``: the subject holds ``text`` as a phrase."""
        if self.db.dialect is Dialect.POSTGRESQL:
            return (
                "m.queue_id IN (SELECT queue_id FROM subjects WHERE "
                "to_tsvector('simple', subject) @@ phraseto_tsquery('simple', ?))",
                [text],
            )
        phrase = '"' + text.replace('"', '""') + '"'
        return "m.queue_id IN (SELECT queue_id FROM subjects WHERE subjects MATCH ?)", [phrase]

    def make_durable(self) -> None:
        """Every committed row on disk (SQLite: fsync of the write-ahead log and the
        file; PostgreSQL: already, at commit).  Files only: safe from any thread."""
        if self.path is None:
            return
        for path in (self.path.with_name(self.path.name + "-wal"), self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def bytes_used(self) -> int:
        """What the index (and blobs kept in it) take on disk."""
        if self.path is None:
            row = self.db.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            ).fetchone()
            return int(row[0])
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.exists())
