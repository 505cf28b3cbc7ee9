"""database - one SQL connection to a store, whichever engine holds it: SQLite (the
embedded default: a file per store under ``state_dir``) or PostgreSQL (shared by
several nodes).

A store writes its statements once, with ``?`` placeholders, and says only what
differs between the engines in its schema (`Schema`: the column types, an
identity column).  `Database` turns the placeholders into the engine's, runs
transactions the same way on both (SQLite: ``BEGIN IMMEDIATE``, so that writers
queue instead of failing; PostgreSQL: a transaction per block, autocommit outside)
and raises `StorageError` for what the store cannot do anything about (the server
went away, authentication failed).  A connection belongs to one thread at a time.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import SealgateError

# SQLite: how long a statement waits for another connection's lock, and the steps
# in which a writer waits for the write lock (`Database._begin_immediate`)
LOCK_TIMEOUT = 30.0
LOCK_STEP_FIRST = 0.0002
LOCK_STEP_MOST = 0.002


class StorageError(SealgateError):
    """The store cannot be reached or used; the message says why.  ``temporary``: it
    may work if tried again (the server is unreachable), as opposed to a setting to
    fix (authentication, a database that does not exist, a schema too new)."""

    def __init__(self, message: str, temporary: bool = False):
        super().__init__(message)
        self.temporary = temporary


class Dialect(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class Schema:
    """A store's tables, written once: ``{real}``, ``{blob}``, ``{int}`` (64 bits),
    ``{id}`` (an integer primary key the database numbers) stand for each engine's
    types."""

    text: str

    def for_dialect(self, dialect: Dialect) -> str:
        if dialect is Dialect.POSTGRESQL:
            # REAL is 4 bytes in PostgreSQL: timestamps need 8
            types = {
                "real": "DOUBLE PRECISION",
                "blob": "BYTEA",
                "int": "BIGINT",
                "id": "BIGSERIAL PRIMARY KEY",
            }
        else:
            types = {"real": "REAL", "blob": "BLOB", "int": "INTEGER", "id": "INTEGER PRIMARY KEY"}
        return self.text.format(**types)


# values in one "IN (...)" list (`Database.among`)
IN_CHUNK = 500

# the one row of values of an INSERT: "VALUES (?,?,...)", constants allowed beside
# the placeholders ("NULL", "'queued'"), no parentheses inside
_VALUES = re.compile(r"\bVALUES\s*(\((?:[^()'?]|'[^']*')*\?(?:[^()']|'[^']*')*\))")
# a condition that names rows by their key: "a=? AND b=?"
_KEYED = r"\w+\s*=\s*\?(?:\s+AND\s+\w+\s*=\s*\?)*"
_UPDATE = re.compile(
    rf"UPDATE\s+(\w+)\s+SET\s+((?:(?!\bSELECT\b|\bWHERE\b).)+?)\s+WHERE\s+({_KEYED})", re.S
)
_DELETE = re.compile(rf"DELETE\s+FROM\s+(\w+)\s+WHERE\s+({_KEYED})", re.S)


_WRITTEN_TABLE = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)", re.I)


@functools.lru_cache(maxsize=1024)
def _table_of(sql: str) -> str | None:
    """The table a write statement writes to (None: not a plain INSERT, UPDATE or
    DELETE - kept in order with everything)."""
    found = _WRITTEN_TABLE.match(sql)
    return found.group(1).lower() if found else None


@functools.lru_cache(maxsize=4096)
def _postgres_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Database:
    def __init__(self, dialect: Dialect, connection: Any, name: str, auto_migrate: bool = True):
        self.dialect = dialect
        self.name = name  # for messages: the file, or the server and database
        # whether a store may bring its tables up to date when it opens them
        # (`gateway.storage.migrations`)
        self.auto_migrate = auto_migrate
        self._connection = connection
        self._depth = 0
        # SQLite: the connection's own wait for locks is off (`_begin_immediate`),
        # until a statement outside a transaction needs it again (`_waiting`)
        self._no_wait = False
        self._reconnect: Callable[[], Any] | None = None  # PostgreSQL: a new connection
        # in a transaction: writes not sent yet, in groups (`write`, `_keep`)
        self._deferred: list[tuple[str, list[tuple[Any, ...]]]] = []
        self._merging = False  # upserts too go out many rows a statement (`batch`)
        self._pipelining = False  # PostgreSQL: inside `pipelined`

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def sqlite(
        cls, path: Path, synchronous: str = "FULL", page_size: int | None = None
    ) -> Database:
        """``synchronous``: SQLite's setting in WAL mode - NORMAL survives a crash of
        the process but a power loss can lose the last commits (for a store whose
        durable truth is elsewhere, such as the queue state beside the spool).
        ``page_size``: for a database made now (one made before keeps its own)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            path,
            timeout=LOCK_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,  # (multi-row INSERTs of a few sizes each: `write`)
        )
        if page_size is not None:  # (before WAL mode: a file in WAL mode keeps its size)
            connection.execute(f"PRAGMA page_size={int(page_size)}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
        connection.execute("PRAGMA foreign_keys=ON")
        return cls(Dialect.SQLITE, connection, str(path))

    @classmethod
    def postgresql(
        cls,
        url: str,
        password: str | None = None,
        schema: str | None = None,
        auto_migrate: bool = False,
    ) -> Database:
        """``url`` names the server and database (never the password: it comes from
        ``password``, else from libpq's ``PGPASSWORD``/``PGPASSFILE``).  ``schema``:
        the store's own namespace in the database (made if missing), so that stores
        sharing one database keep their table names."""
        import psycopg

        options: dict[str, Any] = {}
        if schema is not None:
            if not schema.isidentifier():
                raise ValueError(f"{schema!r} is not a schema name")
            options["options"] = f"-c search_path={schema}"
        name = _without_password(url) + (f" (schema {schema})" if schema else "")

        def connect() -> Any:  # at first, and again after the server dropped it
            try:
                return psycopg.connect(
                    url, password=password, autocommit=True, connect_timeout=10, **options
                )
            except psycopg.OperationalError as e:
                raise connect_error(name, e) from None

        connection = connect()
        if schema is not None:
            try:
                with contextlib.suppress(psycopg.errors.UniqueViolation):  # made at once
                    connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            except psycopg.OperationalError as e:
                raise connect_error(name, e) from None
        db = cls(Dialect.POSTGRESQL, connection, name, auto_migrate)
        db._reconnect = connect
        return db

    def close(self) -> None:
        """Closed for good: a statement after it fails (`StorageError`) - a late job of
        a stopping component must not open a new connection nobody will close."""
        self._reconnect = None
        self._connection.close()

    # -- statements --------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """A cursor (``fetchone``, ``fetchall``, ``rowcount``, iteration)."""
        self.flush()
        if self.dialect is Dialect.POSTGRESQL:
            with self._server():
                return self._connection.execute(_postgres_sql(sql), tuple(params))
        return self._waiting().execute(sql, params)

    def among(self, sql: str, values: Sequence[Any]) -> Iterator[Any]:
        """The rows of ``sql``, a SELECT whose ``{marks}`` is an ``IN (...)`` list,
        for ``values`` - asked `IN_CHUNK` at a time (under both engines' limits on
        parameters)."""
        for start in range(0, len(values), IN_CHUNK):
            chunk = list(values[start : start + IN_CHUNK])
            yield from self.execute(sql.format(marks=",".join("?" * len(chunk))), chunk)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.flush()
        if self.dialect is Dialect.POSTGRESQL:
            with self._server(), self._connection.cursor() as cursor:
                cursor.executemany(_postgres_sql(sql), [tuple(r) for r in rows])
        else:
            self._waiting().executemany(sql, rows)

    def write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A statement whose result nobody reads.  Inside a transaction it is kept
        and sent with the others of the same text together (`flush`) before anything
        else runs on the connection and before the commit: on PostgreSQL a few
        microseconds a row instead of a statement's tens; on SQLite an INSERT's rows
        go as one multi-row statement - one step of the engine, and one hand-back of
        the interpreter lock, instead of one a row.  Each table sees its writes in
        the order of the calls (`_keep`).  An error in it surfaces there."""
        if self._depth:
            self._keep(sql, [tuple(params)])
        else:
            self.execute(sql, params)

    def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """`executemany`, kept like `write`."""
        if self._depth:
            self._keep(sql, [tuple(r) for r in rows])
        else:
            self.executemany(sql, rows)

    def forget_kept(self) -> None:
        """Drop the writes kept and not sent (a transaction that ends without them, or
        an operation that failed: its savepoint is rolled back next, `batch`)."""
        self._deferred = []

    def _keep(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Keep rows of ``sql`` for `flush`: with the rows of the same statement kept
        before - unless another statement on the same table was kept after those
        (then the rows start a group of their own at the end).  Writes to one table
        thus reach it in the order they were made (an attempt's UPDATE of a row never
        goes before the INSERT of that row another job of the batch made), while
        those to different tables are sent a table's group at a time."""
        table = _table_of(sql)
        for kept_sql, kept_rows in reversed(self._deferred):
            if kept_sql == sql:
                kept_rows.extend(rows)
                return
            if table is None or _table_of(kept_sql) in (table, None):
                break
        self._deferred.append((sql, rows))

    def flush(self) -> None:
        """Send the writes kept by `write` (in the order their groups were made:
        `_keep`).  The rows of one group go out as few statements as do the same
        (`_merged`; on SQLite `_sqlite_rows`), on PostgreSQL written with the
        server's own placeholders (psycopg then has nothing to parse)."""
        if not self._deferred:
            return
        if self.dialect is Dialect.SQLITE:
            self._flush_sqlite()
            return
        import psycopg

        deferred, self._deferred = self._deferred, []
        with (
            self._server(),
            self._connection.cursor() as cursor,
            psycopg.RawCursor(self._connection) as raw,
        ):
            for sql, rows in deferred:
                merged = _merged(sql, rows, self._merging) if len(rows) > 1 else None
                if merged is None:
                    cursor.executemany(_postgres_sql(sql), rows)
                    continue
                # An UPDATE or DELETE joined to its rows' VALUES is planned each time,
                # never prepared: a plan the server keeps (psycopg prepares a statement
                # from its fifth use) was made for the table's size then - a new table's
                # few rows, a hash join over a scan of every row - and kept as the
                # table grew (3 ms against 0.05 at 20,000 rows).  An INSERT's plan
                # does not depend on the table's size.
                prepare = None if _keyed(sql) is None else False
                for statement, params in merged:
                    raw.execute(statement, params, prepare=prepare)

    def _flush_sqlite(self) -> None:
        deferred, self._deferred = self._deferred, []
        for sql, rows in deferred:
            merged = _sqlite_rows(sql, rows)
            if not merged:
                self._connection.executemany(sql, rows)
            for statement, params in merged:
                self._connection.execute(statement, params)

    @contextlib.contextmanager
    def _server(self) -> Iterator[None]:
        """PostgreSQL: a connection the server dropped, or one a failure left in the
        middle of an exchange (`_left_mid_exchange`), is made again (between
        transactions: inside one, the transaction is lost and fails), and losing the
        server is a temporary `StorageError`."""
        import psycopg

        if not self._depth and not self._pipelining and _left_mid_exchange(self._connection):
            self._connection.close()  # (made again just below)
        if self._connection.closed and not self._depth:
            if self._reconnect is None:
                raise StorageError(f"{self.name}: the connection was closed", temporary=True)
            self._connection = self._reconnect()
        try:
            yield
        except psycopg.OperationalError as e:
            raise StorageError(f"{self.name}: {_first_line(e)}", temporary=True) from None

    def executescript(self, script: str) -> None:
        """Several statements, no parameters; inside a transaction, part of it (on
        SQLite too, whose own executescript would commit first)."""
        if self.dialect is Dialect.POSTGRESQL:
            self.flush()
            with self._server():
                self._connection.execute(script)
        elif self.in_transaction:
            self.flush()
            statement = ""
            for line in script.splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    self._connection.execute(statement)
                    statement = ""
            if statement.strip():  # the last one, without its semicolon
                self._connection.execute(statement)
        else:
            self._waiting().executescript(script)

    def create(self, schema: Schema) -> None:
        self.executescript(schema.for_dialect(self.dialect))

    def add_column(self, table: str, column: str, definition: str) -> None:
        """Add a column a later version needs to an existing table that lacks it
        (``table``, ``column`` and ``definition`` are the store's own constants)."""
        if self.dialect is Dialect.POSTGRESQL:
            self.execute(
                f"ALTER TABLE IF EXISTS {table} ADD COLUMN IF NOT EXISTS {column} {definition}"
            )
            return
        have = {r[1] for r in self.execute(f"PRAGMA table_info({table})")}
        if have and column not in have:
            self.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def compress_quickly(self, table: str, column: str) -> bool:
        """Have PostgreSQL compress this column's large values with lz4 instead of
        its default pglz (several times less of the server's CPU for message-sized
        text, about the same size) where the server has lz4 (version 14 on, built
        with it: Debian's and the PGDG packages are); True if it now does.  SQLite
        stores values as they come."""
        if self.dialect is not Dialect.POSTGRESQL:
            return False
        row = self.execute(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name='default_toast_compression'"
        ).fetchone()
        if not (row and row[0]):
            return False
        self.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")
        return True

    def claim_rows(self, alias: str) -> str:
        """To end a SELECT of rows the transaction takes for itself (a work queue):
        on PostgreSQL they are locked and rows another transaction holds are skipped
        (two nodes never take the same one); SQLite's single writer does the same."""
        if self.dialect is Dialect.POSTGRESQL:
            return f" FOR UPDATE OF {alias} SKIP LOCKED"
        return ""

    @property
    def lock_rows(self) -> str:
        """To end a SELECT whose rows the transaction goes on to update: PostgreSQL
        locks them (two transactions could otherwise both read, then both write);
        SQLite's BEGIN IMMEDIATE has already made the transaction the only writer."""
        return " FOR UPDATE" if self.dialect is Dialect.POSTGRESQL else ""

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One transaction; inside another, part of that one (a bare SQLite connection
        a caller began a transaction on counts too) - without a generator's frame: a
        batch's jobs each open one inside the batch's, several a record."""
        return _Nested(self) if self.in_transaction else self._outermost()

    @contextlib.contextmanager
    def _outermost(self) -> Iterator[None]:
        self._depth = 1
        try:
            if self.dialect is Dialect.POSTGRESQL:
                with self._begun():
                    yield
            else:
                self._begin_immediate()
                try:
                    yield
                    self.flush()
                    self._connection.execute("COMMIT")
                except BaseException:
                    self.forget_kept()
                    if self._connection.in_transaction:
                        self._connection.execute("ROLLBACK")
                    raise
        finally:
            self._depth = 0

    def _begin_immediate(self) -> None:
        """SQLite's BEGIN IMMEDIATE, waiting for another connection's write lock in
        steps of 0.2 ms growing to 2 ms, up to LOCK_TIMEOUT (then "database is
        locked").  SQLite's own wait sleeps 1, 2, 5, 10, 15, 20, 25 ms... in turn: a
        lock another process held for a millisecond or two (the webhook process's
        round) cost the queue's writer 5 ms on average, up to 25.

        SQLite's own wait stays off after it, through the transaction (its writes
        hold the lock) and the next ones, until a statement outside a transaction
        runs (`_waiting`): a store's thread writing batch after batch sends no
        PRAGMA between them (two statements, and two hand-backs of the interpreter
        lock, a transaction)."""
        connection = self._connection
        if not self._no_wait:
            connection.execute("PRAGMA busy_timeout=0")
            self._no_wait = True
        step, deadline = LOCK_STEP_FIRST, time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                busy = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(step)
            step = min(2 * step, LOCK_STEP_MOST)

    def _waiting(self) -> Any:
        """The SQLite connection, its own wait for locks (up to `LOCK_TIMEOUT`) on
        again for a statement outside a transaction: a read, or a write on its own."""
        if self._no_wait and not self.in_transaction:
            self._connection.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT * 1000)}")
            self._no_wait = False
        return self._connection

    @contextlib.contextmanager
    def _begun(self) -> Iterator[None]:
        """A PostgreSQL transaction on a live connection (see `_server`); the kept
        writes are sent before it commits, and dropped if it does not."""
        depth, self._depth = self._depth, 0
        self.forget_kept()
        with self._server():
            self._depth = depth
            try:
                with self._connection.transaction():
                    yield
                    self.flush()
            finally:
                self.forget_kept()

    def has_table(self, name: str) -> bool:
        if self.dialect is Dialect.POSTGRESQL:
            row = self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
            return bool(row[0])
        row = self.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)
        ).fetchone()
        return row is not None

    @property
    def in_transaction(self) -> bool:
        return bool(self._depth) or (
            self.dialect is Dialect.SQLITE and self._connection.in_transaction
        )

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        """PostgreSQL: send the statements without waiting for each answer (psycopg's
        pipeline mode; a statement whose result is read waits for it) - about half
        the client's CPU per statement.  An error may then surface at a later
        statement than the one that caused it: for batches that are re-run one by
        one when anything fails (`batch`, ``optimistic``)."""
        if self.dialect is not Dialect.POSTGRESQL or self._depth:
            yield
            return
        with self._server(), self._connection.pipeline():
            outer, self._pipelining = self._pipelining, True
            try:
                yield
            finally:
                self._pipelining = outer

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Kept upserts of one statement go out as one multi-row statement too - for a
        batch that is re-run operation by operation if anything fails (two rows with
        the same key in one upsert fail it)."""
        self._merging = True
        try:
            yield
        finally:
            self._merging = False

    def exclusive(self, name: str) -> None:
        """Make this transaction the only one holding ``name`` until it ends (on
        PostgreSQL an advisory lock: one node at a time does this work; SQLite's
        BEGIN IMMEDIATE already makes the transaction the only writer)."""
        if self.dialect is Dialect.POSTGRESQL:
            self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"sealgate:{name}",))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see one state of the store while writers go on (a read-only
        transaction: SQLite's WAL snapshot, PostgreSQL's REPEATABLE READ)."""
        if self.in_transaction:
            yield
            return
        self._depth = 1
        try:
            if self.dialect is Dialect.POSTGRESQL:
                with self._begun():
                    self._connection.execute(
                        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                    )
                    yield
            else:
                self._connection.execute("BEGIN")
                try:
                    yield
                    self.flush()  # (reads only, as a rule: then nothing)
                finally:
                    self.forget_kept()
                    self._connection.execute("COMMIT")
        finally:
            self._depth = 0

    def stream(self, sql: str, params: Sequence[Any] = (), size: int = 2000) -> Iterator[Any]:
        """The rows of a long result a few at a time (PostgreSQL: a server-side
        cursor, so millions of rows do not sit in memory; inside `snapshot` or
        `transaction`)."""
        if self.dialect is Dialect.SQLITE:
            yield from self.execute(sql, params)
            return
        self.flush()
        with self._connection.cursor(name=f"sealgate_stream_{next(_cursors)}") as cursor:
            cursor.itersize = size
            cursor.execute(_postgres_sql(sql), tuple(params))
            yield from cursor

    def json_text(self, column: str, key: str) -> str:
        """An expression for the text of ``key`` in the JSON object in ``column``."""
        if self.dialect is Dialect.POSTGRESQL:
            return f"({column}::jsonb ->> '{key}')"
        return f"json_extract({column}, '$.{key}')"


def _left_mid_exchange(connection: Any) -> bool:
    """Whether a PostgreSQL connection that should be between statements (no
    transaction or pipeline of ours open) is still in the middle of one: a failure
    psycopg could not unwind left it so.  The case seen: the server stopped under a
    pipelined batch; rolling its transaction back failed ("cannot exit pipeline mode
    while busy", logged by psycopg as "error ignored in rollback") and libpq stayed
    in pipeline mode, the pipeline aborted, a statement under way.  libpq then
    refuses every plain statement ("PQsendQuery not allowed in pipeline mode")
    without touching the socket, so the connection is never seen to be broken, and
    the store fails until it is made again (only a later pipelined batch, which
    reads the socket, used to find it dead)."""
    from psycopg import pq

    if connection.closed:
        return False
    pgconn = connection.pgconn
    return bool(
        pgconn.pipeline_status != pq.PipelineStatus.OFF
        or pgconn.transaction_status != pq.TransactionStatus.IDLE
    )


def _merged(
    sql: str, rows: list[tuple[Any, ...]], upserts: bool
) -> list[tuple[str, list[Any]]] | None:
    """Rows of one statement as few PostgreSQL statements (``$n`` placeholders, and
    their parameters) that do the same, or None where one statement a row stays:

    - an INSERT: many rows in one VALUES list; an upsert (ON CONFLICT) only with
      ``upserts`` (meeting its own key twice in one statement is an error, allowed
      only in a batch that is re-run one by one when anything fails);
    - an UPDATE or DELETE whose rows are named by their key (``WHERE a=? AND b=?``):
      one statement joined to the rows as a VALUES list - as long as no key comes
      twice (in one statement only one of its rows would take effect).  Only these
      need the columns' types (an INSERT's placeholders take the table's)."""
    shape = _insert_shape(sql, len(rows[0]), upserts)
    if shape is None:
        if _keyed(sql) is None:
            return None
        try:
            types = tuple(_pg_type(row[i] for row in rows) for i in range(len(rows[0])))
        except TypeError:  # a column of values of different kinds
            return None
        shape = _keyed_shape(sql, types)
        if len({row[-shape.keys :] for row in rows}) < len(rows):
            return None
    kept = shape.kept
    step = max(1, 30_000 // max(1, len(kept)))  # under the parameter limit
    return [
        (_statement(shape, len(chunk)), [row[i] for row in chunk for i in kept])
        for chunk in (rows[i : i + step] for i in range(0, len(rows), step))
    ]


# rows of one SQLite multi-row INSERT at most (a few sizes only: each is a statement
# the connection prepares once and keeps)
SQLITE_ROWS = (64, 32, 16, 8, 4, 2)


def _sqlite_rows(sql: str, rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """The kept rows of ``sql`` as SQLite statements that do the same, each with its
    parameters: an INSERT's (upserts too: SQLite applies a multi-row statement's rows
    one after the other, as it would separate statements) in multi-row statements of
    `SQLITE_ROWS` rows, the last one alone; nothing for other statements (their rows
    go to ``executemany`` as they are)."""
    shape = _insert_shape(sql, len(rows[0]), True) if len(rows) > 1 else None
    if shape is None:
        return []
    out: list[tuple[str, list[Any]]] = []
    start = 0
    for size in SQLITE_ROWS:
        while len(rows) - start >= size:
            chunk = rows[start : start + size]
            out.append((_sqlite_statement(shape, size), [v for row in chunk for v in row]))
            start += size
    if start < len(rows):
        out.append((sql, list(rows[start])))
    return out


@functools.lru_cache(maxsize=512)
def _sqlite_statement(shape: _Shape, rows: int) -> str:
    return shape.head + ",".join(["?".join(shape.row)] * rows) + shape.tail


@dataclass(frozen=True)
class _Shape:
    """A statement `_merged` can write for many rows: the text before and after its
    VALUES list, one row of it (the parts between the placeholders; ``first``: the
    first row's, which may name their types), the parameters sent (``kept``) and
    how many of the last name a row (``keys``; 0 for an INSERT)."""

    head: str
    row: tuple[str, ...]
    first: tuple[str, ...]
    tail: str
    kept: tuple[int, ...]
    keys: int


@functools.lru_cache(maxsize=512)
def _insert_shape(sql: str, columns: int, upserts: bool) -> _Shape | None:
    """How `_merged` writes an INSERT of a VALUES row for many rows (None: ``sql``
    is not one, or an upsert outside a re-runnable batch)."""
    values = _VALUES.search(sql)
    if values is None or ("ON CONFLICT" in sql and not upserts):
        return None
    head, tail = sql[: values.start(1)], sql[values.end(1) :]
    if "?" in head or "?" in tail:
        return None
    row = tuple(values.group(1).split("?"))
    return _Shape(head, row, row, tail, tuple(range(columns)), 0)


@functools.lru_cache(maxsize=512)
def _keyed(sql: str) -> tuple[str, str, str | None, str] | None:
    """An UPDATE or DELETE whose rows are named by their key: its verb, table,
    assignments (None for a DELETE) and condition."""
    if (update := _UPDATE.fullmatch(sql.strip())) is not None:
        table, assignments, where = update.groups()
        return "UPDATE", table, assignments, where
    if (delete := _DELETE.fullmatch(sql.strip())) is not None:
        table, where = delete.groups()
        return "DELETE", table, None, where
    return None


@functools.lru_cache(maxsize=512)
def _keyed_shape(sql: str, types: tuple[str | None, ...]) -> _Shape:
    """How `_merged` writes a `_keyed` statement for rows whose columns have these
    types: each ``?`` is the column of a VALUES list of the rows; the first row
    names the types (parameters alone would all be text there) and a column NULL
    in every row is the constant NULL."""
    keyed = _keyed(sql)
    assert keyed is not None
    verb, table, assignments, where = keyed
    kept = tuple(i for i, t in enumerate(types) if t is not None)
    numbers = iter(range(len(types)))

    def columns(text: str) -> str:
        def column(_: re.Match[str]) -> str:
            i = next(numbers)
            return "NULL" if types[i] is None else f"sealgate_rows.v{i}"

        return re.sub(r"\?", column, text)

    if assignments is not None:
        # the store's own statement, rewritten: no value in the text
        head = f"UPDATE {table} SET {columns(assignments)} FROM (VALUES "  # noqa: S608
    else:
        head = f"DELETE FROM {table} USING (VALUES "  # noqa: S608
    tail = f") AS sealgate_rows({', '.join(f'v{i}' for i in kept)}) WHERE {columns(where)}"
    row = ("(", *[","] * (len(kept) - 1), ")")
    first = ("(", *[f"::{types[i]}," for i in kept[:-1]], f"::{types[kept[-1]]})")
    return _Shape(head, row, first, tail, kept, where.count("?"))


@functools.lru_cache(maxsize=1024)
def _statement(shape: _Shape, rows: int) -> str:
    """`_shape`'s statement for this many rows, with ``$n`` placeholders."""
    numbers = itertools.count(1)
    listed = []
    for r in range(rows):
        parts = shape.first if r == 0 else shape.row
        listed.append(parts[0] + "".join(f"${next(numbers)}{p}" for p in parts[1:]))
    return shape.head + ",".join(listed) + shape.tail


def _pg_type(values: Iterator[Any]) -> str | None:
    """The PostgreSQL type for a column of these Python values (None: all NULL);
    TypeError for values of different kinds."""
    found = None
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kind = "boolean"
        elif isinstance(v, int):
            kind = "bigint"
        elif isinstance(v, float):
            kind = "double precision"
        elif isinstance(v, (bytes, bytearray, memoryview)):
            kind = "bytea"
        else:
            kind = "text"
        if found is None or found == kind:
            found = kind
        elif {found, kind} == {"bigint", "double precision"}:
            found = "double precision"  # integers beside floats: floats
        else:
            raise TypeError(f"{found} and {kind}")
    return found


_cursors = itertools.count()


class _Nested:
    """A transaction inside another (`Database.transaction`): part of that one."""

    __slots__ = ("db",)

    def __init__(self, db: Database):
        self.db = db

    def __enter__(self) -> None:
        self.db._depth += 1

    def __exit__(self, *exc: object) -> None:
        self.db._depth -= 1


Outcome = tuple[Any, BaseException | None]


def batch(
    db: Database,
    operations: list[Callable[[], Any]],
    optimistic: bool = False,
    around: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
) -> list[Outcome]:
    """Several operations in one transaction (group commit): each in a savepoint, so
    one that fails is undone alone and reports its exception.

    ``optimistic``: first all of them without savepoints (two statements fewer per
    operation; on PostgreSQL in pipeline mode, `Database.pipelined`); only if one
    fails is the transaction rolled back and the batch run again with savepoints.
    For operations that may safely run twice (they only write to this database).
    ``around``: a context entered inside that first transaction only (it is undone
    whole if anything fails)."""
    if len(operations) == 1:  # its own transaction is all the isolation it needs
        try:
            with db.transaction():
                return [(operations[0](), None)]
        except Exception as e:  # noqa: BLE001 - the caller gets it
            return [(None, e)]
    if optimistic:
        values: list[Any] = []
        try:
            with (
                db.pipelined(),
                db.merging(),
                db.transaction(),
                around() if around is not None else contextlib.nullcontext(),
            ):
                for operation in operations:
                    values.append(operation())
            return [(v, None) for v in values]
        except StorageError as e:
            if e.temporary:
                raise  # the server went away: nothing to try one by one
        except Exception:  # noqa: BLE001, S110 - rolled back: again, each alone
            pass
    results: list[Outcome] = []
    with db.transaction():
        for operation in operations:
            db.execute("SAVEPOINT operation")
            try:
                value = operation()
                db.flush()  # its kept writes fail here, if at all: its own error
                results.append((value, None))
            except Exception as e:  # the caller gets it, the others go on
                db.forget_kept()  # (its own: the operations before it were sent)
                db.execute("ROLLBACK TO SAVEPOINT operation")
                results.append((None, e))
            db.execute("RELEASE SAVEPOINT operation")
    return results


# what libpq says when the server is there but refuses us (a setting to fix)
_REFUSED = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "password",
    "SSL",
)


def connect_error(where: str, error: BaseException) -> StorageError:
    """A failed connection, said plainly: refused (fix a setting) or unreachable (try
    again later)."""
    reason = _first_line(error)
    if any(r in reason for r in _REFUSED):
        return StorageError(f"{where}: refused: {reason}")
    return StorageError(f"{where}: unreachable: {reason}", temporary=True)


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}@{host}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
