"""The engines every store's contract suite runs on: SQLite (a file in the test's
directory) and PostgreSQL (a database of its own on the session's private server,
`tests.support.postgres`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.storage.database import Database

ENGINES = ["sqlite", "postgresql"]


def opener(
    engine: str, request: Any, tmp_path: Path, opened: list[Database]
) -> Callable[[], Database]:
    """Opens connections to one store on ``engine``: each call a new connection to the
    same store (as two processes or nodes would)."""
    if engine == "sqlite":

        def open_one() -> Database:
            opened.append(Database.sqlite(tmp_path / "store.db"))
            return opened[-1]

        return open_one
    server = request.getfixturevalue("postgres")
    url = server.database()
    password = server.password_file.read_text().strip()

    def open_pg() -> Database:
        opened.append(Database.postgresql(url, password, auto_migrate=True))
        return opened[-1]

    return open_pg


def sealgate(directory: Path, *args: str) -> Any:
    """The command with the configuration the test wrote in ``directory``."""
    from tests.conftest import run_sealgate

    return run_sealgate(*args, "--config", str(directory / "config.yaml"))


@pytest.fixture(params=ENGINES)
def connect(request, tmp_path) -> Iterator[Callable[[], Database]]:
    opened: list[Database] = []
    yield opener(request.param, request, tmp_path, opened)
    for db in opened:
        db.close()
