"""The engines every store's contract suite runs on: SQLite (a file in the test's
directory) and PostgreSQL (a database of its own on the session's private server,
`tests.support.postgres`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gateway.storage.database import Database

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def connect(request, tmp_path) -> Iterator[Callable[[], Database]]:
    """Opens connections to one store on the engine of the test's parameter: each
    call a new connection to the same store (as two processes or nodes would)."""
    opened: list[Database] = []
    if request.param == "sqlite":

        def open_one() -> Database:
            opened.append(Database.sqlite(tmp_path / "store.db"))
            return opened[-1]

    else:
        server = request.getfixturevalue("postgres")
        url = server.database()
        password = server.password_file.read_text().strip()

        def open_one() -> Database:
            opened.append(Database.postgresql(url, password))
            return opened[-1]

    yield open_one
    for db in opened:
        db.close()
