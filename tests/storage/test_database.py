"""The engine layer every store uses, on SQLite and PostgreSQL: writes kept for one
round trip still reach the database in the order they were made and before the
commit; one that fails fails its transaction (or, in a group commit, its own
operation alone); a batch's operations commit together."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time

import pytest

from gateway.storage import database
from gateway.storage.database import Database, Schema, batch

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS child (
    id INTEGER PRIMARY KEY, parent INTEGER NOT NULL REFERENCES parent(id)
);
""")


def rows(db, table):
    return [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608


def test_kept_writes_arrive_in_order_before_a_read_and_the_commit(connect):
    db, other = connect(), connect()
    db.create(SCHEMA)
    with db.transaction():
        db.write("INSERT INTO parent VALUES (?,?)", (1, "a"))
        db.write("INSERT INTO child VALUES (?,?)", (10, 1))  # after its parent
        db.write("INSERT INTO parent VALUES (?,?)", (2, "b"))
        db.write_many("INSERT INTO child VALUES (?,?)", [(11, 2), (12, 2)])
        assert rows(db, "child") == [(10, 1), (11, 2), (12, 2)]  # a read sees them
        db.write("UPDATE parent SET name=? WHERE id=?", ("c", 2))
    assert rows(other, "parent") == [(1, "a"), (2, "c")]  # committed


def test_a_kept_write_that_fails_fails_its_transaction(connect):
    db = connect()
    db.create(SCHEMA)
    db.execute("INSERT INTO parent VALUES (1, 'a')")
    with pytest.raises(Exception, match="(?i)unique|duplicate"), db.transaction():
        db.write("INSERT INTO parent VALUES (?,?)", (2, "b"))
        db.write("INSERT INTO parent VALUES (?,?)", (1, "again"))
    assert rows(db, "parent") == [(1, "a")]  # nothing of it
    db.write("INSERT INTO parent VALUES (?,?)", (3, "c"))  # outside: at once
    assert rows(db, "parent") == [(1, "a"), (3, "c")]


@pytest.mark.parametrize("optimistic", [False, True])
def test_in_a_group_commit_a_failing_operation_fails_alone(connect, optimistic):
    db = connect()
    db.create(SCHEMA)
    db.execute("INSERT INTO parent VALUES (1, 'a')")

    def insert(n):
        return lambda: db.write("INSERT INTO parent VALUES (?,?)", (n, f"p{n}"))

    outcomes = batch(db, [insert(2), insert(1), insert(3)], optimistic=optimistic)
    assert [error is None for _, error in outcomes] == [True, False, True]
    assert [r[0] for r in rows(db, "parent")] == [1, 2, 3]


def test_a_group_commit_whose_upserts_meet_the_same_key_still_commits_each(connect):
    db = connect()
    db.create(SCHEMA)

    def upsert(n, name):
        return lambda: db.write(
            "INSERT INTO parent VALUES (?,?) ON CONFLICT (id) DO UPDATE SET name=excluded.name",
            (n, name),
        )

    outcomes = batch(db, [upsert(1, "a"), upsert(2, "b"), upsert(1, "c")], optimistic=True)
    assert all(error is None for _, error in outcomes)
    assert rows(db, "parent") == [(1, "c"), (2, "b")]  # in the order made


MIXED = Schema("""
CREATE TABLE IF NOT EXISTS item (
    a TEXT NOT NULL, b {int} NOT NULL, state TEXT, at {real}, n {int} NOT NULL DEFAULT 0,
    data {blob}, PRIMARY KEY (a, b)
);
""")


def items(db):
    return [tuple(r) for r in db.execute("SELECT a, b, state, at, n, data FROM item ORDER BY a, b")]


def test_kept_writes_of_many_rows_do_what_one_statement_a_row_would(connect):
    """On PostgreSQL the rows of one kept statement go out together (an INSERT's as
    one VALUES list, an UPDATE's or DELETE's joined to one): every type, a column
    NULL in every row, constants beside the placeholders - the same rows as one
    statement a row (SQLite)."""
    db = connect()
    db.create(MIXED)
    with db.transaction():
        db.write_many(
            "INSERT INTO item(a, b, state, n) VALUES (?, ?, 'new', 0)",
            [(f"q{i}", i) for i in range(6)],
        )
        db.write_many(  # 'at' NULL in every row
            "INSERT INTO item(a, b, at, data) VALUES (?, ?, ?, ?)",
            [("r", 1, None, b"\x00" * 3), ("r", 2, None, None)],
        )
    with db.transaction():
        for i in range(4):  # 'at': an integer in one row, floats in the others
            db.write(
                "UPDATE item SET state=coalesce(?, state), at=?, n=n+1, data=? WHERE a=? AND b=?",
                (None, i if i == 0 else i + 0.5, bytes([i]), f"q{i}", i),
            )
        db.write("UPDATE item SET state=?, at=? WHERE a=? AND b=?", ("x", None, "q4", 4))
        db.write("UPDATE item SET state=?, at=? WHERE a=? AND b=?", ("y", None, "q5", 5))
        db.write_many("DELETE FROM item WHERE a=?", [("q1",), ("q3",), ("nothing",)])
    assert items(db) == [
        ("q0", 0, "new", 0, 1, b"\x00"),
        ("q2", 2, "new", 2.5, 1, b"\x02"),
        ("q4", 4, "x", None, 0, None),
        ("q5", 5, "y", None, 0, None),
        ("r", 1, None, None, 0, b"\x00\x00\x00"),
        ("r", 2, None, None, 0, None),
    ]


def test_a_kept_update_meeting_the_same_row_twice_applies_both_in_order(connect):
    db = connect()
    db.create(MIXED)
    db.execute("INSERT INTO item(a, b) VALUES ('q', 1)")
    with db.transaction():
        for state in ("first", "second"):
            db.write("UPDATE item SET state=?, n=n+1 WHERE a=? AND b=?", (state, "q", 1))
    assert items(db) == [("q", 1, "second", None, 2, None)]


def test_a_kept_update_of_a_row_inserted_after_an_earlier_update_finds_it(connect):
    # A group commit: one job updates an old row; the next inserts a row and the
    # one after updates it.  Sent a statement's rows at a time in the order the
    # statements were first made, both updates went before the insert - and the
    # new row's update found nothing (the archive's recipients stayed "queued").
    db = connect()
    db.create(MIXED)
    db.create(SCHEMA)
    db.execute("INSERT INTO item(a, b) VALUES ('old', 1)")
    with db.transaction():
        db.write("UPDATE item SET state=? WHERE a=? AND b=?", ("sent", "old", 1))
        db.write("INSERT INTO item(a, b) VALUES (?,?)", ("new", 2))
        db.write("UPDATE item SET state=? WHERE a=? AND b=?", ("sent", "new", 2))
        db.write("INSERT INTO parent VALUES (?,?)", (1, "elsewhere"))
        db.write("INSERT INTO item(a, b) VALUES (?,?)", ("newer", 3))
    assert [(a, b, state) for a, b, state, *_ in items(db)] == [
        ("new", 2, "sent"),
        ("newer", 3, None),
        ("old", 1, "sent"),
    ]


def test_on_sqlite_kept_inserts_go_as_a_few_multi_row_statements(tmp_path):
    # One engine step for many rows (a statement a row handed the interpreter lock
    # back and forth at each): 13 rows as 8 + 4 + 1, upserts included, same rows.
    db = Database.sqlite(tmp_path / "store.db")
    db.create(MIXED)
    run: list[str] = []
    db._connection.set_trace_callback(run.append)
    with db.transaction():
        for n in range(13):
            db.write("INSERT INTO item(a, b, n) VALUES (?,?,?)", ("q", n, n))
        db.write_many(
            "INSERT INTO item(a, b, state) VALUES (?,?,'new') ON CONFLICT (a, b) "
            "DO UPDATE SET state='again'",
            [("q", 0), ("r", 0), ("r", 0)],  # the same key twice: applied in turn
        )
    inserts = [s for s in run if s.startswith("INSERT")]
    assert [s.count("),(") + 1 for s in inserts] == [8, 4, 1, 2, 1]
    assert [(a, b, state, n) for a, b, state, _, n, _ in items(db)] == [
        *[("q", 0, "again", 0)],
        *[("q", n, None, n) for n in range(1, 13)],
        ("r", 0, "again", 0),
    ]
    db.close()


def test_on_sqlite_a_write_kept_inside_a_snapshot_reaches_the_database(tmp_path):
    # A snapshot is for reads (on PostgreSQL read only); a write made in one on
    # SQLite is kept like any other in a transaction: it must be sent when the
    # snapshot ends, and before a read of it.
    db, other = Database.sqlite(tmp_path / "store.db"), Database.sqlite(tmp_path / "store.db")
    db.create(SCHEMA)
    with db.snapshot():
        db.write("INSERT INTO parent VALUES (?,?)", (1, "a"))
        assert list(db.stream("SELECT name FROM parent")) == [("a",)]
        db.write("INSERT INTO parent VALUES (?,?)", (2, "b"))
    assert rows(other, "parent") == [(1, "a"), (2, "b")]
    db.close()
    other.close()


def _holding(db: Database, held: threading.Event, release: threading.Event, out: list) -> None:
    """Hold ``db``'s write lock from ``held`` until ``release``; when it let go in
    ``out``."""
    with db.transaction():
        db.execute("INSERT INTO t(v) VALUES ('held')")
        held.set()
        release.wait(10)
    out.append(time.monotonic())


def _table(path):
    setup = Database.sqlite(path)
    setup.execute("CREATE TABLE t(v TEXT)")
    setup.close()


def test_on_sqlite_a_writer_gets_the_lock_soon_after_another_lets_it_go(tmp_path):
    """Another connection holds the write lock for 20 ms after a writer began waiting
    for it: the writer has it within a few milliseconds of its release (SQLite's own
    wait, sleeping 1, 2, 5, 10, 15 ms in turn, would look again 13 ms after it) - the
    median of five tries, against the machine's own hiccups."""
    path = tmp_path / "q.db"
    _table(path)
    gaps = []
    for _ in range(5):
        holder, writer = Database.sqlite(path), Database.sqlite(path)
        held, release, released = threading.Event(), threading.Event(), []
        thread = threading.Thread(target=_holding, args=(holder, held, release, released))
        thread.start()
        assert held.wait(5)
        threading.Timer(0.02, release.set).start()
        with writer.transaction():
            got = time.monotonic()
            writer.execute("INSERT INTO t(v) VALUES ('writer')")
        thread.join()
        gaps.append(got - released[0])
        holder.close()
        writer.close()
    assert statistics.median(gaps) < 0.008, gaps
    db = Database.sqlite(path)
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 10


def test_on_sqlite_a_writer_waits_for_the_lock_no_longer_than_the_timeout(tmp_path, monkeypatch):
    """A lock held longer than the timeout: "database is locked", no transaction left
    open, and the connection's own wait for locks (reads) is as it was."""
    monkeypatch.setattr(database, "LOCK_TIMEOUT", 0.3)
    path = tmp_path / "q.db"
    _table(path)
    holder, writer = Database.sqlite(path), Database.sqlite(path)
    held, release, released = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=_holding, args=(holder, held, release, released))
    thread.start()
    assert held.wait(5)
    began = time.monotonic()
    try:
        with (
            pytest.raises(sqlite3.OperationalError, match="database is locked"),
            writer.transaction(),
        ):
            pass
        assert 0.3 <= time.monotonic() - began < 5
        assert not writer.in_transaction
        assert writer.execute("PRAGMA busy_timeout").fetchone()[0] == 300
    finally:
        release.set()
        thread.join()
    with writer.transaction():  # free now
        writer.execute("INSERT INTO t(v) VALUES ('writer')")
    assert [r[0] for r in writer.execute("SELECT v FROM t")] == ["held", "writer"]


