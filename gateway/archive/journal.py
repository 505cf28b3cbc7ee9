"""The journal: every accepted message and every event about it, encrypted at rest
(`sealing`), each record committed to the Merkle log (`merkle`), the log pinned by
signed checkpoints (`checkpoint`), and `Archive.verify` able to name any record that
was altered, removed or added behind the log's back.

Records: ``msg-<queue id>`` (the envelope as canonical JSON, a newline, the bytes
received), ``copy-<sha256>`` (a copy the gateway changed, as sent) and ``evt-<n>``
(an attempt with its decision and evidence, a hold, a disposition, an access, as
canonical JSON in the index).  Each is a leaf: SHA-256 over
``{"id","kind","sha256"}`` - commitments only, never an address or a subject, so
the log, its proofs and checkpoints can be handed to an auditor without
disclosing PHI.

Storage is behind `gateway.archive.store` (blobs and the index); search queries are
`gateway.archive.query`.  The daemon drives this through
`gateway.archive.service`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.archive import merkle
from gateway.archive.checkpoint import Checkpoint, CheckpointError, sign, verify
from gateway.archive.query import Query, message_id_of, subject_of
from gateway.archive.sealing import MasterKeys, SealError, open_sealed, seal
from gateway.archive.store import ArchiveIndex, BlobStore, SqlBlobStore
from gateway.canonical import Encoded, canonical_text
from gateway.errors import SealgateError
from gateway.storage.database import StorageError, batch

# made once: `json.dumps` with any argument of its own builds an encoder a call
_STRING = json.JSONEncoder(ensure_ascii=False).encode


def canonical(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: the bytes a commitment is made over
    (`gateway.canonical`: an `Encoded` in ``value`` is written as its text)."""
    return canonical_text(value).encode()


def commitment(kind: str, record_id: str, digest: str) -> bytes:
    """What a leaf commits to: ``canonical({"id", "kind", "sha256"})``, written out
    (this runs for every record)."""
    return f'{{"id":{_STRING(record_id)},"kind":{json.dumps(kind)},"sha256":"{digest}"}}'.encode()


# -- retention --------------------------------------------------------------------------

DAY = 86400.0
# a recipient condition matching fewer rows than this finds its messages from them
FEW_RECIPIENTS = 5000
# inclusion proofs take the log in aligned blocks of 2**PROOF_BLOCK leaves (`proofs`)
PROOF_BLOCK = 10


@dataclass(frozen=True)
class RetentionRule:
    """Keep matching messages ``days`` days.  Every condition given must hold:
    ``sender`` (address), ``sender_domain``, ``recipient_domain`` (any recipient),
    ``mode`` (any recipient's delivery mode)."""

    days: int
    sender: str | None = None
    sender_domain: str | None = None
    recipient_domain: str | None = None
    mode: str | None = None


@dataclass(frozen=True)
class Retention:
    """How long each message is kept: the longest of the default and every matching
    rule, never less than the floor."""

    default_days: int = 2192  # six years (HIPAA documentation retention)
    floor_days: int = 2192
    rules: tuple[RetentionRule, ...] = ()

    def days(self, sender: str, domains: set[str], modes: set[str]) -> int:
        days = max(self.default_days, self.floor_days)
        sender_domain = sender.rpartition("@")[2]
        for rule in self.rules:
            if rule.sender is not None and rule.sender != sender:
                continue
            if rule.sender_domain is not None and rule.sender_domain != sender_domain:
                continue
            if rule.recipient_domain is not None and rule.recipient_domain not in domains:
                continue
            if rule.mode is not None and rule.mode not in modes:
                continue
            days = max(days, rule.days)
        return days


# `Archive.verify`: how long the log may go without taking in any of the blobs its
# snapshot did not know before they count as unknown (a batch's blobs are stored
# before its rows commit), and how long it waits at most
SETTLE_QUIET = 3.0
SETTLE_MOST = 60.0


class ArchiveError(SealgateError):
    """The archive cannot be opened or written as configured."""


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
    messages: int = 0
    disposed: int = 0
    unfinished: int = 0  # stored content whose record was not committed (yet): not a problem
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "leaves": self.leaves,
            "checkpoints": self.checkpoints,
            "messages": self.messages,
            "disposed": self.disposed,
            "unfinished": self.unfinished,
            "problems": [p.__dict__ for p in self.problems],
        }


