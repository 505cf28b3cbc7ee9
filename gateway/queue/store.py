"""queue state - per-recipient delivery state, attempts and evidence (SQLite, or
PostgreSQL through `gateway.storage.database`).

The spool holds each message's bytes and envelope (immutable); this store holds what
changes: each recipient's state and next attempt, every attempt with its evidence,
and the audit trail of administrative actions.  Per-recipient state is the truth: a
message is done when every recipient is delivered, bounced or expired.

SQLite in WAL mode at ``<state_dir>/queue.db``: the daemon and the ``sealgate queue``
commands can use it at the same time; each write is one transaction.  Calls are
synchronous and short; the daemon makes them from a single dedicated thread.

Shared by several nodes (PostgreSQL, a ``node`` given): each message also keeps its
envelope and bytes here (``contents``) so that any node can deliver it; a lease names
the node holding it; ``nodes`` holds each node's heartbeat, and `take_over` frees
the leases of a node silent for the lease timeout.  A node claims only what it can
read (shared, or spooled on its own disk).

Recipient states: ``pending`` (never tried), ``deferred`` (will be retried),
``held`` (the policy decided a mode that cannot be used now - ``hold``, or ``portal``
with the portal disabled; decided again at each retry), ``delivered``, ``bounced``
(permanent failure), ``expired`` (deferred or held past the queue lifetime).  A message
may also be on ``hold`` by an administrator (no attempts until released).  Each
recipient keeps the policy decision of its latest attempt (JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.api.store import INSERT_MESSAGE as API_MESSAGE_INSERT
from gateway.api.store import SCHEMA as API_SCHEMA
from gateway.canonical import Encoded, encoded
from gateway.delivery.results import AttemptEvidence
from gateway.model import Envelope, RecipientState
from gateway.storage.database import Database, Dialect, Schema, batch
from gateway.storage.migrations import Versioned, prepare
from gateway.tlsrpt.store import SCHEMA as TLSRPT_SCHEMA
from gateway.webhooks.outbox import INSERT as WEBHOOK_INSERT
from gateway.webhooks.outbox import INSERT_FIRST as WEBHOOK_INSERT_FIRST
from gateway.webhooks.outbox import SCHEMA as WEBHOOK_SCHEMA
from gateway.webhooks.outbox import first_rows as first_webhook_rows
from gateway.webhooks.outbox import insert_rows as webhook_rows

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    size INTEGER NOT NULL,
    arrived {real} NOT NULL,
    hold INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    dsn_sent INTEGER NOT NULL DEFAULT 0,
    finished {real}
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt {real} NOT NULL,
    status TEXT NOT NULL DEFAULT '',
    diagnostic TEXT NOT NULL DEFAULT '',
    updated {real} NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0,
    decision TEXT,
    PRIMARY KEY (queue_id, idx)
);
DROP INDEX IF EXISTS recipients_due;
CREATE INDEX IF NOT EXISTS recipients_waiting ON recipients(next_attempt)
    WHERE leased=0 AND state IN ('pending','deferred','held');
CREATE TABLE IF NOT EXISTS attempts (
    id {id},
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    at {real} NOT NULL,
    outcome TEXT NOT NULL,
    status TEXT NOT NULL,
    diagnostic TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_message ON attempts(queue_id);
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished);
CREATE INDEX IF NOT EXISTS messages_open ON messages(done, arrived);
CREATE TABLE IF NOT EXISTS audit (
    id {id},
    at {real} NOT NULL,
    queue_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL
);
""")


def _version_1(db: Database) -> None:
    """The tables (a file from before versions were recorded gets the columns it
    lacks first: the indexes use them)."""
    for table, column, decl in (
        ("recipients", "leased", "INTEGER NOT NULL DEFAULT 0"),
        ("messages", "finished", "REAL"),
        ("recipients", "decision", "TEXT"),
    ):
        db.add_column(table, column, decl)
    db.create(SCHEMA)


def _version_2(db: Database) -> None:
    """Several nodes: which node accepted a message and whether its content is in
    the shared store (``contents``: any node can deliver it), which node holds a
    recipient's lease, and each node's heartbeat."""
    db.add_column("messages", "node", "TEXT")
    db.add_column("messages", "shared", "INTEGER NOT NULL DEFAULT 0")
    db.add_column("recipients", "owner", "TEXT")
    db.create(CLUSTER_SCHEMA)


def _version_3(db: Database) -> None:
    """Shared message content compressed with lz4 on PostgreSQL (the server spends
    about a third of the CPU it spent with pglz on a 50 KB message; content stored
    before stays as it is)."""
    db.compress_quickly("contents", "data")


