"""The archive of a running gateway, read as the command line reads it: through a
connection of its own.  The daemon's connection belongs to its archive thread; a
test that read through it from the event loop's thread would race that thread.

`refusing`: the archive's database refuses some rows - a fault in the database
itself, as a full disk would be, rather than a patched method."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.archive.journal import Archive
from gateway.archive.service import open_archive


@contextlib.contextmanager
def archive_of(gw: Any) -> Iterator[Archive]:
    archive = open_archive(gw.config, gw.hostname, create=False)
    try:
        yield archive
    finally:
        archive.index.close()


@contextlib.contextmanager
def refusing(gw: Any, table: str, when: str = "TRUE", path: Path | None = None) -> Iterator[None]:
    """Until the block ends, inserting a row into ``table`` of the archive's index
    (SQLite; or of the database at ``path``) fails - those for which ``when`` holds
    (SQL over ``NEW``): a trigger that aborts the statement, as a full disk would.
    ``gw``: a running gateway."""
    path = path or gw.archive.archive.index.path
    assert path is not None, "an archive on SQLite"
    name = f"test_refuses_{table}"

    def execute(sql: str) -> None:
        with contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
            db.execute(sql)

    execute(
        f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {when} "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full (refused by the test)'); END"
    )
    try:
        yield
    finally:
        execute(f"DROP TRIGGER IF EXISTS {name}")
