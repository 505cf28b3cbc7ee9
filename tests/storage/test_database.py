"""The engine layer every store uses, on SQLite and PostgreSQL: writes kept for one
round trip still reach the database in the order they were made and before the
commit; one that fails fails its transaction (or, in a group commit, its own
operation alone); a batch's operations commit together."""

from __future__ import annotations

import pytest

from gateway.storage.database import Schema, batch

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
