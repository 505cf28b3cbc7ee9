"""outbox - the webhook events not yet taken by their endpoints, in the queue's
database (its schema's version 6).

The queue writes a message's events with the state they report, in one transaction
(`INSERT`, or `INSERT_FIRST` for the event of a message just recorded, used by
`gateway.queue.store.QueueStore.add_events`); the portal's
events are written on their own just after its change.  A dispatcher (on every node
of a cluster) takes the due ones.  A message's events arrive in order: only its
oldest event per endpoint is ``pending``; one written while another of the same
message and endpoint waits is ``waiting``, and becomes pending when the one before
it is posted or dropped - so that finding the due events reads only those (an index
on state and time, in time order), however many wait behind an endpoint that is
down.  On PostgreSQL (`shared`) a taken event is leased to its node for a while (its
next try is then the lease's end), so that two nodes never post it at once and a
dead node's events are taken over; a SQLite outbox has one dispatcher, which reads
the due events without leasing them.  An event posted is deleted; one not taken
before ``webhooks.max_age`` is kept as ``dropped`` for 30 days, with its last error.

Blocking: called from a thread.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.storage.database import Database, Dialect, Schema

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

# an event, ``waiting`` when another of its message and endpoint is not posted yet
# (parameters: `insert_rows`)
INSERT = (
    "INSERT INTO webhook_outbox(endpoint, event_id, queue_id, type, payload, created, "
    "next_try, state) SELECT ?, ?, ?, ?, ?, ?, ?, CASE WHEN EXISTS (SELECT 1 FROM "
    "webhook_outbox w WHERE w.endpoint = ? AND w.queue_id = ? "
    "AND w.state IN ('pending', 'waiting')) THEN 'waiting' ELSE 'pending' END"
)

# a message's first event (``accepted``, as its message is recorded): nothing of it
# can be pending before it (parameters: `first_rows`)
INSERT_FIRST = (
    "INSERT INTO webhook_outbox(endpoint, event_id, queue_id, type, payload, created, "
    "next_try, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')"
)

DROPPED_KEPT = 30 * 86400

_COLUMNS = "id, endpoint, event_id, queue_id, type, payload, created, tries"
# the ids of the due events, in the order they became due: pending, due by now, not
# leased (parameters: now, now, limit).  A pending event with an older pending one
# of its message and endpoint is not due yet: none is written so, but a database
# from before ``waiting`` may hold some.
_DUE = (
    "SELECT o.id FROM webhook_outbox o WHERE o.state = 'pending' AND o.next_try <= ? "
    "AND (o.lease_until IS NULL OR o.lease_until < ?) AND NOT EXISTS ("
    "SELECT 1 FROM webhook_outbox p WHERE p.endpoint = o.endpoint "
    "AND p.queue_id = o.queue_id AND p.state = 'pending' AND p.id < o.id) "
    "ORDER BY o.next_try LIMIT ?"
)
# the due events leased (parameters: owner, until, until, `_DUE`'s, now, now).  The
# outer checks, evaluated again on a row another node updated meanwhile, are written
# so that no index can serve them (``|| ''``, ``+ 0``): the rows are found by their
# ids, not by reading every due one
_TAKE = (
    "UPDATE webhook_outbox SET owner = ?, lease_until = ?, next_try = ? "  # noqa: S608 - constants and placeholders
    f"WHERE id IN ({_DUE}) AND state || '' = 'pending' AND next_try + 0 <= ? "
    f"AND (lease_until IS NULL OR lease_until < ?) RETURNING {_COLUMNS}"
)
# the next waiting event of each message and endpoint whose event ``{marks}`` was
# posted or dropped becomes pending
_PROMOTE = (
    "UPDATE webhook_outbox SET state = 'pending' WHERE id IN (SELECT (SELECT min(w.id) "
    "FROM webhook_outbox w WHERE w.endpoint = h.endpoint AND w.queue_id = h.queue_id "
    "AND w.state = 'waiting') FROM webhook_outbox h WHERE h.id IN ({marks}))"
)
# waiting events with nothing before them: written while the one before was being
# posted, by another PostgreSQL transaction that could not see it go
_STRANDED = (
    "UPDATE webhook_outbox SET state = 'pending' WHERE state = 'waiting' AND NOT EXISTS ("
    "SELECT 1 FROM webhook_outbox p WHERE p.endpoint = webhook_outbox.endpoint "
    "AND p.queue_id = webhook_outbox.queue_id AND p.state IN ('pending', 'waiting') "
    "AND p.id < webhook_outbox.id)"
)


def insert_rows(rows: list[tuple[str, str, str, str, str]], now: float) -> list[tuple[Any, ...]]:
    """`INSERT`'s parameters for outbox rows (endpoint, event id, queue id, type,
    payload) written at ``now``."""
    return [(*r, now, now, r[0], r[2]) for r in rows]


def first_rows(rows: list[tuple[str, str, str, str, str]], now: float) -> list[tuple[Any, ...]]:
    """`INSERT_FIRST`'s parameters."""
    return [(*r, now, now) for r in rows]


