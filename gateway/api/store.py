"""store - the message API's own records, in the queue's database (its schema's
version 7): which key submitted which message (a ``send`` key may revoke its own;
written by the queue in the transaction that records the message), and
``Idempotency-Key`` requests for 24 hours.

An idempotent request is recorded *before* its message is spooled, with the queue id
it will have: a retry that finds the record answers with that id when the message
exists (in the spool or the queue), so a message is never submitted twice - not even
when the first request's answer was lost in a crash after the spool's fsync; a retry
that finds no such message (the crash came before the fsync) submits it again under
the same record.

Blocking: called from a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.storage.database import Database, Schema

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS api_messages (
    queue_id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    created {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS api_requests (
    key_name TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    created {real} NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, idempotency_key)
);
CREATE INDEX IF NOT EXISTS api_requests_created ON api_requests(created)
""")

IDEMPOTENCY_WINDOW = 86400.0

# written by the queue with the message it records (`QueueStore.add`)
INSERT_MESSAGE = "INSERT INTO api_messages VALUES (?,?,?) ON CONFLICT (queue_id) DO NOTHING"


@dataclass(frozen=True)
class Earlier:
    """An earlier request under the same Idempotency-Key."""

    request_sha256: str
    queue_id: str
    done: bool  # its message was stored (else: in progress, or it never was)
    created: float


class ApiStore:
    def __init__(self, db: Database):
        from gateway.queue.store import VERSIONED  # the tables are the queue store's
        from gateway.storage.migrations import prepare

        self.db = db
        prepare(db, VERSIONED)

    def close(self) -> None:
        self.db.close()

    def remember(
        self, key_name: str, idempotency_key: str, request_sha256: str, queue_id: str, now: float
    ) -> Earlier | None:
        """Record a request; the earlier one under the same key (within 24 h) if any,
        and then nothing is recorded."""
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM api_requests WHERE created < ?", (now - IDEMPOTENCY_WINDOW,)
            )
            cursor = self.db.execute(
                "INSERT INTO api_requests VALUES (?,?,?,?,?,0) "
                "ON CONFLICT (key_name, idempotency_key) DO NOTHING",
                (key_name, idempotency_key, request_sha256, queue_id, now),
            )
            if cursor.rowcount == 1:
                return None
            row = self.db.execute(
                "SELECT request_sha256, queue_id, done, created FROM api_requests "
                "WHERE key_name = ? AND idempotency_key = ?",
                (key_name, idempotency_key),
            ).fetchone()
        return Earlier(str(row[0]), str(row[1]), bool(row[2]), float(row[3]))

    def take_over(
        self, key_name: str, idempotency_key: str, before: str, queue_id: str, now: float
    ) -> bool:
        """The earlier request's message never made it: this request continues under
        the record with its own id - unless another one took it over first."""
        with self.db.transaction():
            cursor = self.db.execute(
                "UPDATE api_requests SET queue_id = ?, created = ? WHERE key_name = ? "
                "AND idempotency_key = ? AND queue_id = ? AND done = 0",
                (queue_id, now, key_name, idempotency_key, before),
            )
            return bool(cursor.rowcount == 1)

    def forget(self, key_name: str, idempotency_key: str, queue_id: str) -> None:
        """The request failed before its message was stored: a retry starts anew."""
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM api_requests WHERE key_name = ? AND idempotency_key = ? "
                "AND queue_id = ? AND done = 0",
                (key_name, idempotency_key, queue_id),
            )

    def stored(self, key_name: str, idempotency_key: str) -> None:
        """The request's message is in the spool: a retry gets its id."""
        with self.db.transaction():
            self.db.execute(
                "UPDATE api_requests SET done = 1 WHERE key_name = ? AND idempotency_key = ?",
                (key_name, idempotency_key),
            )

    def submitter(self, queue_id: str) -> str | None:
        row = self.db.execute(
            "SELECT key_name FROM api_messages WHERE queue_id = ?", (queue_id,)
        ).fetchone()
        return str(row[0]) if row else None
