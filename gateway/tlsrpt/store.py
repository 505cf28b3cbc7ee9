"""store - TLS-RPT's counts and the reports sent, in the queue's database (its
schema's version 5).

``tlsrpt_sessions``: sessions by UTC day, policy domain, policy and kind of failure
(the empty result for successes), added to as each node flushes its tally, so that
a cluster's nodes count into one report.  ``tlsrpt_reports``: one row per domain
and day, inserted by the node that sends that report (the insert is the claim: a
second node's insert finds the row and leaves it), with what became of it.

Blocking: called from a thread.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.storage.database import Database, Schema
from gateway.storage.migrations import prepare
from gateway.tlsrpt.model import Failure, ResultType

# the queue store's version 5 (`gateway.queue.store`): its tables, kept in its database
SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS tlsrpt_sessions (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    policy TEXT NOT NULL,
    result TEXT NOT NULL,
    mx TEXT NOT NULL,
    ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    sessions {int} NOT NULL,
    PRIMARY KEY (day, domain, policy, result, mx, ip, reason)
);
CREATE TABLE IF NOT EXISTS tlsrpt_reports (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    node TEXT NOT NULL,
    report_id TEXT NOT NULL,
    created {real} NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (day, domain)
)
""")

KEEP_DAYS = 14  # counts and report records are kept this long (sealgate tlsrpt show)


class TlsRptStore:
    def __init__(self, db: Database):
        from gateway.queue.store import VERSIONED  # the tables are the queue store's

        self.db = db
        prepare(db, VERSIONED)

    def close(self) -> None:
        self.db.close()

    def add(self, rows: list[tuple[str, str, str, Failure | None, int]]) -> None:
        """Add a node's counts (`Tally.drain`) to the shared ones."""
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO tlsrpt_sessions VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT (day, domain, policy, result, mx, ip, reason) "
                "DO UPDATE SET sessions = tlsrpt_sessions.sessions + excluded.sessions",
                [
                    (
                        day,
                        domain,
                        key,
                        f.result.value if f else "",
                        f.mx if f else "",
                        f.ip if f else "",
                        f.reason if f else "",
                        n,
                    )
                    for day, domain, key, f, n in rows
                ],
            )

    def due(self, before_day: str) -> list[tuple[str, str]]:
        """(day, domain) with counts, before ``before_day``, not reported yet."""
        rows = self.db.execute(
            "SELECT DISTINCT s.day, s.domain FROM tlsrpt_sessions s "
            "LEFT JOIN tlsrpt_reports r ON r.day = s.day AND r.domain = s.domain "
            "WHERE s.day < ? AND r.day IS NULL ORDER BY s.day, s.domain",
            (before_day,),
        ).fetchall()
        return [(str(day), str(domain)) for day, domain in rows]

    def counts(
        self, day: str, domain: str | None = None
    ) -> dict[str, dict[str, tuple[int, dict[Failure, int]]]]:
        """A day's counts: by domain, by policy key, (successes, failures by kind)."""
        sql = "SELECT domain, policy, result, mx, ip, reason, sessions FROM tlsrpt_sessions "
        sql += "WHERE day = ?" + (" AND domain = ?" if domain else "")
        found: dict[str, dict[str, tuple[int, dict[Failure, int]]]] = {}
        params = (day, domain) if domain else (day,)
        for dom, key, result, mx, ip, reason, n in self.db.execute(sql, params).fetchall():
            ok, failed = found.setdefault(dom, {}).get(key, (0, {}))
            if result:
                failed[Failure(ResultType(result), mx, ip, reason)] = int(n)
            else:
                ok += int(n)
            found[dom][key] = (ok, failed)
        return found

    def claim(self, day: str, domain: str, node: str, report_id: str, now: float) -> bool:
        """Whether this node sends ``domain``'s report for ``day`` (no other did)."""
        with self.db.transaction():
            cursor = self.db.execute(
                "INSERT INTO tlsrpt_reports VALUES (?,?,?,?,?,'sending','') "
                "ON CONFLICT (day, domain) DO NOTHING",
                (day, domain, node, report_id, now),
            )
            return bool(cursor.rowcount == 1)

    def settle(self, day: str, domain: str, state: str, detail: dict[str, Any]) -> None:
        with self.db.transaction():
            self.db.execute(
                "UPDATE tlsrpt_reports SET state = ?, detail = ? WHERE day = ? AND domain = ?",
                (state, json.dumps(detail, sort_keys=True), day, domain),
            )

    def retrying(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Reports whose POSTs are to be tried again: (day, domain, detail)."""
        rows = self.db.execute(
            "SELECT day, domain, detail FROM tlsrpt_reports WHERE state = 'retry'"
        ).fetchall()
        return [(str(day), str(domain), json.loads(detail)) for day, domain, detail in rows]

    def reports(self, day: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT domain, node, report_id, state, detail FROM tlsrpt_reports "
            "WHERE day = ? ORDER BY domain",
            (day,),
        ).fetchall()
        return [
            {
                "domain": domain,
                "node": node,
                "report_id": report_id,
                "state": state,
                "detail": json.loads(detail) if detail else {},
            }
            for domain, node, report_id, state, detail in rows
        ]

    def prune(self, before_day: str) -> None:
        """Forget counts and reports of days before ``before_day``."""
        with self.db.transaction():
            self.db.execute("DELETE FROM tlsrpt_sessions WHERE day < ?", (before_day,))
            self.db.execute("DELETE FROM tlsrpt_reports WHERE day < ?", (before_day,))