class Pending(NamedTuple):  # (a tuple: made from a row at little cost)
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

    @property
    def shared(self) -> bool:
        """Whether several nodes may post from this outbox (PostgreSQL): then an
        event is leased (`take`) before it is posted.  A SQLite one has one
        dispatcher."""
        return self.db.dialect is Dialect.POSTGRESQL

    def close(self) -> None:
        self.db.close()

    def add(self, rows: list[tuple[str, str, str, str, str]], now: float) -> None:
        with self.db.transaction():
            self.db.executemany(INSERT, insert_rows(rows, now))

    def due(self, now: float, limit: int = 200) -> list[Pending]:
        """The oldest pending event of each message and endpoint, when due and not
        leased to a node (`take` leases them)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM webhook_outbox WHERE id IN ({_DUE}) ORDER BY id",  # noqa: S608 - constants and placeholders
            (now, now, limit),
        ).fetchall()
        return [Pending(*row) for row in rows]

    def take(self, owner: str, now: float, until: float, limit: int = 500) -> list[Pending]:
        """The due events (`due`), leased to this node until ``until`` (their next
        try then), in one statement, oldest first.  The outer checks are evaluated
        again on a row another node may have updated meanwhile (PostgreSQL): never
        both."""
        with self.db.transaction():
            rows = self.db.execute(
                _TAKE, (owner, until, until, now, now, limit, now, now)
            ).fetchall()
        return sorted((Pending(*row) for row in rows), key=lambda e: e.id)

    def settle(
        self,
        posted: list[int],
        retry: list[tuple[int, float, str, bool]],
        dropped: list[tuple[int, str]],
    ) -> None:
        """Posted events deleted (one statement); failed ones tried again at their
        time (or dropped), with the error - their tries counted when they were
        tried; the next event of a message whose event was posted or dropped pending
        now.  At most a round's events (`take`'s limit)."""
        gone = posted + [event for event, _ in dropped]
        with self.db.transaction():
            if gone:  # the events after them are due now
                self.db.execute(_PROMOTE.format(marks=",".join("?" * len(gone))), gone)
            if posted:
                marks = ",".join("?" * len(posted))
                self.db.execute(
                    f"DELETE FROM webhook_outbox WHERE id IN ({marks})",  # noqa: S608 - placeholders only
                    tuple(posted),
                )
            for event, next_try, error, tried in retry:
                self.db.execute(
                    "UPDATE webhook_outbox SET tries = tries + ?, next_try = ?, owner = NULL, "
                    "lease_until = NULL, last_error = ? WHERE id = ?",
                    (int(tried), next_try, error, event),
                )
            for event, error in dropped:
                self.db.execute(
                    "UPDATE webhook_outbox SET tries = tries + 1, state = 'dropped', "
                    "owner = NULL, lease_until = NULL, last_error = ? WHERE id = ?",
                    (error, event),
                )

    def release_stranded(self) -> None:
        """Waiting events with none before them made pending: on PostgreSQL an event
        written while the one before it was being posted (by a transaction that
        could not see it) may be left so; SQLite's writers see each other."""
        if self.db.dialect is Dialect.POSTGRESQL:
            with self.db.transaction():
                self.db.execute(_STRANDED)

    def backlog(self) -> dict[str, tuple[int, float | None]]:
        """Per endpoint: events not posted yet (pending or waiting) and the oldest
        one's creation time."""
        rows = self.db.execute(
            "SELECT endpoint, count(*), min(created) FROM webhook_outbox "
            "WHERE state IN ('pending', 'waiting') GROUP BY endpoint"
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
