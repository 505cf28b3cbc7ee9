"""The journal: every accepted message and every event about it, encrypted at rest,
each record committed to the Merkle log (`merkle`), the log pinned by signed
checkpoints (`checkpoint`), and `Archive.verify` able to name any record that was
altered, removed or added behind the log's back.

Storage sits behind two small interfaces, so that other backends (PostgreSQL for the
index, S3-compatible object storage with Object Lock for blobs) can be added without
touching this module:

- `BlobStore`: sealed message records by name (embedded default: `SqliteBlobStore`,
  rows in the index's database; `FileBlobStore`, a file each, for comparison and
  for stores that want files);
- `ArchiveIndex`: the log's leaves, the records' metadata and the checkpoints
  (embedded default: SQLite in WAL mode).

Leaves hold commitments only - record kind, id and the SHA-256 of the record - never
an address or a subject, so the log, its proofs and checkpoints can be handed to an
auditor without disclosing PHI.

Not yet wired into the mail path (issue 6 continues): the queue manager is to journal
each message when it arrives (and at start whatever the spool holds that the archive
lacks), each attempt's evidence, and keep a message's spool file until its archived
copy is on disk (`make_durable`).  A first wiring measured the relay at 0.56-0.75 of
Postfix: the per-message write path needs batching work first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway import sqlite_tx
from gateway.archive import merkle
from gateway.archive.checkpoint import Checkpoint, CheckpointError, sign, verify
from gateway.archive.sealing import MasterKeys, SealError, open_sealed, seal

DEFAULT_RETENTION = 6 * 365.25 * 86400  # HIPAA: six years


def canonical(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: the bytes a commitment is made over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- storage interfaces ------------------------------------------------------------------


class BlobStore(Protocol):
    def put(self, name: str, data: bytes, durable: bool = True) -> None: ...
    def make_durable_all(self, names: list[str]) -> None: ...
    def get(self, name: str) -> bytes | None: ...
    def delete(self, name: str) -> bool: ...
    def names(self) -> Iterator[str]: ...


class FileBlobStore:
    """One file per blob under ``root``, written to a temporary name, fsynced and
    renamed, then the directory fsynced: a blob is either whole or absent."""

    def __init__(self, root: Path):
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a blob name")
        return self.root / name

    def put(self, name: str, data: bytes, durable: bool = True) -> None:
        """Write the blob; with ``durable=False`` the caller makes it durable later
        (`make_durable_all`), e.g. in a batch, while another durable copy exists."""
        path = self._path(name)
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            self._sync_dir()

    def make_durable_all(self, names: list[str]) -> None:
        for name in names:
            fd = os.open(self._path(name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._sync_dir()

    def _sync_dir(self) -> None:
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> bool:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self) -> Iterator[str]:
        return (p.name for p in self.root.iterdir() if not p.name.startswith("."))


class SqliteBlobStore:
    """Blobs as rows of a SQLite table in the index's own database: no file-system
    operation per message (a file each cost about 0.6 ms of system time per message
    here), and a blob and its index rows commit together.  Durable when the
    database's write-ahead log is synced (`Archive.make_durable`)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        db.execute("CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL)")

    def put(self, name: str, data: bytes, durable: bool = True) -> None:
        self.db.execute("INSERT OR REPLACE INTO blobs(name, data) VALUES (?,?)", (name, data))

    def make_durable_all(self, names: list[str]) -> None:
        pass  # the write-ahead log sync covers it

    def get(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM blobs WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def delete(self, name: str) -> bool:
        return bool(self.db.execute("DELETE FROM blobs WHERE name=?", (name,)).rowcount)

    def names(self) -> Iterator[str]:
        return (r[0] for r in self.db.execute("SELECT name FROM blobs").fetchall())


INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
    idx INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    kind TEXT NOT NULL,
    record_id TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    record_id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    received_at TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    recipients TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    leaf INTEGER NOT NULL,
    retain_until REAL NOT NULL,
    disposed TEXT
);
CREATE TABLE IF NOT EXISTS holds (
    case_name TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    placed REAL NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (case_name, queue_id)
);
CREATE TABLE IF NOT EXISTS events (
    record_id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    leaf INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_message ON events(queue_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class ArchiveIndex:
    """The embedded index: SQLite (WAL) at ``path``."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: commits reach the disk at the latest when `make_durable` syncs the
        # write-ahead log - which the queue does before a spool file may go
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.path = path
        self.db.executescript(INDEX_SCHEMA)

    def close(self) -> None:
        self.db.close()


# -- the archive --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding of `Archive.verify`: which record, and what is wrong with it."""

    record_id: str
    leaf: int | None
    what: str


@dataclass
class Report:
    leaves: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Archive:
    """Writes are meant for one thread; `batch` runs many in one transaction (and
    makes the blobs they wrote durable once, before the commit)."""

    def __init__(
        self,
        blobs: BlobStore,
        index: ArchiveIndex,
        keys: MasterKeys,
        origin: str,
        signing_key: ed25519.Ed25519PrivateKey,
        key_name: str,
    ):
        self.blobs, self.index, self.keys = blobs, index, keys
        self.origin, self.signing_key, self.key_name = origin, signing_key, key_name

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return sqlite_tx.transaction(self.index.db)

    def batch(self, jobs: list[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
        """Run several writes as one transaction (group commit), each in a savepoint
        so that one failing is undone alone."""
        return sqlite_tx.batch(self.index.db, jobs)

    def make_durable(self, queue_ids: list[str]) -> None:
        """Put these messages' archived copies, and every committed index record, on
        disk (fsync of each blob, the blob directory and the index's write-ahead
        log).  Safe from another thread: files only, no database connection."""
        if queue_ids:
            self.blobs.make_durable_all([f"msg-{q}" for q in queue_ids])
        wal = self.index.path.with_name(self.index.path.name + "-wal")
        for path in (wal, self.index.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- writing ------------------------------------------------------------------------

    def _append(self, kind: str, record_id: str, digest: str, now: float) -> int:
        leaf = merkle.leaf_hash(canonical({"kind": kind, "id": record_id, "sha256": digest}))
        cur = self.index.db.execute(
            "INSERT INTO leaves(hash, kind, record_id, at) VALUES (?,?,?,?)",
            (leaf, kind, record_id, now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid - 1  # leaf indexes from 0

    def has(self, queue_id: str) -> bool:
        """Journaled, with its blob there (a crash can lose a blob written without
        fsync while the spool still holds the message: it is journaled again)."""
        found = self.index.db.execute(
            "SELECT 1 FROM messages WHERE queue_id=?", (queue_id,)
        ).fetchone()
        return found is not None and self.blobs.get(f"msg-{queue_id}") is not None

    def journal_message(
        self,
        envelope: dict[str, Any],
        data: bytes,
        retain_until: float | None = None,
        durable: bool = True,
    ) -> str:
        """The message as received and its envelope (every recipient, Bcc included):
        sealed into a blob, committed to the log, indexed, kept until ``retain_until``
        (default: `DEFAULT_RETENTION` from now).  Returns its record id."""
        queue_id = str(envelope["queue_id"])
        record_id = f"msg-{queue_id}"
        record = canonical(envelope) + b"\n" + data
        digest = hashlib.sha256(record).hexdigest()
        self.blobs.put(record_id, seal(record, record_id, self.keys), durable)
        now = time.time()
        db = self.index.db
        with self._transaction():
            leaf = self._append("message", record_id, digest, now)
            db.execute(
                "INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                (
                    record_id,
                    queue_id,
                    str(envelope.get("received_at", "")),
                    str(envelope.get("mail_from", "")),
                    json.dumps([r["address"] for r in envelope.get("recipients", [])]),
                    len(data),
                    hashlib.sha256(data).hexdigest(),
                    leaf,
                    retain_until if retain_until is not None else now + DEFAULT_RETENTION,
                ),
            )
        return record_id

    # -- retention, holds and disposition ---------------------------------------------

    def hold(self, case_name: str, queue_ids: list[str], actor: str) -> int:
        """Place a legal hold: these messages are not purged while it stands.  The
        hold itself is a record in the log."""
        now = time.time()
        db = self.index.db
        with self._transaction():
            placed = 0
            for queue_id in queue_ids:
                placed += db.execute(
                    "INSERT OR IGNORE INTO holds VALUES (?,?,?,?)",
                    (case_name, queue_id, now, actor),
                ).rowcount
        self.journal_event(
            "", "hold", {"case": case_name, "queue_ids": sorted(queue_ids), "actor": actor}
        )
        return placed

    def release(self, case_name: str, actor: str) -> int:
        with self._transaction():
            released = self.index.db.execute(
                "DELETE FROM holds WHERE case_name=?", (case_name,)
            ).rowcount
        self.journal_event("", "hold-release", {"case": case_name, "actor": actor})
        return int(released)

    def expired(self, now: float | None = None) -> list[str]:
        """Messages past their retention that no hold covers (oldest first)."""
        now = time.time() if now is None else now
        rows = self.index.db.execute(
            "SELECT queue_id FROM messages m WHERE disposed IS NULL AND retain_until <= ? "
            "AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.queue_id = m.queue_id) "
            "ORDER BY retain_until",
            (now,),
        )
        return [r[0] for r in rows]

    def purge(
        self, queue_ids: list[str], reason: str, actor: str, now: float | None = None
    ) -> list[str]:
        """Remove the content of expired, unheld messages; each removal is a
        disposition record in the log (so `verify` tells a lawful purge from a
        removal behind its back).  Returns the messages purged."""
        allowed = set(self.expired(now))
        purged = []
        for queue_id in queue_ids:
            if queue_id not in allowed:
                continue
            row = self.index.db.execute(
                "SELECT record_id, sha256 FROM messages WHERE queue_id=?", (queue_id,)
            ).fetchone()
            disposition = self.journal_event(
                queue_id,
                "disposition",
                {"record_id": row[0], "content_sha256": row[1], "reason": reason, "actor": actor},
            )
            with self._transaction():
                self.index.db.execute(
                    "UPDATE messages SET disposed=? WHERE record_id=?", (disposition, row[0])
                )
            self.blobs.delete(row[0])
            purged.append(queue_id)
        return purged

    def journal_event(self, queue_id: str, kind: str, body: dict[str, Any]) -> str:
        """An event about a message (decision, delivery attempt, access): indexed in
        full, committed to the log by its digest."""
        now = time.time()
        text = canonical({"queue_id": queue_id, "kind": kind, "at": now, **body}).decode()
        digest = hashlib.sha256(text.encode()).hexdigest()
        db = self.index.db
        with self._transaction():
            count = db.execute("SELECT count(*) FROM leaves").fetchone()[0]
            record_id = f"evt-{count}"
            leaf = self._append("event", record_id, digest, now)
            db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?)", (record_id, queue_id, kind, text, leaf)
            )
        return record_id

    def checkpoint(self) -> str:
        """Sign the log as it stands; the note is kept and returned (publish it)."""
        leaves = self._leaves()
        cp = Checkpoint(self.origin, len(leaves), merkle.root(leaves))
        note = sign(cp, self.key_name, self.signing_key)
        with self._transaction():
            self.index.db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                (cp.size, cp.root, note, time.time()),
            )
        return note

    # -- reading ------------------------------------------------------------------------

    def _leaves(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.index.db.execute("SELECT hash FROM leaves ORDER BY idx")]

    def message(self, queue_id: str) -> tuple[dict[str, Any], bytes]:
        record_id = f"msg-{queue_id}"
        blob = self.blobs.get(record_id)
        if blob is None:
            raise KeyError(record_id)
        record = open_sealed(blob, record_id, self.keys)
        head, _, data = record.partition(b"\n")
        return json.loads(head), data

    # -- verification --------------------------------------------------------------------

    def verify(self, public: ed25519.Ed25519PublicKey | None = None) -> Report:
        """Check every record against its leaf, the leaves against every stored
        checkpoint (signature, then consistency with the log), and that nothing is
        in the store or index that the log does not know."""
        public = public or self.signing_key.public_key()
        db = self.index.db
        rows = db.execute("SELECT idx, hash, kind, record_id FROM leaves ORDER BY idx").fetchall()
        report = Report(leaves=len(rows))
        leaves = [bytes(r[1]) for r in rows]
        seen: set[str] = set()
        messages = {
            r[0]: r for r in db.execute("SELECT record_id, leaf, sha256, disposed FROM messages")
        }
        disposals = {
            json.loads(body)["record_id"]: record_id
            for record_id, body in db.execute(
                "SELECT record_id, body FROM events WHERE kind='disposition'"
            )
        }
        events = {r[0]: r for r in db.execute("SELECT record_id, leaf, body FROM events")}
        for position, (idx, leaf, kind, record_id) in enumerate(rows):
            if idx - 1 != position:
                report.problems.append(Problem(record_id, position, "a leaf is missing before it"))
            seen.add(record_id)
            if kind == "message":
                row = messages.get(record_id)
                if row is not None and row[3] is not None and record_id in disposals:
                    if self.blobs.get(record_id) is not None:
                        what = "disposed of, but its content is still stored"
                        report.problems.append(Problem(record_id, position, what))
                    continue  # purged under retention, and the log says so
                self._check_message(record_id, position, bytes(leaf), row, report)
            else:
                row = events.get(record_id)
                if row is None:
                    report.problems.append(Problem(record_id, position, "its index row is gone"))
                    continue
                digest = hashlib.sha256(row[2].encode()).hexdigest()
                commitment = canonical({"kind": kind, "id": record_id, "sha256": digest})
                if merkle.leaf_hash(commitment) != bytes(leaf):
                    report.problems.append(
                        Problem(record_id, position, "its index row was altered")
                    )
        for record_id in set(messages) | set(events):
            if record_id not in seen:
                report.problems.append(Problem(record_id, None, "indexed but not in the log"))
        for name in self.blobs.names():
            if name not in seen:
                report.problems.append(Problem(name, None, "a stored blob the log does not know"))
        previous: Checkpoint | None = None
        for size, root_hash, note in db.execute(
            "SELECT size, root, note FROM checkpoints ORDER BY size"
        ):
            report.checkpoints += 1
            try:
                cp = verify(note, self.key_name, public)
            except CheckpointError as e:
                report.problems.append(Problem(f"checkpoint-{size}", None, str(e)))
                continue
            if cp.size != size or cp.root != bytes(root_hash):
                report.problems.append(
                    Problem(f"checkpoint-{size}", None, "does not match its index row")
                )
                continue
            if cp.size > len(leaves):
                report.problems.append(
                    Problem(f"checkpoint-{size}", None, "the log is shorter: leaves were removed")
                )
                continue
            if merkle.root(leaves[: cp.size]) != cp.root:
                report.problems.append(
                    Problem(f"checkpoint-{size}", None, "the log no longer has this root")
                )
            if previous is not None and cp.size > previous.size:
                proof = merkle.consistency_proof(previous.size, leaves[: cp.size])
                if not merkle.verify_consistency(
                    previous.size, cp.size, proof, previous.root, cp.root
                ):
                    report.problems.append(
                        Problem(f"checkpoint-{size}", None, "not consistent with the one before")
                    )
            previous = cp
        return report

    def _check_message(
        self, record_id: str, position: int, leaf: bytes, row: Any, report: Report
    ) -> None:
        if row is None:
            report.problems.append(Problem(record_id, position, "its index row is gone"))
        blob = self.blobs.get(record_id)
        if blob is None:
            report.problems.append(Problem(record_id, position, "its stored message is gone"))
            return
        try:
            record = open_sealed(blob, record_id, self.keys)
        except SealError as e:
            report.problems.append(Problem(record_id, position, f"its stored message: {e}"))
            return
        digest = hashlib.sha256(record).hexdigest()
        commitment = canonical({"kind": "message", "id": record_id, "sha256": digest})
        if merkle.leaf_hash(commitment) != leaf:
            report.problems.append(Problem(record_id, position, "does not match its leaf"))
        elif row is not None:
            data = record.partition(b"\n")[2]
            if hashlib.sha256(data).hexdigest() != row[2]:
                report.problems.append(Problem(record_id, position, "its index row was altered"))
