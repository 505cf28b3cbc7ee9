"""outbox - the webhook events not yet taken by their endpoints, in the queue's
database (its schema's version 6).

The queue writes a message's events with the state they report, in one transaction
(`INSERT`, used by `gateway.queue.store.QueueStore.add_events`); the portal's
events are written on their own just after its change.  A dispatcher (on every node
of a cluster) takes the due ones: only the oldest pending event of each message and
endpoint is due, so a message's events arrive in order; a taken event is leased to
its node for a while, so that two nodes never post it at once and a dead node's
events are taken over.  An event posted is deleted; one not taken before
``webhooks.max_age`` is kept as ``dropped`` for 30 days, with its last error.

Blocking: called from a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.storage.database import Database, Schema

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id {id},
    endpoint TEXT NOT NULL,
    event_id TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created {real} NOT NULL,
    next_try {real} NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    owner TEXT,
    lease_until {real},
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(state, next_try);
CREATE INDEX IF NOT EXISTS webhook_outbox_order ON webhook_outbox(endpoint, queue_id, id)
""")

INSERT = (
    "INSERT INTO webhook_outbox(endpoint, event_id, queue_id, type, payload, created, "
    "next_try) VALUES (?,?,?,?,?,?,?)"
)

DROPPED_KEPT = 30 * 86400

_COLUMNS = "id, endpoint, event_id, queue_id, type, payload, created, tries"
# the ids of the due events: pending, due by now, not leased, the oldest of their
# message and endpoint (parameters: now, now, limit)
_DUE = (
    "SELECT o.id FROM webhook_outbox o WHERE o.state = 'pending' AND o.next_try <= ? "
    "AND (o.lease_until IS NULL OR o.lease_until < ?) AND NOT EXISTS ("
    "SELECT 1 FROM webhook_outbox p WHERE p.endpoint = o.endpoint "
    "AND p.queue_id = o.queue_id AND p.state = 'pending' AND p.id < o.id) "
    "ORDER BY o.id LIMIT ?"
)


@dataclass(frozen=True)
class Pending:
    id: int
    endpoint: str
    event_id: str
    queue_id: str
    type: str
    payload: str
    created: float
    tries: int


class Outbox:
    def __init__(self, db: Database):
        from gateway.queue.store import VERSIONED  # the tables are the queue store's
        from gateway.storage.migrations import prepare

        self.db = db
        prepare(db, VERSIONED)

    def close(self) -> None:
        self.db.close()

    def add(self, rows: list[tuple[str, str, str, str, str]], now: float) -> None:
        with self.db.transaction():
            self.db.executemany(INSERT, [(*r, now, now) for r in rows])

    def due(self, now: float, limit: int = 200) -> list[Pending]:
        """The oldest pending event of each message and endpoint, when due and not
        leased to a node (`take` leases them)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM webhook_outbox WHERE id IN ({_DUE}) ORDER BY id",  # noqa: S608 - constants and placeholders
            (now, now, limit),
        ).fetchall()
        return [Pending(*row) for row in rows]

    def take(self, owner: str, now: float, until: float, limit: int = 500) -> list[Pending]:
        """The due events (`due`), leased to this node, in one statement, oldest
        first.  The outer lease check is evaluated again on the row another node may
        have updated meanwhile (PostgreSQL): never both."""
        with self.db.transaction():
            rows = self.db.execute(
                f"UPDATE webhook_outbox SET owner = ?, lease_until = ? WHERE id IN ({_DUE}) "  # noqa: S608 - constants and placeholders
                "AND state = 'pending' AND (lease_until IS NULL OR lease_until < ?) "
                f"RETURNING {_COLUMNS}",
                (owner, until, now, now, limit, now),
            ).fetchall()
        return sorted((Pending(*row) for row in rows), key=lambda e: e.id)

    def settle(
        self,
        posted: list[int],
        retry: list[tuple[int, float, str]],
        dropped: list[tuple[int, str]],
    ) -> None:
        """Posted events deleted (one statement); failed ones tried again at their
        time (or dropped), with the error."""
        with self.db.transaction():
            if posted:
                marks = ",".join("?" * len(posted))
                self.db.execute(
                    f"DELETE FROM webhook_outbox WHERE id IN ({marks})",  # noqa: S608 - placeholders only
                    tuple(posted),
                )
            for event, next_try, error in retry:
                self.db.execute(
                    "UPDATE webhook_outbox SET tries = tries + 1, next_try = ?, owner = NULL, "
                    "lease_until = NULL, last_error = ? WHERE id = ?",
                    (next_try, error, event),
                )
            for event, error in dropped:
                self.db.execute(
                    "UPDATE webhook_outbox SET tries = tries + 1, state = 'dropped', "
                    "owner = NULL, lease_until = NULL, last_error = ? WHERE id = ?",
                    (error, event),
                )

    def backlog(self) -> dict[str, tuple[int, float | None]]:
        """Per endpoint: pending events and the oldest one's creation time."""
        rows = self.db.execute(
            "SELECT endpoint, count(*), min(created) FROM webhook_outbox "
            "WHERE state = 'pending' GROUP BY endpoint"
        ).fetchall()
        return {str(e): (int(n), float(oldest) if oldest else None) for e, n, oldest in rows}

    def dropped(self) -> list[dict[str, object]]:
        rows = self.db.execute(
            "SELECT endpoint, event_id, queue_id, type, created, tries, last_error "
            "FROM webhook_outbox WHERE state = 'dropped' ORDER BY id"
        ).fetchall()
        keys = ("endpoint", "event_id", "queue_id", "type", "created", "tries", "last_error")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def prune(self, now: float) -> None:
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM webhook_outbox WHERE state = 'dropped' AND created < ?",
                (now - DROPPED_KEPT,),
            )