def test_on_sqlite_transactions_one_after_another_send_no_pragma_between_them(tmp_path):
    """The connection's own wait for locks is turned off once for a run of
    transactions, and on again only for a statement outside one."""
    path = tmp_path / "q.db"
    _table(path)
    db = Database.sqlite(path)
    sent: list[str] = []
    db._connection.set_trace_callback(sent.append)
    for n in range(3):
        with db.transaction():
            db.write("INSERT INTO t(v) VALUES (?)", (str(n),))
    assert [s for s in sent if "busy_timeout" in s] == ["PRAGMA busy_timeout=0"]
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 3
    assert [s for s in sent if "busy_timeout" in s][1:] == ["PRAGMA busy_timeout=30000"]
    db.close()


def test_on_sqlite_a_statement_after_a_transaction_waits_for_the_lock_again(tmp_path):
    """After a transaction of its own, a write outside one waits for another
    connection's lock (SQLite's own wait, on again), rather than failing at once."""
    path = tmp_path / "q.db"
    _table(path)
    holder, writer = Database.sqlite(path), Database.sqlite(path)
    with writer.transaction():
        writer.write("INSERT INTO t(v) VALUES ('first')")
    held, release, released = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=_holding, args=(holder, held, release, released))
    thread.start()
    try:
        assert held.wait(5)
        threading.Timer(0.1, release.set).start()
        writer.execute("INSERT INTO t(v) VALUES ('alone')")
        done = time.monotonic()
    finally:
        release.set()
        thread.join()
    assert done >= released[0]
    assert [r[0] for r in writer.execute("SELECT v FROM t")] == ["first", "held", "alone"]
    holder.close()
    writer.close()


