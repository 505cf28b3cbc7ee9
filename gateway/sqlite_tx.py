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


class _Failed(Exception):
    pass


def batch(
    db: sqlite3.Connection, operations: list[Callable[[], Any]], optimistic: bool = False
) -> list[Outcome]:
    """Several operations in one transaction (group commit): each in a savepoint, so
    one that fails is undone alone and reports its exception.

    ``optimistic``: first all of them without savepoints (two statements fewer per
    operation); only if one fails is the transaction rolled back and the batch run
    again with savepoints.  For operations that may safely run twice."""
    if optimistic and len(operations) > 1:
        values: list[Any] = []
        try:
            with transaction(db):
                for operation in operations:
                    try:
                        values.append(operation())
                    except Exception as e:
                        raise _Failed from e
            return [(v, None) for v in values]
        except _Failed:
            pass  # rolled back: again, each alone
    results: list[Outcome] = []
    with transaction(db):
        for operation in operations:
            db.execute("SAVEPOINT operation")
            try:
                results.append((operation(), None))
            except Exception as e:  # the caller gets it, the others go on
                db.execute("ROLLBACK TO operation")
                results.append((None, e))
            db.execute("RELEASE operation")
    return results
