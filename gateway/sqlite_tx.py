"""Transactions on the SQLite connections Sealgate opens in autocommit mode
(``isolation_level=None``): there, ``with connection:`` does not begin a transaction
- each statement would commit alone - so every store uses these instead."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

Outcome = tuple[Any, BaseException | None]


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction; inside another, part of that one."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def batch(
    db: sqlite3.Connection, operations: list[Callable[[], Any]], optimistic: bool = False
) -> list[Outcome]:
    """`gateway.storage.database.batch` on a bare SQLite connection."""
    from gateway.storage.database import Database, Dialect
    from gateway.storage.database import batch as run_batch

    return run_batch(Database(Dialect.SQLITE, db, "sqlite"), operations, optimistic)