class Archive:
    """Writes are meant for one thread; `batch` runs many in one transaction.  Other
    processes (the CLI) may write too: SQLite serialises them, and the checkpoint
    reads the leaves they added."""

    def __init__(
        self,
        blobs: BlobStore,
        index: ArchiveIndex,
        keys: MasterKeys,
        origin: str,
        signing_key: ed25519.Ed25519PrivateKey,
        key_name: str,
        retention: Retention | None = None,
    ):
        self.blobs, self.index, self.keys = blobs, index, keys
        self.origin, self.signing_key, self.key_name = origin, signing_key, key_name
        self.retention = retention or Retention()
        self.node = ""  # which node writes (`unfinished` rows name it)
        # content outside the index's own database: written before its record commits
        self._outside = not isinstance(blobs, SqlBlobStore)
        self._registered: set[str] = set()  # names `register_writes` committed
        self._frontier = merkle.Frontier()
        self._complete_blocks: list[bytes] = []  # roots of full proof blocks (`proofs`)
        # in a batch's first run: the copies in the archive, as far as its jobs ask
        self._copies: set[str] | None = None

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.index.db.transaction()

    def batch(self, jobs: list[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
        """Run several writes as one transaction (group commit); one failing is
        undone alone (`gateway.storage.database.batch`, optimistic: savepoints only
        when a job of the batch failed - every job here can run again).  The log
        positions for the batch are taken a block at a time (`ArchiveIndex.block`).
        The content a job will store (its ``blob_names()``, if it says) is
        registered first (`register_writes`); which of its copies the archive has
        already is asked once, before any write (`_batch_start`).

        The jobs that journal a message (their ``journals_message``) run first: its
        recipients' rows go in before an attempt's UPDATE of them, so that each
        table's writes of the batch go out as one statement (`Database.write` keeps
        a table's writes in the order they were made: journals and attempts taken
        turn about, each message's INSERT and the next one's UPDATE of recipients
        went out a row at a time).  The outcomes are in the order of ``jobs``."""
        names = [n for job in jobs for n in getattr(job, "blob_names", tuple)()]
        if self._outside:
            self.register_writes(names)
        copies = [n for n in names if n.startswith(COPY_PREFIX)]
        order = sorted(
            range(len(jobs)), key=lambda i: not getattr(jobs[i], "journals_message", False)
        )
        outcomes = batch(
            self.index.db,
            [jobs[i] for i in order],
            optimistic=True,
            around=functools.partial(self._batch_start, copies, len(jobs)),
        )
        in_order: list[tuple[Any, BaseException | None]] = [(None, None)] * len(jobs)
        for outcome, i in zip(outcomes, order, strict=True):
            in_order[i] = outcome
        return in_order

    @contextlib.contextmanager
    def _batch_start(self, copies: list[str], jobs: int) -> Iterator[None]:
        """The start of a batch's first run (in its transaction): log positions a
        block at a time (a leaf a job: one block, taken before any write), and which
        of ``copies`` the archive has - so that
        `journal_copy` need not ask each time, which would send the writes kept so
        far (`Database.write`) and split the batch's multi-row statements.  A run
        again one job at a time (after a failure) asks each time."""
        with self.index.block(jobs):
            sql = "SELECT record_id FROM copies WHERE record_id IN ({marks})"
            self._copies = {r for (r,) in self.index.db.among(sql, copies)}
            try:
                yield
            finally:
                self._copies = None

    # -- content outside the index ----------------------------------------------------------

    def register_writes(self, names: list[str]) -> None:
        """Before content goes to a blob store outside the index (files, a bucket),
        where it is stored before its record commits: its names, committed (the
        record's transaction removes each).  Content that a writer stopped between
        the two left behind is then known for what it is: an unfinished write, which
        `verify` does not report and `sweep_unfinished` removes."""
        if not self._outside or not names:
            return
        now = time.time()
        with self._transaction():
            self.index.db.write_many(
                "INSERT INTO unfinished(name, node, since) VALUES (?,?,?) ON CONFLICT (name) "
                "DO UPDATE SET node=excluded.node, since=excluded.since",
                [(n, self.node, now) for n in names],
            )
        self._registered.update(names)

    def _store(self, name: str, data: bytes, durable: bool = True) -> None:
        """Store a record's content, in the transaction that commits its record (the
        index's own database: both commit together; a file or an object is written
        at once, and was registered before that transaction began)."""
        self.blobs.put(name, data, durable)
        if self._outside:
            self.index.db.write("DELETE FROM unfinished WHERE name=?", (name,))
            self._registered.discard(name)

    def _register(self, name: str) -> None:
        """Before the transaction that commits ``name``'s record: content going
        outside the index is registered (a batch has registered its jobs' already;
        inside a transaction a caller began it cannot be)."""
        if self._outside and name not in self._registered and not self.index.db.in_transaction:
            self.register_writes([name])

    def sweep_unfinished(self, older_than: float, node: str | None = None) -> tuple[int, int]:
        """Remove content whose write did not finish: registered more than
        ``older_than`` seconds ago (``node``: only that node's, at any age - a node
        at start, for what it left when it stopped), and still not in the log.
        Content that cannot be removed (under Object Lock) stays registered: `verify`
        goes on knowing it for an unfinished write.  Returns how many were removed,
        and how many kept."""
        db = self.index.db
        if node is None:
            rows = db.execute(
                "SELECT name FROM unfinished WHERE since < ?", (time.time() - older_than,)
            ).fetchall()
        else:
            rows = db.execute("SELECT name FROM unfinished WHERE node=?", (node,)).fetchall()
        names = [name for (name,) in rows]
        logged = self._in_log(names)
        removed = kept = 0
        for name in names:
            if name not in logged:
                try:
                    self.blobs.delete(name)
                except (StorageError, OSError):  # locked, or unreachable: it stays registered
                    kept += 1
                    continue
                removed += 1
            db.execute("DELETE FROM unfinished WHERE name=?", (name,))
        return removed, kept

    def _in_log(self, record_ids: list[str]) -> set[str]:
        """Those of ``record_ids`` that have a leaf in the log (as the index is now)."""
        sql = "SELECT record_id FROM leaves WHERE record_id IN ({marks})"
        return {r for (r,) in self.index.db.among(sql, record_ids)}

    def make_durable(self, queue_ids: list[str] | None = None) -> None:
        """Put these messages' archived copies, and every committed index record, on
        disk (fsync of each blob, the blob directory and the index's write-ahead
        log).  Safe from another thread: files only, no database connection."""
        if queue_ids:
            self.blobs.make_durable_all([f"msg-{q}" for q in queue_ids])
        self.index.make_durable()

    # -- settings -------------------------------------------------------------------------

    def setting(self, name: str) -> str | None:
        return self.index.setting(name)

    def enforce_floor(self, actor: str = "config") -> None:
        """The retention floor can be raised, never lowered: a configured floor below
        the one the archive recorded is refused; a higher one is recorded (and the
        change is a record in the log)."""
        wanted = self.retention.floor_days
        stored = self.setting("retention_floor_days")
        if stored is not None and wanted < int(stored):
            raise ArchiveError(
                f"archive.retention.floor_days is {wanted}, but this archive's retention floor "
                f"is {stored} days: a floor can be raised, never lowered"
            )
        if stored is None or wanted > int(stored):
            with self._transaction():
                self.index.put_setting("retention_floor_days", str(wanted))
                self.journal_event(
                    "", "retention-floor", {"days": wanted, "was": stored, "actor": actor}
                )

    # -- writing ------------------------------------------------------------------------

    def _append(
        self, kind: str, record_id: str, digest: str, now: float, position: int | None = None
    ) -> int:
        """A leaf at the end of the log (``position``: one `ArchiveIndex.next_leaf`
        took already, in this transaction).  Returns its position, from 0."""
        if position is None:
            position = self.index.next_leaf()
        leaf = merkle.leaf_hash(commitment(kind, record_id, digest))
        self.index.db.write(
            "INSERT INTO leaves(idx, hash, kind, record_id, at) VALUES (?,?,?,?,?)",
            (position + 1, leaf, kind, record_id, now),  # idx counts from 1
        )
        return position

    def has(self, queue_id: str) -> bool:
        """Journaled (by the index: a blob commits with its index rows, or is made
        durable before the message's spool file goes)."""
        found = self.index.db.execute(
            "SELECT 1 FROM messages WHERE queue_id=?", (queue_id,)
        ).fetchone()
        return found is not None

    def has_content(self, queue_id: str) -> bool:
        return not self.lacking_content([queue_id])

    def lacking_content(self, queue_ids: list[str]) -> list[str]:
        """Those of ``queue_ids`` not journaled, or journaled without their blob (at
        start: a crash can lose a file blob written without fsync while the spool
        still holds the message) - asked for all at once, nothing read."""
        sql = "SELECT queue_id FROM messages WHERE queue_id IN ({marks})"
        journaled = [q for (q,) in self.index.db.among(sql, queue_ids)]
        stored = self.blobs.present([f"msg-{q}" for q in journaled])
        return [q for q in queue_ids if f"msg-{q}" not in stored]

    def journal_message(
        self,
        envelope: dict[str, Any],
        data: bytes,
        retain_until: float | None = None,
        durable: bool = True,
        subject: bool = False,
        data_sha256: str | None = None,
        envelope_json: bytes | None = None,
    ) -> str:
        """The message as received and its envelope (every recipient, Bcc included):
        sealed into a blob, committed to the log, indexed, kept until ``retain_until``
        (default: by the retention rules).  ``subject``: index the subject for search.
        ``data_sha256``: the digest of ``data``, when the caller has checked it.
        ``envelope_json``: ``canonical(envelope)``, when the caller has it (the
        spool's).  Returns its record id."""
        queue_id = str(envelope["queue_id"])
        record_id = f"msg-{queue_id}"
        head = canonical(envelope) if envelope_json is None else envelope_json
        record = head + b"\n" + data
        digest = hashlib.sha256(record).hexdigest()
        sealed = seal(record, record_id, self.keys)
        self._register(record_id)
        now = time.time()
        sender = str(envelope.get("mail_from", "")).lower()
        addresses = [str(r["address"]).lower() for r in envelope.get("recipients", [])]
        received = _timestamp(envelope.get("received_at"), now)
        if retain_until is None:
            domains = {a.rpartition("@")[2] for a in addresses}
            retain_until = received + self.retention.days(sender, domains, set()) * DAY
        db = self.index.db
        with self._transaction():
            self._store(record_id, sealed, durable)
            leaf = self._append("message", record_id, digest, now)
            row = (
                record_id,
                queue_id,
                received,
                sender,
                sender.rpartition("@")[2],
                message_id_of(data),
                str((envelope.get("client") or {}).get("ip", "")),
                len(data),
                data_sha256 or hashlib.sha256(data).hexdigest(),
                leaf,
                retain_until,
            )
            # journaled again (its blob was lost): a new leaf, the row rewritten
            db.write(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL) "
                "ON CONFLICT (record_id) DO UPDATE SET received=excluded.received, "
                "mail_from=excluded.mail_from, sender_domain=excluded.sender_domain, "
                "message_id=excluded.message_id, client_ip=excluded.client_ip, "
                "size=excluded.size, sha256=excluded.sha256, leaf=excluded.leaf, "
                "retain_until=excluded.retain_until, disposed=NULL",
                row,
            )
            db.write_many(
                "INSERT INTO recipients(queue_id, idx, address, domain, state) "
                "VALUES (?,?,?,?,'queued') ON CONFLICT (queue_id, idx) DO UPDATE SET "
                "address=excluded.address, domain=excluded.domain, state='queued', "
                "mode=NULL, rule=NULL, status='', attempts=0",
                [(queue_id, i, a, a.rpartition("@")[2]) for i, a in enumerate(addresses)],
            )
            if subject and self.index.subjects:
                db.write("INSERT INTO subjects VALUES (?,?)", (subject_of(data), queue_id))
        return record_id

    def journal_copy(self, queue_id: str, data: bytes, record_id: str | None = None) -> str:
        """A copy the gateway changed before sending it (encrypted, re-signed, tag
        removed), as sent: by its digest, once however many recipients got it
        (``record_id``: its `copy_name`, when the caller has it already)."""
        record_id = record_id or copy_name(data)
        digest = record_id.removeprefix(COPY_PREFIX)
        db = self.index.db
        known = self._copies
        if known is None:
            if db.execute("SELECT 1 FROM copies WHERE record_id=?", (record_id,)).fetchone():
                return record_id
        elif record_id in known:
            return record_id
        sealed = seal(data, record_id, self.keys)
        self._register(record_id)
        with self._transaction():
            self._store(record_id, sealed)
            leaf = self._append("copy", record_id, digest, time.time())
            db.write(
                "INSERT INTO copies VALUES (?,?,?,?,?)",
                (record_id, queue_id, digest, len(data), leaf),
            )
        if known is not None:
            known.add(record_id)
        return record_id

    def journal_attempt(self, queue_id: str, recipients: list[dict[str, Any]]) -> str:
        """One delivery attempt's outcome and evidence for some recipients (``idx``,
        ``address``, ``state``, ``status``, ``evidence`` with the decision; a value
        may be the `Encoded` text the queue state wrote): a record
        in the log, and each recipient's mode, rule and state for search.  A mode
        with a longer retention rule extends the message's retention."""
        db = self.index.db
        with self._transaction():
            record_id = self.journal_event(queue_id, "attempt", {"recipients": recipients})
            modes = set()
            for r in recipients:
                decision = (Encoded.value_of(r.get("evidence")) or {}).get("decision") or {}
                mode = decision.get("mode")
                if mode:
                    modes.add(mode)
                db.write(
                    "UPDATE recipients SET mode=coalesce(?, mode), rule=coalesce(?, rule), "
                    "state=?, status=?, attempts=attempts+1 WHERE queue_id=? AND idx=?",
                    (
                        mode,
                        decision.get("rule"),
                        r["state"],
                        r.get("status", ""),
                        queue_id,
                        r["idx"],
                    ),
                )
            if modes and any(rule.mode for rule in self.retention.rules):
                self._extend_retention(queue_id, modes)
        return record_id

    def _extend_retention(self, queue_id: str, modes: set[str]) -> None:
        db = self.index.db
        row = db.execute(
            "SELECT received, mail_from, retain_until FROM messages WHERE queue_id=?", (queue_id,)
        ).fetchone()
        if row is None:
            return
        domains = {
            d for (d,) in db.execute("SELECT domain FROM recipients WHERE queue_id=?", (queue_id,))
        }
        until = row[0] + self.retention.days(row[1], domains, modes) * DAY
        if until > row[2]:
            db.execute("UPDATE messages SET retain_until=? WHERE queue_id=?", (until, queue_id))

    def journal_event(self, queue_id: str, kind: str, body: dict[str, Any]) -> str:
        """An event about a message (decision, delivery attempt, access): indexed in
        full, committed to the log by its digest."""
        now = time.time()
        text = canonical_text({"queue_id": queue_id, "kind": kind, "at": now, **body})
        digest = hashlib.sha256(text.encode()).hexdigest()
        db = self.index.db
        with self._transaction():
            position = self.index.next_leaf()
            record_id = f"evt-{position}"
            leaf = self._append("event", record_id, digest, now, position)
            db.write(
                "INSERT INTO events VALUES (?,?,?,?,?,?)",
                (record_id, queue_id, kind, now, text, leaf),
            )
        return record_id

    def access(self, actor: str, action: str, queue_id: str = "", **detail: Any) -> str:
        """The access record: who searched, viewed, exported or changed what."""
        return self.journal_event(queue_id, "access", {"actor": actor, "action": action, **detail})

    # -- retention, holds and disposition ---------------------------------------------

    def hold(
        self,
        case_name: str,
        actor: str,
        queue_ids: list[str] | None = None,
        query: Query | None = None,
    ) -> int:
        """Place a legal hold for a case: on these messages, and/or on every message
        a query matches, now and arriving later (the query is recorded as the hold's
        scope).  Held messages are not purged while the case stands.  Returns how
        many messages the case holds now."""
        if not case_name.strip():
            raise ValueError("a hold needs a case name")
        if not queue_ids and query is None:
            raise ValueError("a hold needs message ids or a query")
        now = time.time()
        db = self.index.db
        unknown = [q for q in dict.fromkeys(queue_ids or []) if not self.has(q)]
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise ValueError(f"{len(unknown)} id(s) not in the archive: {shown}")
        with self._transaction():
            existing = db.execute(
                "SELECT query FROM cases WHERE case_name=?", (case_name,)
            ).fetchone()
            if existing is not None and existing[0] is not None and query is not None:
                raise ValueError(f"case {case_name!r} already holds by a query")
            db.execute(
                "INSERT INTO cases VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (case_name, canonical(query.to_dict()).decode() if query else None, now, actor),
            )
            if query is not None and existing is not None:
                db.execute(
                    "UPDATE cases SET query=? WHERE case_name=?",
                    (canonical(query.to_dict()).decode(), case_name),
                )
            db.executemany(
                "INSERT INTO holds VALUES (?,?) ON CONFLICT DO NOTHING",
                [(case_name, q) for q in queue_ids or []],
            )
            self.journal_event(
                "",
                "hold",
                {
                    "case": case_name,
                    "queue_ids": sorted(queue_ids or []),
                    "query": query.to_dict() if query else None,
                    "actor": actor,
                },
            )
        return len(self.held_by(case_name))

    def held_by(self, case_name: str) -> set[str]:
        db = self.index.db
        held = {
            q for (q,) in db.execute("SELECT queue_id FROM holds WHERE case_name=?", (case_name,))
        }
        row = db.execute("SELECT query FROM cases WHERE case_name=?", (case_name,)).fetchone()
        if row is not None and row[0] is not None:
            held |= self._matching(Query.from_dict(json.loads(row[0])))
        return held

    def cases(self) -> list[dict[str, Any]]:
        rows = self.index.db.execute(
            "SELECT case_name, query, placed, actor FROM cases ORDER BY placed"
        ).fetchall()
        return [
            {
                "case": name,
                "query": json.loads(query) if query else None,
                "placed": _iso(placed),
                "actor": actor,
                "messages": len(self.held_by(name)),
            }
            for name, query, placed, actor in rows
        ]

    def release(self, case_name: str, actor: str) -> int:
        db = self.index.db
        with self._transaction():
            held = len(self.held_by(case_name))
            if not db.execute("DELETE FROM cases WHERE case_name=?", (case_name,)).rowcount:
                raise KeyError(case_name)
            db.execute("DELETE FROM holds WHERE case_name=?", (case_name,))
            self.journal_event("", "hold-release", {"case": case_name, "actor": actor})
        return held

    def _where(self, query: Query, probe: bool = False) -> tuple[str, list[Any]]:
        """The query's condition.  ``probe``: first count (up to `FEW_RECIPIENTS`) the
        recipients its recipient condition matches, to pick the plan (`Query.sql`)."""
        few = False
        recipient = query.recipient_sql() if probe else None
        if recipient is not None:
            inner, args = recipient
            (n,) = self.index.db.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM recipients r WHERE {inner} LIMIT ?) t",
                [*args, FEW_RECIPIENTS],
            ).fetchone()
            few = n < FEW_RECIPIENTS
        return query.sql(self.index.subject_match if self.index.subjects else None, few)

    def _matching(self, query: Query) -> set[str]:
        where, args = self._where(query)
        return {
            q
            for (q,) in self.index.db.execute(
                f"SELECT m.queue_id FROM messages m WHERE {where}", args
            )
        }

    def expired(self, now: float | None = None) -> list[str]:
        """Messages past their retention that no hold covers (oldest first)."""
        now = time.time() if now is None else now
        rows = self.index.db.execute(
            "SELECT queue_id FROM messages m WHERE disposed IS NULL AND retain_until <= ? "
            "AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.queue_id = m.queue_id) "
            "ORDER BY retain_until",
            (now,),
        ).fetchall()
        held: set[str] = set()
        for (query,) in self.index.db.execute("SELECT query FROM cases WHERE query IS NOT NULL"):
            held |= self._matching(Query.from_dict(json.loads(query)))
        return [q for (q,) in rows if q not in held]

    def purge(
        self, queue_ids: list[str], reason: str, actor: str, now: float | None = None
    ) -> list[str]:
        """Remove the content of expired, unheld messages (and the changed copies
        sent for them); each removal is a disposition record in the log, so `verify`
        tells a lawful purge from a removal behind its back.  Returns the messages
        purged."""
        allowed = set(self.expired(now))
        purged = []
        db = self.index.db
        for queue_id in queue_ids:
            if queue_id not in allowed:
                continue
            row = db.execute(
                "SELECT record_id, sha256, retain_until FROM messages WHERE queue_id=?",
                (queue_id,),
            ).fetchone()
            copies = [
                c
                for (c,) in db.execute("SELECT record_id FROM copies WHERE queue_id=?", (queue_id,))
            ]
            with self._transaction():
                disposition = self.journal_event(
                    queue_id,
                    "disposition",
                    {
                        "record_id": row[0],
                        "copies": copies,
                        "content_sha256": row[1],
                        "retain_until": _iso(row[2]),
                        "reason": reason,
                        "actor": actor,
                    },
                )
                db.execute(
                    "UPDATE messages SET disposed=? WHERE record_id=?", (disposition, row[0])
                )
                if self.index.subjects:
                    db.execute("DELETE FROM subjects WHERE queue_id=?", (queue_id,))
            for name in (row[0], *copies):
                self.blobs.delete(name)
            purged.append(queue_id)
        return purged

    # -- checkpoints ----------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Extend the in-memory frontier by the leaves appended since (by any
        process)."""
        for (leaf,) in self.index.db.execute(
            "SELECT hash FROM leaves WHERE idx > ? ORDER BY idx", (self._frontier.size,)
        ):
            self._frontier.append(bytes(leaf))

    def size(self) -> int:
        return self.index.size()

    def checkpoint(self) -> str:
        """Sign the log as it stands; the note is kept and returned (publish it)."""
        with self._transaction():
            self.index.db.exclusive("checkpoint")  # one node signs at a time
            self._catch_up()
            cp = Checkpoint(self.origin, self._frontier.size, self._frontier.root())
            note = sign(cp, self.key_name, self.signing_key)
            self.index.db.execute(
                "INSERT INTO checkpoints VALUES (?,?,?,?) ON CONFLICT (size) DO UPDATE "
                "SET root=excluded.root, note=excluded.note, at=excluded.at",
                (cp.size, cp.root, note, time.time()),
            )
        return note

    def latest_checkpoint(self) -> tuple[int, str] | None:
        row = self.index.db.execute(
            "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    # -- reading ------------------------------------------------------------------------

    def message(self, queue_id: str) -> tuple[dict[str, Any], bytes]:
        """The envelope and the bytes received (KeyError: not archived, or purged)."""
        record = self.record(f"msg-{queue_id}")
        head, _, data = record.partition(b"\n")
        return json.loads(head), data

    def record(self, record_id: str) -> bytes:
        """A message or copy record as committed to the log (opened)."""
        blob = self.blobs.get(record_id)
        if blob is None:
            raise KeyError(record_id)
        return open_sealed(blob, record_id, self.keys)

    def search(self, query: Query, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Messages matching ``query``, newest first (from the ``offset``-th): metadata
        and per-recipient mode, rule and state (no content)."""
        where, args = self._where(query, probe=True)
        db = self.index.db
        rows = db.execute(
            "SELECT m.queue_id, m.received, m.mail_from, m.message_id, m.size, m.sha256, "
            "m.retain_until, m.disposed, m.client_ip, m.leaf FROM messages m "
            f"WHERE {where} ORDER BY m.received DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        recipients: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for queue_id, idx, address, mode, rule, state, status, attempts in db.execute(
            "SELECT queue_id, idx, address, mode, rule, state, status, attempts FROM recipients "
            f"WHERE queue_id IN ({marks}) ORDER BY queue_id, idx",
            ids,
        ):
            recipients[queue_id].append(
                {
                    "idx": idx,
                    "address": address,
                    "mode": mode,
                    "rule": rule,
                    "state": state,
                    "status": status,
                    "attempts": attempts,
                }
            )
        held = self._held_among(ids)
        return [
            {
                "queue_id": q,
                "received": _iso(received),
                "mail_from": mail_from,
                "message_id": message_id,
                "size": size,
                "sha256": sha,
                "retain_until": _iso(retain_until),
                "disposed": disposed is not None,
                "held": q in held,
                "client_ip": client_ip,
                "leaf": leaf,
                "recipients": recipients[q],
            }
            for (
                q,
                received,
                mail_from,
                message_id,
                size,
                sha,
                retain_until,
                disposed,
                client_ip,
                leaf,
            ) in rows
        ]

    def _held_among(self, ids: list[str]) -> set[str]:
        """Which of these messages a hold covers: by id, or by a case's query."""
        db = self.index.db
        marks = ",".join("?" * len(ids))
        held = {
            q for (q,) in db.execute(f"SELECT queue_id FROM holds WHERE queue_id IN ({marks})", ids)
        }
        for (query,) in db.execute("SELECT query FROM cases WHERE query IS NOT NULL").fetchall():
            where, args = self._where(Query.from_dict(json.loads(query)))
            held.update(
                q
                for (q,) in db.execute(
                    f"SELECT m.queue_id FROM messages m WHERE {where} AND m.queue_id IN ({marks})",
                    [*args, *ids],
                )
            )
        return held

    def events(self, queue_id: str, kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        rows = self.index.db.execute(
            "SELECT record_id, kind, body, leaf FROM events WHERE queue_id=? ORDER BY leaf",
            (queue_id,),
        ).fetchall()
        return [
            {"record_id": r, "kind": k, "leaf": leaf, "body": json.loads(b)}
            for r, k, b, leaf in rows
            if not kinds or k in kinds
        ]

    def event_text(self, record_id: str) -> str:
        """An event exactly as committed to the log."""
        row = self.index.db.execute(
            "SELECT body FROM events WHERE record_id=?", (record_id,)
        ).fetchone()
        if row is None:
            raise KeyError(record_id)
        return str(row[0])

    def copies(self, queue_id: str) -> list[dict[str, Any]]:
        rows = self.index.db.execute(
            "SELECT record_id, sha256, size, leaf FROM copies WHERE queue_id=? ORDER BY leaf",
            (queue_id,),
        ).fetchall()
        return [{"record_id": r, "sha256": s, "size": n, "leaf": leaf} for r, s, n, leaf in rows]

    def access_counts(self) -> dict[str, int]:
        db = self.index.db
        rows = db.execute(
            f"SELECT {db.json_text('body', 'action')}, count(*) FROM events "
            "WHERE kind='access' GROUP BY 1"
        )
        return {str(action): int(n) for action, n in rows}

    def access_log(self, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.index.db.execute(
            "SELECT record_id, body FROM events WHERE kind='access' AND at >= ? "
            "ORDER BY leaf DESC LIMIT ?",
            (since, limit),
        ).fetchall()
        return [{"record_id": r, **json.loads(b)} for r, b in rows]

    def leaf_hashes(self, record_ids: list[str]) -> dict[str, bytes]:
        marks = ",".join("?" * len(record_ids))
        rows = self.index.db.execute(
            f"SELECT record_id, hash FROM leaves WHERE record_id IN ({marks})", record_ids
        )
        return {r: bytes(h) for r, h in rows}

    def proofs(self, record_ids: list[str], size: int) -> dict[str, dict[str, Any]]:
        """Inclusion proofs of these records in the tree of the first ``size`` leaves
        (a checkpoint's): leaf index and the hashes, hex.

        The tree is taken in aligned blocks of ``2**PROOF_BLOCK`` leaves: a proof is
        the path inside its block (hashed from the block's leaves) and then the path
        among the blocks' roots - the same hashes as over the whole tree (an RFC 6962
        tree built bottom-up, a lone last node carried up: a block's nodes depend on
        its leaves only).  The roots of complete blocks never change in an append-only
        log and are kept, so after the first proof each costs one block, not a walk
        over every leaf."""
        marks = ",".join("?" * len(record_ids))
        found = self.index.db.execute(
            f"SELECT record_id, idx FROM leaves WHERE record_id IN ({marks}) AND idx <= ?",
            [*record_ids, size],
        ).fetchall()
        if not found:
            return {}
        top = merkle.levels(self._block_roots(size))
        out = {}
        for record_id, idx in found:
            index = idx - 1
            block = index >> PROOF_BLOCK
            first = block << PROOF_BLOCK
            leaves = self._leaf_range(first, min(first + (1 << PROOF_BLOCK), size))
            path = merkle.inclusion_proof_at(index - first, merkle.levels(leaves))
            path += merkle.inclusion_proof_at(block, top)
            out[record_id] = {
                "leaf_index": index,
                "tree_size": size,
                "path": [p.hex() for p in path],
            }
        return out

    def _leaf_range(self, first: int, end: int) -> list[bytes]:
        """The hashes of leaves ``first`` to ``end - 1`` (0-based positions)."""
        rows = self.index.db.execute(
            "SELECT hash FROM leaves WHERE idx > ? AND idx <= ? ORDER BY idx", (first, end)
        )
        return [bytes(r[0]) for r in rows]

    def _block_roots(self, size: int) -> list[bytes]:
        """The roots of the blocks of the first ``size`` leaves (the last one partial
        when ``size`` is not a multiple of the block)."""
        width = 1 << PROOF_BLOCK
        complete = size >> PROOF_BLOCK
        kept = self._complete_blocks
        step = 64  # blocks read at a time
        while len(kept) < complete:
            start = len(kept)
            stop = min(complete, start + step)
            leaves = self._leaf_range(start * width, stop * width)
            for b in range(stop - start):
                kept.append(merkle.levels(leaves[b * width : (b + 1) * width])[-1][0])
        roots = kept[:complete]
        if size % width:
            partial = self._leaf_range(complete * width, size)
            roots.append(merkle.levels(partial)[-1][0])
        return roots

    # -- verification --------------------------------------------------------------------

    def note_verification(self, report: Report, seconds: float, actor: str) -> None:
        """Keep a verification's outcome (the daemon's metrics read it) and record
        who verified in the access record."""
        summary = {"at": time.time(), "ok": report.ok, "seconds": seconds}
        with self._transaction():
            self.index.put_setting("last_verify", json.dumps(summary))
            self.access(
                actor,
                "verify",
                ok=report.ok,
                problems=len(report.problems),
                leaves=report.leaves,
            )

    def verify(self, public: ed25519.Ed25519PublicKey | None = None) -> Report:
        """Check every record against its leaf, the leaves against every stored
        checkpoint (its signature, and the root of the log at its size), and that
        nothing is in the store or index that the log does not know.  Reads one
        snapshot of the index (writers go on meanwhile: what they add is for the next
        run, `_settle`)."""
        public = public or self.signing_key.public_key()
        with self.index.db.snapshot():
            report, seen = self._verify(public)
        self._settle(report, seen)
        return report

    def _settle(self, report: Report, seen: set[str]) -> None:
        """What the snapshot cannot judge alone, as the store is now: a blob store
        outside the index (files, a bucket) is read live, so content stored after
        the snapshot began - journaled by this or another node meanwhile, or by a
        batch whose blobs are stored and whose rows are about to commit - is newer
        than the snapshot, not unknown; content purged meanwhile is gone under a
        disposition the snapshot did not hold yet; content registered as being written
        (`register_writes`) is an unfinished write.  A blob still unknown once the
        log has stopped taking in the unknown ones for `SETTLE_QUIET` seconds is a
        problem (`SETTLE_MOST` at most)."""
        db = self.index.db
        gone = [p for p in report.problems if p.what == "its stored content is gone"]
        if gone:
            disposed = self._disposed_now([p.record_id for p in gone])
            report.problems = [
                p for p in report.problems if not (p in gone and p.record_id in disposed)
            ]
        unknown = {name for name in self.blobs.names() if name not in seen}
        unfinished_sql = "SELECT name FROM unfinished WHERE name IN ({marks})"
        start = quiet = time.monotonic()
        while unknown:
            logged = self._in_log(sorted(unknown))
            unfinished = {n for (n,) in db.among(unfinished_sql, sorted(unknown - logged))}
            report.unfinished += len(unfinished)  # written as it ran, or left by a stopped writer
            now = time.monotonic()
            if logged or unfinished:
                unknown -= logged | unfinished
                quiet = now
            if not unknown or now - quiet >= SETTLE_QUIET or now - start >= SETTLE_MOST:
                break
            time.sleep(0.1)
        for name in sorted(unknown):
            report.problems.append(Problem(name, None, "a stored blob the log does not know"))

    def _disposed_now(self, record_ids: list[str]) -> set[str]:
        """Those of ``record_ids`` (messages, copies) that a disposition record covers
        now (the next verification checks that record against the log)."""
        db = self.index.db
        disposed = (
            "FROM messages m JOIN events e ON e.record_id = m.disposed AND e.kind = 'disposition'"
        )
        messages = f"SELECT m.record_id {disposed} WHERE m.record_id IN ({{marks}})"
        copies = (
            f"SELECT c.record_id {disposed} JOIN copies c ON c.queue_id = m.queue_id "
            "WHERE c.record_id IN ({marks})"
        )
        return {r for sql in (messages, copies) for (r,) in db.among(sql, record_ids)}

    def _verify(self, public: ed25519.Ed25519PublicKey) -> tuple[Report, set[str]]:  # noqa: C901 - one walk over the log, checking each kind of record in turn
        db = self.index.db
        report = Report()

        # rows are read per leaf, not all at once: memory stays flat for millions
        def row(sql: str, record_id: str) -> Any:
            return db.execute(sql, (record_id,)).fetchone()

        disposed: set[str] = set()
        for (body,) in db.execute("SELECT body FROM events WHERE kind='disposition'"):
            record = json.loads(body)
            disposed.add(record["record_id"])
            disposed.update(record.get("copies", ()))
        checkpoints = db.execute(
            "SELECT size, root, note FROM checkpoints ORDER BY size"
        ).fetchall()
        wanted = {int(size): (bytes(root_hash), note) for size, root_hash, note in checkpoints}
        frontier = merkle.Frontier()
        seen: set[str] = set()
        for idx, leaf, kind, record_id in db.stream(
            "SELECT idx, hash, kind, record_id FROM leaves ORDER BY idx"
        ):
            position = frontier.size
            if idx - 1 != position:
                report.problems.append(Problem(record_id, position, "a leaf is missing before it"))
                while frontier.size < idx - 1:  # keep positions, so later checks name the gap
                    frontier.append(b"")
            leaf = bytes(leaf)
            frontier.append(leaf)
            if frontier.size in wanted:
                self._check_checkpoint(frontier, wanted.pop(frontier.size), public, report)
            seen.add(record_id)
            if kind == "message":
                report.messages += 1
                found = row(
                    "SELECT record_id, leaf, sha256, disposed FROM messages WHERE record_id=?",
                    record_id,
                )
                if found is not None and found[3] is not None and record_id in disposed:
                    report.disposed += 1
                    if self.blobs.get(record_id) is not None:
                        what = "disposed of, but its content is still stored"
                        report.problems.append(Problem(record_id, position, what))
                    continue  # purged under retention, and the log says so
                self._check_content("message", record_id, position, leaf, found, report)
            elif kind == "copy":
                if record_id in disposed:
                    continue
                found = row(
                    "SELECT record_id, leaf, sha256 FROM copies WHERE record_id=?", record_id
                )
                self._check_content("copy", record_id, position, leaf, found, report)
            else:
                found = row("SELECT record_id, leaf, body FROM events WHERE record_id=?", record_id)
                self._check_event(record_id, kind, position, leaf, found, report)
        report.leaves = frontier.size
        for (record_id,) in db.execute(
            "SELECT record_id FROM messages UNION ALL SELECT record_id FROM events "
            "UNION ALL SELECT record_id FROM copies"
        ):
            if record_id not in seen:
                report.problems.append(Problem(record_id, None, "indexed but not in the log"))
        report.checkpoints = len(checkpoints)
        for size in sorted(wanted):
            report.problems.append(
                Problem(f"checkpoint-{size}", None, "the log is shorter: leaves were removed")
            )
        return report, seen

    def _check_checkpoint(
        self,
        frontier: merkle.Frontier,
        stored: tuple[bytes, str],
        public: ed25519.Ed25519PublicKey,
        report: Report,
    ) -> None:
        size = frontier.size
        root_hash, note = stored
        try:
            cp = verify(note, self.key_name, public)
        except CheckpointError as e:
            report.problems.append(Problem(f"checkpoint-{size}", None, str(e)))
            return
        if cp.size != size or cp.root != root_hash:
            report.problems.append(
                Problem(f"checkpoint-{size}", None, "does not match its index row")
            )
        elif frontier.root() != cp.root:
            report.problems.append(
                Problem(f"checkpoint-{size}", None, "the log no longer has this root")
            )

    def _check_event(
        self, record_id: str, kind: str, position: int, leaf: bytes, row: Any, report: Report
    ) -> None:
        if row is None:
            report.problems.append(Problem(record_id, position, "its index row is gone"))
            return
        digest = hashlib.sha256(row[2].encode()).hexdigest()
        if merkle.leaf_hash(commitment(kind, record_id, digest)) != leaf:
            report.problems.append(Problem(record_id, position, "its index row was altered"))

    def _opened(self, record_id: str, position: int, report: Report) -> bytes | None:
        blob = self.blobs.get(record_id)
        if blob is None:
            report.problems.append(Problem(record_id, position, "its stored content is gone"))
            return None
        try:
            return open_sealed(blob, record_id, self.keys)
        except SealError as e:
            report.problems.append(Problem(record_id, position, f"its stored content: {e}"))
            return None

    def _check_content(
        self, kind: str, record_id: str, position: int, leaf: bytes, row: Any, report: Report
    ) -> None:
        """A message or copy record: its blob opens and matches its leaf, and its index
        row holds the digest of its content (for a message, of the bytes received)."""
        if row is None:
            report.problems.append(Problem(record_id, position, "its index row is gone"))
        record = self._opened(record_id, position, report)
        if record is None:
            return
        digest = hashlib.sha256(record).hexdigest()
        if merkle.leaf_hash(commitment(kind, record_id, digest)) != leaf:
            report.problems.append(Problem(record_id, position, "does not match its leaf"))
            return
        if kind == "message":
            digest = hashlib.sha256(record.partition(b"\n")[2]).hexdigest()
        if row is not None and row[2] != digest:
            report.problems.append(Problem(record_id, position, "its index row was altered"))


COPY_PREFIX = "copy-"


def copy_name(data: bytes) -> str:
    """A changed copy's record id: by its digest (one record however many recipients
    got the same bytes)."""
    return COPY_PREFIX + hashlib.sha256(data).hexdigest()


def _timestamp(value: Any, default: float) -> float:
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return default


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")