# the `connect` fixture (tests.support.stores) on its PostgreSQL engine alone
ON_POSTGRESQL = pytest.mark.parametrize("connect", ["postgresql"], indirect=True)


@ON_POSTGRESQL
@pytest.mark.parametrize("left", ["in pipeline mode", "with a statement under way"])
def test_on_postgresql_a_connection_a_failure_left_mid_exchange_is_made_again(connect, left):
    """psycopg cannot always unwind a failure.  The server stopping while a
    pipelined batch's results were on their way left libpq in pipeline mode behind
    psycopg's back: every later plain statement was refused without touching the
    socket ("PQsendQuery not allowed in pipeline mode"), the connection never looked
    broken, and the shared store failed for good (a cluster node answered 451 after
    the database was back).  Such a connection is made again before it is used."""
    db = connect()
    db.execute("CREATE TABLE t (v INTEGER)")
    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    pgconn = db._connection.pgconn  # the state psycopg left, made by hand
    if left == "in pipeline mode":
        pgconn.enter_pipeline_mode()
    else:
        pgconn.send_query(b"SELECT 1")  # its result never read
    [(_, error)] = batch(db, [lambda: db.write("INSERT INTO t VALUES (?)", (1,))])
    assert error is None
    assert db.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert [r[0] for r in db.execute("SELECT v FROM t")] == [1]