def _version_4(db: Database) -> None:
    """Delay warnings: whether the sender was told its message is still waiting
    (``delivery.delay_warning``; once per message, whichever node sends it)."""
    db.add_column("messages", "warned", "INTEGER NOT NULL DEFAULT 0")
    # what `delayed` looks for every few seconds: not the whole backlog of warned ones
    db.execute("CREATE INDEX IF NOT EXISTS messages_unwarned ON messages(done, warned, arrived)")


def _version_5(db: Database) -> None:
    """TLS-RPT: sessions counted per domain and day, and the reports sent
    (`gateway.tlsrpt.store`)."""
    db.create(TLSRPT_SCHEMA)


def _version_6(db: Database) -> None:
    """Webhooks: the outbox of events not yet taken (`gateway.webhooks.outbox`),
    written with the states they report."""
    db.create(WEBHOOK_SCHEMA)


def _version_7(db: Database) -> None:
    """The message API: which key submitted which message, and Idempotency-Key
    requests (`gateway.api.store`)."""
    db.create(API_SCHEMA)


CLUSTER_SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS contents (
    queue_id TEXT PRIMARY KEY REFERENCES messages(queue_id) ON DELETE CASCADE,
    envelope TEXT NOT NULL,
    data {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    started {real} NOT NULL,
    heartbeat {real} NOT NULL,
    info TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_leased ON recipients(owner) WHERE leased=1;
""")

VERSIONED = Versioned(
    "queue",
    (_version_1, _version_2, _version_3, _version_4, _version_5, _version_6, _version_7),
)

# `QueueStore.prune`: messages forgotten per call, and pages of that many looked at
PRUNE_BATCH = 5000
PRUNE_PAGES = 10

FINAL_STATES = tuple(s.value for s in RecipientState if s.final)


@dataclass(frozen=True)
class AttemptRecord:
    """What one attempt did for one recipient, and the state that follows."""

    idx: int
    state: RecipientState
    status: str
    diagnostic: str
    evidence: AttemptEvidence | None
    next_attempt: float
    outcome: str  # what the attempt itself came to ("error", "quarantined" beside states)

    # made once, read by the queue state's write and the archive's record alike
    @functools.cached_property
    def stored_evidence(self) -> dict[str, Any]:
        """The evidence as the queue state and the archive keep it."""
        return self.evidence.to_dict() if self.evidence is not None else {}

    @functools.cached_property
    def stored_decision(self) -> dict[str, Any] | None:
        """The decision with its reasons and facts (`Decision.to_dict`)."""
        return self.evidence.decision.to_dict() if self.evidence is not None else None

    # their JSON, made once for the queue state and the archive's attempt record
    @functools.cached_property
    def evidence_text(self) -> Encoded:
        return encoded(self.stored_evidence)

    @functools.cached_property
    def decision_text(self) -> Encoded | None:
        decision = self.stored_decision
        return encoded(decision) if decision else None


@dataclass(frozen=True)
class RecipientRow:
    queue_id: str
    idx: int
    address: str
    domain: str
    state: RecipientState
    attempts: int
    next_attempt: float
    status: str
    diagnostic: str


class QueueStore:
    def __init__(self, where: Path | Database, node: str | None = None):
        """``where``: the SQLite file (``<state_dir>/queue.db``), or an open `Database`
        (SQLite or PostgreSQL).  ``node``: this node's id when several nodes share
        the store - leases are then this node's own, and a message is claimed only
        when its content is in the store or on this node; None: the only node."""
        self.node = node
        self.path = None if isinstance(where, Database) else where
        if isinstance(where, Database):
            self._db = where
        else:
            # NORMAL in WAL mode survives a crash of the process; a power loss can lose
            # the last few commits.  That is safe here: the spool file is the durable
            # record of the message, so a lost "delivered" means a repeat delivery (at
            # least once), and a lost message row is re-added from the spool at start.
            self._db = Database.sqlite(where, synchronous="NORMAL")
        prepare(self._db, VERSIONED)

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One transaction; inside another (a `batch`), part of that one."""
        return self._db.transaction()

    def batch(self, operations: list[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
        """Run several operations in one transaction (group commit); one that fails
        is undone alone and reports its exception (`batch`, optimistic: every
        operation here only writes to the store, so it can run again)."""
        return batch(self._db, operations, optimistic=True)

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self.transaction():
            for sql, args in statements:
                self._db.write(sql, args)

    # -- messages -------------------------------------------------------------------

    def add(
        self,
        envelope: Envelope,
        now: float | None = None,
        lease: bool = False,
        data: bytes | None = None,
        fresh: bool = False,
    ) -> bool:
        """Record a spooled message; False if it is known already (recovery).  With
        ``lease``, its recipients are taken for an attempt at once (no `claim`).
        With ``data``, the message's content is kept in the store too (shared: any
        node can deliver it).  ``fresh``: just accepted, so not known - nothing is
        read first (on PostgreSQL the batch then waits for no answer)."""
        now = time.time() if now is None else now
        if (
            not fresh
            and self._db.execute(
                "SELECT 1 FROM messages WHERE queue_id=?", (envelope.queue_id,)
            ).fetchone()
        ):
            return False
        e = envelope
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                "INSERT INTO messages(queue_id, received_at, mail_from, size, arrived, node, "
                "shared) VALUES (?,?,?,?,?,?,?)",
                (e.queue_id, e.received_at, e.mail_from, e.size, now, self.node, int(bool(data))),
            )
        ]
        if data is not None:
            statements.append(
                (
                    "INSERT INTO contents VALUES (?,?,?)",
                    (e.queue_id, _envelope_text(e), data),
                )
            )
        if e.client.authorized_by == "api-key" and e.client.auth_user:  # which key sent it
            statements.append((API_MESSAGE_INSERT, (e.queue_id, e.client.auth_user, now)))
        owner = self.node if lease else None
        for idx, rcpt in enumerate(envelope.recipients):
            domain = domain_of(rcpt.address)
            statements.append(
                (
                    "INSERT INTO recipients(queue_id, idx, address, domain, next_attempt, "
                    "updated, leased, owner) VALUES (?,?,?,?,?,?,?,?)",
                    (e.queue_id, idx, rcpt.address, domain, now, now, int(lease), owner),
                )
            )
        self._tx(statements)
        return True

    def content(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        """A message's envelope and bytes from the shared store (None: not there)."""
        row = self._db.execute(
            "SELECT envelope, data FROM contents WHERE queue_id=?", (queue_id,)
        ).fetchone()
        if row is None:
            return None
        return _envelope_of(row[0]), bytes(row[1])

    def open_messages(self) -> list[dict[str, Any]]:
        """Every unfinished message (by queue id: by arrival), with its recipients'
        states and latest decisions - in one query, whatever the size of the queue
        (`sealgate queue list`)."""
        # the decision's mode and rule taken out by the database (not a JSON document
        # parsed here per recipient); a message's columns come with each of its
        # recipients (one pass over the tables: two queries took half as long again)
        mode, rule = (
            ("r.decision::json->>'mode'", "r.decision::json->>'rule'")
            if self._db.dialect is Dialect.POSTGRESQL
            else ("json_extract(r.decision, '$.mode')", "json_extract(r.decision, '$.rule')")
        )
        messages: dict[str, dict[str, Any]] = {}
        for (
            queue_id,
            received_at,
            mail_from,
            size,
            hold,
            address,
            state,
            status,
            made,
            by,
        ) in self._db.execute(
            "SELECT m.queue_id, m.received_at, m.mail_from, m.size, m.hold, r.address, "  # noqa: S608 - constants
            f"r.state, r.status, {mode}, {rule} FROM messages m "
            "LEFT JOIN recipients r USING (queue_id) WHERE m.done=0 "
            "ORDER BY m.queue_id, r.idx"
        ):
            message = messages.get(queue_id)
            if message is None:
                message = messages[queue_id] = {
                    "queue_id": queue_id,
                    "received_at": received_at,
                    "mail_from": mail_from,
                    "size": size,
                    "hold": bool(hold),
                    "recipients": [],
                }
            if address is not None:  # (a message recorded without recipients: none)
                message["recipients"].append(
                    {
                        "address": address,
                        "state": state,
                        "status": status,
                        "mode": made or "",
                        "rule": by or "",
                    }
                )
        return list(messages.values())

    def shared_envelope(self, queue_id: str) -> Envelope | None:
        row = self._db.execute(
            "SELECT envelope FROM contents WHERE queue_id=?", (queue_id,)
        ).fetchone()
        return None if row is None else _envelope_of(row[0])

    def share(self, envelope: Envelope, data: bytes) -> bool:
        """Put a message recorded already without its content (``ack: local``) into
        the shared store; False if it is there already or finished."""
        return self.share_many([(envelope, data)]) == 1

    def share_many(self, messages: Sequence[tuple[Envelope, bytes]]) -> int:
        """`share` for several messages, in one transaction (a statement for each
        step, not for each message); how many went in."""
        by_id = {envelope.queue_id: (envelope, data) for envelope, data in messages}
        if not by_id:
            return 0
        with self.transaction():
            open_ = [
                str(row[0])
                for row in self._db.among(
                    "SELECT queue_id FROM messages WHERE queue_id IN ({marks}) "  # noqa: S608 - a fixed clause
                    "AND shared=0 AND done=0" + self._db.lock_rows,
                    list(by_id),
                )
            ]
            if not open_:
                return 0
            self._db.write_many(
                "INSERT INTO contents VALUES (?,?,?)",
                [(q, _envelope_text(by_id[q][0]), by_id[q][1]) for q in open_],
            )
            self._db.write_many(
                "UPDATE messages SET shared=1 WHERE queue_id=?", [(q,) for q in open_]
            )
        return len(open_)

    def unshared_here(self) -> list[str]:
        """This node's open messages whose content is only on its disk."""
        return [
            str(row[0])
            for row in self._db.execute(
                "SELECT queue_id FROM messages WHERE node=? AND shared=0 AND done=0", (self.node,)
            )
        ]

    def done_with_content_here(self) -> list[str]:
        """This node's finished messages whose shared copy is still here (it stopped
        before their archive records were written, which the copy waits for)."""
        return [
            str(row[0])
            for row in self._db.execute(
                "SELECT m.queue_id FROM contents c JOIN messages m USING (queue_id) "
                "WHERE m.node=? AND m.done=1",
                (self.node,),
            )
        ]

    # -- nodes ----------------------------------------------------------------------

    def heartbeat(self, info: dict[str, Any], now: float | None = None) -> None:
        """This node is alive (renewing every lease it holds), with what `nodes`
        shows of it (version, digests of its configuration and policy, leases)."""
        assert self.node is not None
        now = time.time() if now is None else now
        self._db.execute(
            "INSERT INTO nodes VALUES (?,?,?,?) ON CONFLICT (node_id) DO UPDATE SET "
            "heartbeat=excluded.heartbeat, info=excluded.info",
            (self.node, now, now, json.dumps(info)),
        )

    def joined(self, now: float | None = None) -> None:
        """This node (re)started: its start time, and its leases from before are let
        go (the attempts they were for died with the process)."""
        now = time.time() if now is None else now
        self._db.execute(
            "INSERT INTO nodes VALUES (?,?,?,'{}') ON CONFLICT (node_id) DO UPDATE SET "
            "started=excluded.started, heartbeat=excluded.heartbeat",
            (self.node, now, now),
        )

    def take_over(self, lease_timeout: float, now: float | None = None) -> dict[str, int]:
        """Release the leases of nodes silent for ``lease_timeout``: their recipients
        are due for whichever node claims them next.  Returns leases freed per node."""
        now = time.time() if now is None else now
        with self.transaction():
            dead = [
                n
                for (n,) in self._db.execute(
                    "SELECT node_id FROM nodes WHERE heartbeat < ?", (now - lease_timeout,)
                )
            ]
            freed = {}
            for node in dead:
                count = self._db.execute(
                    "UPDATE recipients SET leased=0, owner=NULL WHERE leased=1 AND owner=?",
                    (node,),
                ).rowcount
                if count:
                    freed[node] = count
        return freed

    def heartbeats(self) -> list[float]:
        """Every node's last heartbeat (the nodes of `nodes`, cheaply)."""
        return [float(h) for (h,) in self._db.execute("SELECT heartbeat FROM nodes")]

    def nodes(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT node_id, started, heartbeat, info, (SELECT count(*) FROM recipients r "
            "WHERE r.leased=1 AND r.owner=n.node_id) FROM nodes n ORDER BY node_id"
        )
        return [
            {"node": n, "started": s, "heartbeat": h, "leases": int(c), **json.loads(i)}
            for n, s, h, i, c in rows
        ]

    def unshared(self) -> int:
        """This node's messages not finished whose content is only on its disk."""
        row = self._db.execute(
            "SELECT count(*) FROM messages WHERE node=? AND shared=0 AND done=0", (self.node,)
        ).fetchone()
        return int(row[0])

    def known(self) -> dict[str, bool]:
        """Every message in the store -> whether it is done."""
        return {
            row[0]: bool(row[1]) for row in self._db.execute("SELECT queue_id, done FROM messages")
        }

    def message(self, queue_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT queue_id, received_at, mail_from, size, arrived, hold, done, dsn_sent "
            "FROM messages WHERE queue_id=?",
            (queue_id,),
        ).fetchone()
        if row is None:
            return None
        keys = (
            "queue_id",
            "received_at",
            "mail_from",
            "size",
            "arrived",
            "hold",
            "done",
            "dsn_sent",
        )
        return dict(zip(keys, row, strict=True))

    # -- recipients -----------------------------------------------------------------

    def decisions(self, queue_id: str) -> dict[int, dict[str, Any]]:
        """Each recipient's latest policy decision, by recipient index."""
        rows = self._db.execute(
            "SELECT idx, decision FROM recipients WHERE queue_id=? AND decision IS NOT NULL",
            (queue_id,),
        )
        return {idx: json.loads(text) for idx, text in rows}

    def recipients(self, queue_id: str) -> list[RecipientRow]:
        rows = self._db.execute(
            "SELECT queue_id, idx, address, domain, state, attempts, next_attempt, status, "
            "diagnostic FROM recipients WHERE queue_id=? ORDER BY idx",
            (queue_id,),
        )
        return [_row(r) for r in rows]

    def due(
        self,
        now: float,
        limit: int = 1000,
        claiming: bool = False,
        busy: Sequence[str] = (),
    ) -> list[RecipientRow]:
        """Recipients whose attempt is due and not already taken by an attempt
        (``claiming``: inside the transaction that takes them), but for those at the
        ``busy`` domains (attempts enough under way there)."""
        # with several nodes: only what this node can read (shared, or its own)
        reachable, args = "", list[Any]([now])
        if self.node is not None:
            reachable, args = " AND (m.shared=1 OR m.node=?)", [now, self.node]
        if busy:
            reachable += f" AND r.domain NOT IN ({','.join('?' * len(busy))})"
            args += busy
        rows = self._db.execute(
            "SELECT r.queue_id, r.idx, r.address, r.domain, r.state, r.attempts, "  # noqa: S608 - the claim clause is fixed
            "r.next_attempt, r.status, r.diagnostic FROM recipients r JOIN messages m "
            "USING (queue_id) WHERE r.leased=0 AND r.state IN ('pending','deferred','held') "
            f"AND r.next_attempt<=? AND m.hold=0{reachable} ORDER BY r.next_attempt LIMIT ?"
            + (self._db.claim_rows("r") if claiming else ""),
            [*args, limit],
        )
        return [_row(r) for r in rows]

    def claim(
        self,
        now: float,
        limit: int,
        busy: Sequence[str] = (),
        room: Callable[[str], int] | None = None,
    ) -> list[RecipientRow]:
        """Take due recipients for attempts, in one transaction: a recipient is taken
        once, whichever process or node asks at the same time (the lease ends when a
        result is recorded, or at the next start: `release_leases`).  ``room``: how
        many attempts (messages) a domain can start now - the rest of its due
        recipients stay for a later claim, or another node."""
        with self.transaction():
            rows = self.due(now, limit, claiming=True, busy=busy)
            if room is not None:
                rows = _within(rows, room)
            if rows:
                self._db.write_many(
                    "UPDATE recipients SET leased=1, owner=? WHERE queue_id=? AND idx=?",
                    [(self.node, r.queue_id, r.idx) for r in rows],
                )
        return rows

    def release_leases(
        self,
        queue_id: str | None = None,
        idxs: list[int] | None = None,
        next_attempt: float | None = None,
    ) -> None:
        """At start: attempts cut short by a crash are due again.  After an unexpected
        error: those recipients wait until ``next_attempt``."""
        if queue_id is None:
            if self.node is None:  # the only node: every lease was ours
                self._tx([("UPDATE recipients SET leased=0 WHERE leased=1", ())])
            else:
                self._tx(
                    [
                        (
                            "UPDATE recipients SET leased=0, owner=NULL WHERE leased=1 AND owner=?",
                            (self.node,),
                        )
                    ]
                )
            return
        self._tx(
            [
                (
                    "UPDATE recipients SET leased=0, next_attempt=? WHERE queue_id=? AND idx=?",
                    (next_attempt or time.time(), queue_id, i),
                )
                for i in idxs or []
            ]
        )

    # -- destinations none of whose hosts answer (`QueueManager._suspend`) ------------

    def suspend(
        self, domain: str, until: float, status: str, diagnostic: str, arrived_after: float
    ) -> int:
        """Every waiting recipient at ``domain`` due before ``until`` is deferred
        until then with the destination's failure, not attempted meanwhile - except
        those of messages that arrived before ``arrived_after``: they are tried, and
        expire.  Returns how many wait."""
        with self.transaction():
            return int(
                self._db.execute(
                    "UPDATE recipients SET state='deferred', status=?, diagnostic=?, "
                    "next_attempt=?, updated=? WHERE domain=? AND leased=0 "
                    "AND state IN ('pending','deferred') AND next_attempt<? "
                    "AND queue_id IN (SELECT queue_id FROM messages WHERE arrived>?)",
                    (status, diagnostic, until, time.time(), domain, until, arrived_after),
                ).rowcount
            )

    def postpone(
        self,
        queue_id: str,
        idxs: list[int],
        until: float,
        status: str,
        diagnostic: str,
        arrived_after: float,
    ) -> bool:
        """The same for recipients of one message leased for an attempt: deferred
        until ``until`` and let go, unless the message arrived before
        ``arrived_after`` (False: nothing changed, the attempt goes ahead)."""
        row = self._db.execute(
            "SELECT arrived FROM messages WHERE queue_id=?", (queue_id,)
        ).fetchone()
        if row is None or row[0] <= arrived_after:
            return False
        now = time.time()
        self._db.write_many(
            "UPDATE recipients SET leased=0, state='deferred', status=?, diagnostic=?, "
            "next_attempt=?, updated=? WHERE queue_id=? AND idx=?",
            [(status, diagnostic, until, now, queue_id, i) for i in idxs],
        )
        return True

    def add_events(
        self, rows: list[tuple[str, str, str, str, str]], now: float, first: bool = False
    ) -> None:
        """Webhook events for the outbox, in the transaction of the state they report
        (`gateway.webhooks`); ``first``: the events of messages this transaction
        records (nothing of theirs can be waiting before them)."""
        if first:
            self._db.write_many(WEBHOOK_INSERT_FIRST, first_webhook_rows(rows, now))
        else:
            self._db.write_many(WEBHOOK_INSERT, webhook_rows(rows, now))

    def record(
        self,
        queue_id: str,
        results: list[AttemptRecord],
        now: float | None = None,
        every: list[RecipientRow] | None = None,
    ) -> list[RecipientRow] | None:
        """One attempt's results for some recipients of a message, with their new
        states, in one transaction.  Returns every recipient of the message when this
        made the last of them final (the caller then finishes the message: exactly
        one caller does, as calls are serialised), else None.  When every recipient
        was delivered, the message is marked done in the same transaction.
        ``every``: the attempt's rows, when they are all the message's recipients -
        then nothing is read back (a group commit waits for no answer)."""
        now = time.time() if now is None else now
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for r in results:
            statements.append(
                (
                    "UPDATE recipients SET leased=0, state=?, attempts=attempts+1, "
                    "next_attempt=?, status=?, diagnostic=?, updated=?, "
                    "decision=coalesce(?, decision) WHERE queue_id=? AND idx=?",
                    (
                        r.state,
                        r.next_attempt,
                        r.status,
                        r.diagnostic,
                        now,
                        text.text if (text := r.decision_text) else None,
                        queue_id,
                        r.idx,
                    ),
                )
            )
            statements.append(
                (
                    "INSERT INTO attempts(queue_id, idx, at, outcome, status, diagnostic, "
                    "evidence) VALUES (?,?,?,?,?,?,?)",
                    (
                        queue_id,
                        r.idx,
                        now,
                        r.outcome,
                        r.status,
                        r.diagnostic,
                        r.evidence_text.text,
                    ),
                )
            )
        if not any(r.state in FINAL_STATES for r in results):
            self._tx(statements)
            return None
        with self.transaction():
            for sql, args in statements:
                self._db.write(sql, args)
            if every is not None and {r.idx for r in every} == {r.idx for r in results}:
                now_ = {r.idx: r for r in results}
                rows = [
                    dataclasses.replace(
                        row,
                        state=now_[row.idx].state,
                        attempts=row.attempts + 1,
                        next_attempt=now_[row.idx].next_attempt,
                        status=now_[row.idx].status,
                        diagnostic=now_[row.idx].diagnostic,
                    )
                    for row in every
                ]
            else:
                rows = self.recipients(queue_id)
            final = all(r.state in FINAL_STATES for r in rows)
            if final and all(r.state == "delivered" for r in rows):
                # Nothing to report to the sender: the message is done right here.
                self._db.write(
                    "UPDATE messages SET done=1, finished=? WHERE queue_id=?", (now, queue_id)
                )
        return rows if final else None

    def unfinished(self, settled: float | None = None) -> list[str]:
        """Messages whose recipients are all final but which were never finished (a
        crash came in between): finished at start.  ``settled``: only those whose
        last recipient was updated before then."""
        rows = self._db.execute(
            "SELECT m.queue_id FROM messages m WHERE m.done=0 AND NOT EXISTS "
            "(SELECT 1 FROM recipients r WHERE r.queue_id=m.queue_id AND (r.state NOT IN "
            "('delivered','bounced','expired') OR r.updated > ?))",
            (math.inf if settled is None else settled,),
        )
        return [r[0] for r in rows]

    def done_among(self, queue_ids: list[str]) -> list[str]:
        """Which of these messages are done (finished, by whichever node)."""
        sql = "SELECT queue_id FROM messages WHERE done=1 AND queue_id IN ({marks})"
        return [q for (q,) in self._db.among(sql, queue_ids)]

    def oldest_open(self) -> float | None:
        """When the oldest message not yet finished arrived (None: none)."""
        row = self._db.execute("SELECT min(arrived) FROM messages WHERE done=0").fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def depth(self) -> dict[str, int]:
        """Recipients not yet final: pending, deferred, held (by the policy), active
        (leased) and hold (by an administrator)."""
        counts = dict.fromkeys(("pending", "deferred", "active", "hold", "held"), 0)
        rows = self._db.execute(
            "SELECT r.state, r.leased, m.hold, count(*) FROM recipients r JOIN messages m "
            "USING (queue_id) WHERE m.done=0 AND r.state IN ('pending','deferred','held') "
            "GROUP BY r.state, r.leased, m.hold"
        )
        for state, leased, hold, n in rows:
            counts["active" if leased else "hold" if hold else state] += n
        return counts

    def prune(self, before: float, keep: Callable[[list[str]], set[str]] | None = None) -> int:
        """Forget messages finished before ``before``, with their recipients, attempts
        and audit trail; returns how many.  ``keep``: of a page of them, those to
        keep for now - this node's spool still holds their file (their archive
        records are not all written): forgotten, the file would be taken for a new
        message at the next start and delivered again.  At most `PRUNE_BATCH` go
        per call, found among at most `PRUNE_PAGES` pages of that many."""
        ids: list[tuple[str]] = []
        after: tuple[float, str] = (-math.inf, "")
        for _ in range(PRUNE_PAGES):
            page = self._db.execute(
                "SELECT finished, queue_id FROM messages WHERE done=1 AND finished<? "
                "AND (finished>? OR (finished=? AND queue_id>?)) "
                "ORDER BY finished, queue_id LIMIT ?",
                (before, after[0], *after, PRUNE_BATCH),
            ).fetchall()
            kept = keep([q for _, q in page]) if keep is not None and page else set()
            ids += [(q,) for _, q in page if q not in kept]
            if len(page) < PRUNE_BATCH or len(ids) >= PRUNE_BATCH:
                break
            after = (page[-1][0], page[-1][1])
        ids = ids[:PRUNE_BATCH]
        if ids:
            with self.transaction():
                for table in ("attempts", "audit", "recipients", "messages"):
                    self._db.executemany(f"DELETE FROM {table} WHERE queue_id=?", ids)  # noqa: S608
        return len(ids)

    def attempts(self, queue_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT idx, at, outcome, status, diagnostic, evidence FROM attempts "
            "WHERE queue_id=? ORDER BY id",
            (queue_id,),
        )
        return [
            {
                "recipient_index": r[0],
                "at": r[1],
                "outcome": r[2],
                "status": r[3],
                "diagnostic": r[4],
                "evidence": json.loads(r[5]),
            }
            for r in rows
        ]

    def attempt_history(self, queue_id: str) -> list[dict[str, Any]]:
        """Every attempt of a message per recipient, numbered from 1, in the form of
        the archive's attempt records (the last one of a recipient with its state
        now: e.g. ``expired`` after a ``deferred`` outcome)."""
        rows = {r.idx: r for r in self.recipients(queue_id)}
        count: dict[int, int] = {}
        history = []
        for a in self.attempts(queue_id):
            idx = a["recipient_index"]
            count[idx] = count.get(idx, 0) + 1
            history.append(
                {
                    "idx": idx,
                    "address": rows[idx].address if idx in rows else "",
                    "attempt": count[idx],
                    "state": a["outcome"],
                    "status": a["status"],
                    "diagnostic": a["diagnostic"],
                    "evidence": a["evidence"],
                    "decision": None,
                    "recovered": "from the queue state",
                }
            )
        for entry in history:
            row = rows.get(entry["idx"])
            if row is not None and entry["attempt"] == count[entry["idx"]]:
                entry["state"] = row.state
        return history

    def delayed(self, arrived_before: float, limit: int = 100) -> list[str]:
        """Messages that arrived before then, still have a recipient waiting and
        whose sender was not told yet (`warn`)."""
        rows = self._db.execute(
            "SELECT m.queue_id FROM messages m WHERE m.done=0 AND m.warned=0 AND m.arrived < ? "
            "AND EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id=m.queue_id AND r.state "
            "NOT IN ('delivered','bounced','expired')) ORDER BY m.arrived LIMIT ?",
            (arrived_before, limit),
        )
        return [str(r[0]) for r in rows]

    def warn(self, queue_id: str) -> bool:
        """Take the delay warning of this message: True for the one caller (node)
        that is to send it, False if it was taken already."""
        with self.transaction():
            return bool(
                self._db.execute(
                    "UPDATE messages SET warned=1 WHERE queue_id=? AND warned=0", (queue_id,)
                ).rowcount
            )

    def finish(self, queue_id: str, dsn_sent: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._tx(
            [
                (
                    "UPDATE messages SET done=1, dsn_sent=?, finished=? WHERE queue_id=?",
                    (int(dsn_sent), now, queue_id),
                )
            ]
        )

    def adopt_unarchived(
        self, silent_for: float, now: float | None = None, limit: int = 100
    ) -> list[tuple[Envelope, bytes, str]]:
        """Done messages whose shared copy is still here although the node that
        accepted them has been silent for ``silent_for`` seconds - and was for as
        long after it finished them: it stopped before it had archived them (the
        copy goes only once a message is archived).  They become this node's (one
        node takes each) and are returned with the node they were taken from."""
        now = time.time() if now is None else now
        adopted = []
        with self.transaction():
            found = list(
                self._db.execute(
                    "SELECT m.queue_id, m.node FROM contents c JOIN messages m USING (queue_id) "
                    "JOIN nodes n ON n.node_id=m.node WHERE m.done=1 AND m.finished<? "
                    "AND n.heartbeat<? AND m.node<>? ORDER BY m.queue_id LIMIT ?",
                    (now - silent_for, now - silent_for, self.node, limit),
                )
            )
            for queue_id, node in found:
                taken = self._db.execute(
                    "UPDATE messages SET node=? WHERE queue_id=? AND node=?",
                    (self.node, queue_id, node),
                ).rowcount
                content = self.content(queue_id) if taken else None
                if content is not None:
                    adopted.append((*content, node))
        return adopted

    def drop_content(self, queue_id: str) -> None:
        """The message is done and archived: its shared copy can go."""
        self._db.write("DELETE FROM contents WHERE queue_id=?", (queue_id,))

    # -- administration (each action is audited) -----------------------------------

    def admin(self, queue_id: str, action: str, actor: str) -> bool:
        """retry, hold, release or delete one message; False if it is not queued."""
        if self.message(queue_id) is None:
            return False
        now = time.time()
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                "INSERT INTO audit(at, queue_id, action, actor) VALUES (?,?,?,?)",
                (now, queue_id, action, actor),
            )
        ]
        if action == "retry":
            statements.append(
                (
                    "UPDATE recipients SET next_attempt=? WHERE queue_id=? AND "
                    "state IN ('pending','deferred','held')",
                    (now, queue_id),
                )
            )
        elif action in ("hold", "release"):
            statements.append(
                ("UPDATE messages SET hold=? WHERE queue_id=?", (int(action == "hold"), queue_id))
            )
        elif action == "delete":
            statements.append(
                (
                    "UPDATE recipients SET state=? WHERE queue_id=? AND "
                    "state IN ('pending','deferred','held')",
                    (RecipientState.DELETED.value, queue_id),
                )
            )
            statements.append(
                ("UPDATE messages SET done=1, finished=? WHERE queue_id=?", (now, queue_id))
            )
        else:
            raise ValueError(f"unknown action {action!r}")
        self._tx(statements)
        return True

    def audit(self, queue_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT at, action, actor FROM audit WHERE queue_id=? ORDER BY id", (queue_id,)
        )
        return [{"at": r[0], "action": r[1], "actor": r[2]} for r in rows]


def _envelope_text(envelope: Envelope) -> str:
    """An envelope as the shared store keeps it (ASCII JSON: a name the client sent
    in bytes that are not UTF-8 stays an escape, which a TEXT column accepts)."""
    return json.dumps(envelope.to_dict(), separators=(",", ":"))


def _envelope_of(text: str) -> Envelope:
    return Envelope.from_dict(json.loads(text))


def _within(rows: list[RecipientRow], room: Callable[[str], int]) -> list[RecipientRow]:
    """``rows`` but for the messages beyond each domain's ``room`` (a message's
    recipients at a domain are one attempt: taken together or not at all), each
    domain's room asked once."""
    taken: dict[str, set[str]] = {}
    limits: dict[str, int] = {}
    kept = []
    for row in rows:
        messages = taken.setdefault(row.domain, set())
        if row.domain not in limits:
            limits[row.domain] = room(row.domain)
        if row.queue_id in messages or len(messages) < limits[row.domain]:
            messages.add(row.queue_id)
            kept.append(row)
    return kept


def _row(r: tuple[Any, ...]) -> RecipientRow:
    return RecipientRow(r[0], r[1], r[2], r[3], RecipientState(r[4]), *r[5:])


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()
