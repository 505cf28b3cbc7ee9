"""migrations - each store's schema has a version, and a node never runs against one
it does not know.

A store lists its steps: step ``n`` takes its tables from version ``n`` to ``n + 1``
(the first one makes them).  Every step is written so that running it twice does
no harm (``CREATE ... IF NOT EXISTS``, `Database.add_column`): a migration that
stopped half-way is simply run again, and a SQLite file made before versions were
recorded (version 0) is brought up by the same steps.

The version is kept in ``sealgate_schema`` beside the store's tables (one row per
store).  On opening (`prepare`):
- newer than this Sealgate knows: refused (`SchemaTooNew`) - another node was
  upgraded first, or this one was downgraded;
- older: migrated when the database allows it (`Database.auto_migrate`: always
  for the embedded SQLite files, ``storage.auto_migrate`` for PostgreSQL), else
  refused (`NeedsMigration`: run ``sealgate storage migrate``).
On PostgreSQL a migration runs in one transaction under an advisory lock, so nodes
starting at once migrate once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.storage.database import Database, Dialect, Schema, StorageError

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
    db.create(VERSIONS)
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
    """Apply the steps the store lacks.  Returns (version before, after)."""
    if db.dialect is Dialect.POSTGRESQL:
        with db.transaction():
            db.exclusive(f"migrate:{schema.store}")  # one node migrates, the others wait
            have = stored_version(db, schema.store)
            _refuse_newer(db, schema, have)
            for step in schema.steps[have:]:
                _apply(db, step)
            _record(db, schema)
        return have, schema.version
    # SQLite: a script commits any open transaction first, so steps run alone (each
    # can run again) and the version is recorded after them
    have = stored_version(db, schema.store)
    _refuse_newer(db, schema, have)
    for step in schema.steps[have:]:
        _apply(db, step)
    with db.transaction():
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