@ON_POSTGRESQL
def test_on_postgresql_a_pipeline_is_not_taken_for_one_left_over(connect):
    """The check above leaves a pipeline of ours alone - a nested one too, after the
    inner one has ended."""
    db = connect()
    db.execute("CREATE TABLE t (v INTEGER)")
    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    with db.pipelined():
        with db.pipelined():
            db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (2)")
        assert db.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    assert sorted(r[0] for r in db.execute("SELECT v FROM t")) == [1, 2]


@ON_POSTGRESQL
def test_on_postgresql_a_dropped_connection_is_made_again_but_a_closed_one_is_not(connect):
    """The server dropping a connection (an outage, a restart) is survived between
    transactions; a Database its owner closed stays closed: a late statement fails
    instead of opening a connection nobody would close."""
    admin, db = connect(), connect()

    def connections() -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        return admin.execute(sql).fetchone()[0]

    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    admin.execute("SELECT pg_terminate_backend(?)", (pid,))
    with pytest.raises(database.StorageError):  # noticed by the statement under way
        db.execute("SELECT 1")
    assert db.execute("SELECT 1").fetchone()[0] == 1  # the next one reconnects
    assert connections() == 2
    db.close()
    with pytest.raises(database.StorageError, match="closed"):
        db.execute("SELECT 1")
    assert connections() == 1


@ON_POSTGRESQL
def test_on_postgresql_rows_updated_together_are_found_by_key_however_the_table_has_grown(
    connect,
):
    """An UPDATE joined to its rows' VALUES is planned for the table as it is now.  Kept
    by the server (prepared) from when the table was new and small, its plan - a hash
    join over a scan of every row - stayed as the table grew: in the relay on
    PostgreSQL every batch of the queue's and the archive's updates read their whole
    tables (3 ms a statement at 20,000 rows against 0.05).  Here the archive's table
    of recipients and its update of an attempt's outcome."""
    db, admin = connect(), connect()
    db.execute(
        "CREATE TABLE recipients (queue_id TEXT NOT NULL, idx INTEGER NOT NULL, "
        "address TEXT NOT NULL, domain TEXT NOT NULL, mode TEXT, rule TEXT, "
        "state TEXT NOT NULL, status TEXT NOT NULL DEFAULT '', "
        "attempts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (queue_id, idx))"
    )
    db.execute("CREATE INDEX recipients_by_address ON recipients(address)")
    db.execute("CREATE INDEX recipients_by_domain ON recipients(domain)")
    add = "INSERT INTO recipients(queue_id, idx, address, domain, state) VALUES (?,0,?,?,?)"

    def outcome(queue_ids: list[str]) -> None:  # `Archive.journal_attempt`'s, together
        with db.transaction():
            for queue_id in queue_ids:
                db.write(
                    "UPDATE recipients SET mode=coalesce(?, mode), rule=coalesce(?, rule), "
                    "state=?, status=?, attempts=attempts+1 WHERE queue_id=? AND idx=?",
                    ("tls", "default", "delivered", "2.0.0", queue_id, 0),
                )

    def scans() -> int:
        sql = "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'recipients'"
        return int(admin.execute(sql).fetchone()[0])

    for i in range(12):  # the same statement again and again while the table is new
        db.execute(add, (f"q{i:08d}", "r@example.net", "example.net", "queued"))
        outcome(["q00000000", "nothing"])
    with db.transaction():
        db.write_many(
            add,
            [(f"q{i:08d}", "r@example.net", "example.net", "queued") for i in range(12, 20_000)],
        )
    db.execute("SELECT pg_stat_force_next_flush()")
    before = scans()
    outcome(["q00010000", "q00010001"])
    db.execute("SELECT pg_stat_force_next_flush()")
    assert scans() == before  # found by the primary key, not by reading every row
    sql = "SELECT queue_id, attempts, state FROM recipients WHERE attempts > 0 ORDER BY queue_id"
    assert [tuple(r) for r in db.execute(sql)] == [
        ("q00000000", 12, "delivered"),
        ("q00010000", 1, "delivered"),
        ("q00010001", 1, "delivered"),
    ]
