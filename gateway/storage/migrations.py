"""migrations - each store's schema has a version, and a node never runs against one
it does not know.

A store lists its steps: step ``n`` takes its tables from version ``n`` to ``n + 1``
(the first one makes them).  Every step is written so that running it twice does
no harm (``CREATE ... IF NOT EXISTS``, `Database.add_column`), so a SQLite file made
before versions were recorded (version 0) is brought up by the same steps.

The version is kept in ``sealgate_schema`` beside the store's tables (one row per
store).  On opening (`prepare`):
- newer than this Sealgate knows: refused (`SchemaTooNew`) - another node was
  upgraded first, or this one was downgraded;
- older: migrated when the database allows it (`Database.auto_migrate`: always
  for the embedded SQLite files, ``storage.auto_migrate`` for PostgreSQL), else
  refused (`NeedsMigration`: run ``sealgate storage migrate``).
A migration runs in one transaction (DDL is transactional in both engines: it is
all done or not at all) that only one process holds at a time (SQLite's single
writer; an advisory lock on PostgreSQL), so nodes starting at once migrate once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.storage.database import Database, Schema, StorageError

Step = Schema | Callable[[Database], None]

VERSIONS = Schema("""
CREATE TABLE IF NOT EXISTS sealgate_schema (
    store TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    applied {real} NOT NULL
)
""")


class SchemaTooNew(StorageError):
    pass


class NeedsMigration(StorageError):
    pass


@dataclass(frozen=True)
class Versioned:
    """A store's schema: its name (the row in ``sealgate_schema``) and its steps."""

    store: str
    steps: tuple[Step, ...]

    @property
    def version(self) -> int:
        return len(self.steps)


def stored_version(db: Database, store: str) -> int:
    """The version recorded for ``store`` (0: none yet)."""
    if not db.has_table("sealgate_schema"):
        return 0
    row = db.execute("SELECT version FROM sealgate_schema WHERE store=?", (store,)).fetchone()
    return 0 if row is None else int(row[0])


def prepare(db: Database, schema: Versioned) -> None:
    """Make sure the store's tables are at this Sealgate's version (see the module)."""
    have = stored_version(db, schema.store)
    if have == schema.version:
        return
    _refuse_newer(db, schema, have)
    if not db.auto_migrate:
        raise NeedsMigration(
            f"{db.name}: the {schema.store} tables are at version {have}, this Sealgate "
            f"needs {schema.version}: run 'sealgate storage migrate' "
            "(or set storage.auto_migrate: true)"
        )
    migrate(db, schema)


def migrate(db: Database, schema: Versioned) -> tuple[int, int]:
    """Apply the steps the store lacks, in one transaction.  Returns (version
    before, after)."""
    with db.transaction():
        # one migrates, the others wait (SQLite: the transaction is the only writer)
        db.exclusive("migrate")
        db.create(VERSIONS)
        have = stored_version(db, schema.store)
        _refuse_newer(db, schema, have)
        for step in schema.steps[have:]:
            _apply(db, step)
        _record(db, schema)
    return have, schema.version


def _apply(db: Database, step: Step) -> None:
    if isinstance(step, Schema):
        db.create(step)
    else:
        step(db)


def _record(db: Database, schema: Versioned) -> None:
    db.execute(
        "INSERT INTO sealgate_schema VALUES (?,?,?) ON CONFLICT (store) DO UPDATE "
        "SET version=excluded.version, applied=excluded.applied "
        "WHERE sealgate_schema.version < excluded.version",
        (schema.store, schema.version, time.time()),
    )


def _refuse_newer(db: Database, schema: Versioned, have: int) -> None:
    if have > schema.version:
        raise SchemaTooNew(
            f"{db.name}: the {schema.store} tables are at version {have}, newer than this "
            f"Sealgate knows ({schema.version}): upgrade Sealgate on this node"
        )
