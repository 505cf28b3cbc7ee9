"""service - what the console reads from the archive and changes in it, each call in
the console's own thread on connections of its own (its pages never wait behind the
journal's thread), and every look recorded in the archive's access record with the
signed-in person as the actor.

The overview's daily counts of days that are over are kept in the console store
(`ConsoleStore.days`): a year of them is read, not recounted; the last week's (whose
recipients may still be retried) are counted from the archive's index, at most every
`RECENT_TTL`.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.archive import report
from gateway.archive.export import export_bytes
from gateway.archive.journal import Archive
from gateway.archive.query import Query
from gateway.console.store import ConsoleStore

T = TypeVar("T")
DAY = 86400
SETTLED_AFTER = 7  # days: a day's counts are kept once it is this old (retries are over)
RECENT_TTL = 120.0  # seconds a more recent day's counts are shown before a recount
MAX_CSV = 100_000  # messages in a search's CSV (metadata only)
CSV_PAGE = 2_000  # messages read for it at a time
MAX_EXPORT = 10_000  # messages the console puts in one export (it is built in memory)
MAX_EXPORT_BYTES = 512 * 2**20  # and their size


@dataclass(frozen=True)
class Actor:
    """Who is looking, as the access record names them."""

    identity: str
    display: str
    roles: frozenset[str]
    client: str

    def __str__(self) -> str:
        return (
            f"{self.display} ({self.identity}; console {','.join(sorted(self.roles))}, "
            f"from {self.client})"
        )


def transport_class(evidence: dict[str, Any]) -> str:
    """How a delivered copy's transport was secured: dane, mta-sts, pkix, unverified
    TLS, or none."""
    if not evidence.get("tls_version"):
        return "no-tls"
    verification = str(evidence.get("verification") or "none")
    if verification.startswith("dane"):
        return "dane"
    if verification == "pkix":
        return "mta-sts" if evidence.get("mta_sts") == "enforce" else "pkix"
    return "unverified"


class ConsoleData:
    def __init__(self, archive: Archive, store: ConsoleStore):
        self.archive, self.store = archive, store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="console")
        self._recent_counts: dict[datetime.date, tuple[float, dict[str, Any]]] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def note(
        self, actor: Actor | str, action: str, queue_id: str = "", **detail: Any
    ) -> None:
        """Record in the access record (from the event loop)."""
        await self.run(functools.partial(self.record, actor, action, queue_id, **detail))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.archive.index.close()
        self.store.close()

    # -- reading (blocking: in the thread) ------------------------------------------

    def search(
        self, actor: Actor, query: Query, limit: int, offset: int, record: bool = True
    ) -> list[dict[str, Any]]:
        results = self.archive.search(query, limit=limit, offset=offset)
        if record:
            self.archive.access(
                str(actor), "search", query=query.to_dict(), results=len(results), offset=offset
            )
        return results

    def csv_page(self, query: Query, offset: int, header: bool) -> tuple[str, int]:
        """One page (`CSV_PAGE` messages from ``offset``) of a search's load file, and
        how many messages it has: the console streams a CSV page by page, so its
        memory and its thread are held for one page at a time."""
        results = self.archive.search(query, limit=CSV_PAGE, offset=offset)
        return report.to_csv(report.with_last_attempts(self.archive, results), header), len(results)

    def story(self, actor: Actor, queue_id: str) -> dict[str, Any]:
        """A message's delivery proof (envelope, decisions, evidence, copies, log
        proof) and its holds and disposition events (KeyError: not archived)."""
        proof = report.delivery_proof(self.archive, queue_id)
        proof["events"] = [
            e for e in self.archive.events(queue_id) if e["kind"] not in ("attempt", "access")
        ]
        self.archive.access(str(actor), "view-evidence", queue_id)
        return proof

    def proof(self, actor: Actor, queue_id: str) -> dict[str, Any]:
        proof = report.delivery_proof(self.archive, queue_id)
        self.archive.access(str(actor), "proof", queue_id)
        return proof

    def content(self, actor: Actor, queue_id: str) -> bytes:
        """The message as received (KeyError: not archived, or purged)."""
        _, data = self.archive.message(queue_id)
        self.archive.access(str(actor), "view", queue_id)
        return data

    def part(self, actor: Actor, queue_id: str, index: int) -> bytes:
        _, data = self.archive.message(queue_id)
        self.archive.access(str(actor), "download", queue_id, part=index)
        return data

    def export(self, actor: Actor, ids: list[str], scope: str) -> bytes:
        """The export zip, built in memory (ValueError: an id that is not in the
        archive, or more than the console builds: `MAX_EXPORT` messages or
        `MAX_EXPORT_BYTES` - the command line's export has no such limit)."""
        if len(ids) > MAX_EXPORT:
            raise ValueError(
                f"{len(ids):,} messages: the console exports at most {MAX_EXPORT:,} at a time; "
                "narrow the search, or use 'sealgate archive export' on the command line"
            )
        unknown = [q for q in ids if not self.archive.has(q)]
        if unknown:
            raise ValueError(f"not in the archive: {', '.join(unknown[:10])}")
        total = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            (size,) = self.archive.index.db.execute(
                f"SELECT coalesce(sum(size), 0) FROM messages WHERE queue_id IN ({marks})",  # noqa: S608 - placeholders only
                chunk,
            ).fetchone()
            total += int(size)
        if total > MAX_EXPORT_BYTES:
            raise ValueError(
                f"{total / 2**20:,.0f} MiB of messages: the console exports at most "
                f"{MAX_EXPORT_BYTES // 2**20:,} MiB at a time; narrow the search, or use "
                "'sealgate archive export' on the command line"
            )
        return export_bytes(self.archive, ids, str(actor), scope)

    def case_ids(self, case: str) -> list[str]:
        return sorted(self.archive.held_by(case))

    def cases(self) -> list[dict[str, Any]]:
        return self.archive.cases()

    def hold(self, actor: Actor, case: str, ids: list[str], query: Query | None) -> int:
        held = self.archive.hold(case, str(actor), ids, query)
        self.archive.access(
            str(actor), "hold", case=case, queue_ids=len(ids),
            query=query.to_dict() if query else None, held=held,
        )  # fmt: skip
        return held

    def release(self, actor: Actor, case: str) -> int:
        released = self.archive.release(case, str(actor))
        self.archive.access(str(actor), "hold-release", case=case, released=released)
        return released

    def expired(self, actor: Actor) -> list[str]:
        expired = self.archive.expired()
        self.archive.access(str(actor), "purge-preview", would_purge=len(expired))
        return expired

    def access_log(
        self,
        since: float,
        until: float | None,
        actor: str = "",
        action: str = "",
        queue_id: str = "",
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """The access record, newest first, filtered: ``actor`` (part of its name),
        ``action`` (exactly), ``queue_id``."""
        db = self.archive.index.db
        where = ["kind='access'", "at >= ?"]
        args: list[Any] = [since]
        if until is not None:
            where.append("at < ?")
            args.append(until)
        if queue_id:
            where.append("queue_id = ?")
            args.append(queue_id)
        if actor:
            where.append(f"lower({db.json_text('body', 'actor')}) LIKE ?")
            args.append("%" + actor.lower().replace("%", "").replace("_", "") + "%")
        if action:
            where.append(f"{db.json_text('body', 'action')} = ?")
            args.append(action)
        rows = db.execute(
            f"SELECT record_id, queue_id, at, body FROM events WHERE {' AND '.join(where)} "  # noqa: S608 - fixed fragments, bound values
            "ORDER BY leaf DESC LIMIT ?",
            [*args, limit],
        ).fetchall()
        return [
            {"record_id": r, "queue_id": q, "at": at, **json.loads(body)} for r, q, at, body in rows
        ]

    def record(self, actor: Actor | str, action: str, queue_id: str = "", **detail: Any) -> None:
        self.archive.access(str(actor), action, queue_id, **detail)

    def status(self) -> dict[str, Any]:
        """The archive's health: the last verification and the last checkpoint."""
        last = self.archive.setting("last_verify")
        checkpoint = self.archive.latest_checkpoint()
        at = None
        if checkpoint is not None:
            at = self.archive.index.db.execute(
                "SELECT at FROM checkpoints WHERE size=?", (checkpoint[0],)
            ).fetchone()[0]
        return {
            "verify": json.loads(last) if last else None,
            "checkpoint": {"size": checkpoint[0], "at": at} if checkpoint else None,
            "size": self.archive.size(),
        }

    # -- the overview's counts -----------------------------------------------------------

    def overview(self, days: int, now: float) -> list[tuple[str, dict[str, Any]]]:
        """(day, counts) for the last ``days`` days, oldest first."""
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        wanted = [today - datetime.timedelta(days=n) for n in range(days - 1, -1, -1)]
        kept = self.store.days(wanted[0].isoformat(), wanted[-1].isoformat())
        settled: dict[str, dict[str, Any]] = {}
        out = []
        for day in wanted:
            name = day.isoformat()
            counts = kept.get(name)
            if counts is None and (today - day).days < SETTLED_AFTER:
                counts = self._recent(day, now)
            elif counts is None:
                counts = settled[name] = self.count_day(day)
            out.append((name, counts))
        if settled:
            self.store.put_days(settled)
        return out

    def _recent(self, day: datetime.date, now: float) -> dict[str, Any]:
        """A day whose recipients may still change: counted again after
        `RECENT_TTL` (each look at the overview would recount a week otherwise)."""
        cached = self._recent_counts.get(day)
        if cached is None or now - cached[0] > RECENT_TTL:
            cached = self._recent_counts[day] = (now, self.count_day(day))
            for old in [d for d in self._recent_counts if d < day - datetime.timedelta(days=8)]:
                del self._recent_counts[old]
        return cached[1]

    def settled_days_missing(self, now: float, days: int) -> list[datetime.date]:
        """The finished days of the last ``days`` whose counts are not kept yet."""
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        (first,) = self.archive.index.db.execute("SELECT min(received) FROM messages").fetchone()
        if first is None:
            return []  # nothing archived yet: no day to count
        oldest = datetime.datetime.fromtimestamp(float(first), datetime.UTC).date()
        wanted = [today - datetime.timedelta(days=n) for n in range(SETTLED_AFTER, days)]
        wanted = [d for d in wanted if d >= oldest]
        if not wanted:
            return []
        kept = self.store.days(wanted[-1].isoformat(), wanted[0].isoformat())
        return [d for d in wanted if d.isoformat() not in kept]

    def keep_day(self, day: datetime.date) -> None:
        """Count a finished day and keep its counts (the overview then reads them),
        unless they are kept already."""
        name = day.isoformat()
        if not self.store.days(name, name):
            self.store.put_days({name: self.count_day(day)})

    def count_day(self, day: datetime.date) -> dict[str, Any]:
        start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()
        end = start + DAY
        db = self.archive.index.db
        messages = db.execute(
            "SELECT count(*) FROM messages WHERE received >= ? AND received < ?", (start, end)
        ).fetchone()[0]
        modes: Counter[str] = Counter()
        states: Counter[str] = Counter()
        for mode, state, n in db.execute(
            "SELECT r.mode, r.state, count(*) FROM messages m JOIN recipients r "
            "ON r.queue_id = m.queue_id WHERE m.received >= ? AND m.received < ? "
            "GROUP BY r.mode, r.state",
            (start, end),
        ):
            states[str(state)] += int(n)
            if state == "delivered":
                modes[str(mode or "tls")] += int(n)
        tls_versions: Counter[str] = Counter()
        transports: Counter[str] = Counter()
        for (body,) in db.execute(
            "SELECT body FROM events WHERE kind='attempt' AND at >= ? AND at < ?", (start, end)
        ):
            for r in json.loads(body).get("recipients", []):
                if r.get("state") != "delivered":
                    continue
                evidence = r.get("evidence") or {}
                if evidence.get("mx_host") is None:
                    continue  # not sent over SMTP (the portal keeps it)
                tls_versions[str(evidence.get("tls_version") or "none")] += 1
                transports[transport_class(evidence)] += 1
        portal: Counter[str] = Counter()
        for (body,) in db.execute(
            "SELECT body FROM events WHERE kind='access' AND at >= ? AND at < ?", (start, end)
        ):
            access = json.loads(body)
            action = access.get("action")
            if action == "view" and str(access.get("actor", "")).startswith("recipient "):
                portal["pickups"] += 1
            elif action == "expired-unread":
                portal["expired_unread"] += 1
        return {
            "messages": int(messages),
            "modes": dict(modes),
            "states": dict(states),
            "tls_versions": dict(tls_versions),
            "transports": dict(transports),
            "portal": dict(portal),
        }
