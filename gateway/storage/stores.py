"""stores - where each of Sealgate's stores lives, as configured (``storage.*``).

Embedded (``storage.database: sqlite``, the default): a SQLite file per store under
``state_dir`` (`gateway.layout`), the MTA-STS cache a JSON file.  Shared
(``storage.database: postgresql://...``): every store in one PostgreSQL database,
each in a schema of its own (``sealgate_queue``, ``sealgate_archive``, ...), so the
stores keep their table names and an administrator sees which table is whose.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.layout import StateLayout
from gateway.storage.database import Database
from gateway.storage.migrations import Versioned, migrate, stored_version

STORES = ("queue", "keydir", "portal", "archive", "console", "mta_sts")
# The archive index's SQLite page, for an index made now: each commit writes the
# last page of each of its twenty-odd B-trees to the write-ahead log whole (and a
# checkpoint writes them again), so half the page is half those bytes - the
# journal of a message and its attempt record 7 % less CPU in the daemon's batches
# (bench/journal.py, 108.6 -> 99.2 us at 20 messages), its searches as fast
# (bench/archive.py, 300,000 records: 0.3 ms).  An index made before keeps its own.
ARCHIVE_PAGE_SIZE = 2048


class Storage:
    def __init__(self, config: Config):
        self.config = config
        self.layout = StateLayout(config.state_dir)

    @property
    def shared(self) -> bool:
        """The stores are in PostgreSQL (a cluster's, or one node's)."""
        return self.config.storage.database != "sqlite"

    @property
    def node_id(self) -> str:
        return self.config.cluster.node_id or socket.gethostname()

    def path(self, store: str) -> Path:
        """The SQLite file of ``store`` (embedded only)."""
        paths = {
            "queue": self.layout.queue_db,
            "keydir": self.layout.keydir_db,
            "portal": self.layout.portal_db,
            "console": self.layout.console_db,
            "archive": self.layout.archive / "index.db",
            "mta_sts": self.layout.mta_sts_cache,  # JSON (`gateway.probe.mta_sts`)
        }
        return paths[store]

    def exists(self, store: str) -> bool:
        """Whether ``store`` was made already (commands that read it say so if not)."""
        return self.shared or self.path(store).exists()

    def open(self, store: str, auto_migrate: bool | None = None) -> Database:
        """A new connection to ``store``.  ``auto_migrate``: whether its tables may be
        brought up to date now (default: storage.auto_migrate; SQLite: always)."""
        if store not in STORES or (store == "mta_sts" and not self.shared):
            raise ValueError(store)
        if not self.shared:
            path = self.path(store)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # NORMAL for stores whose durable truth is elsewhere or synced on demand:
            # the queue state (the spool) and the archive index (`make_durable`)
            synchronous = "NORMAL" if store in ("queue", "archive") else "FULL"
            page_size = ARCHIVE_PAGE_SIZE if store == "archive" else None
            return Database.sqlite(path, synchronous=synchronous, page_size=page_size)
        storage = self.config.storage
        if auto_migrate is None:
            auto_migrate = storage.auto_migrate
        return Database.postgresql(
            storage.database,
            self.password(),
            schema=f"sealgate_{store}",
            auto_migrate=auto_migrate,
        )

    def password(self) -> str | None:
        path = self.config.storage.password_file
        if path is None:
            return None  # libpq's own: PGPASSWORD, PGPASSFILE, ~/.pgpass
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("storage.password_file", f"cannot read {path}: {e}") from None


def schemas(store: str, config: Config) -> list[Versioned]:
    """The versioned tables kept in ``store``'s database."""
    from gateway.archive.store import BLOB_VERSIONED, INDEX_VERSIONED
    from gateway.console.store import VERSIONED as CONSOLE
    from gateway.crypto.keydir import VERSIONED as KEYDIR
    from gateway.portal.store import VERSIONED as PORTAL
    from gateway.probe.mta_sts import STS_VERSIONED
    from gateway.queue.store import VERSIONED as QUEUE

    return {
        "queue": [QUEUE],
        "keydir": [KEYDIR],
        "portal": [PORTAL],
        "console": [CONSOLE],
        "archive": [INDEX_VERSIONED]
        + ([BLOB_VERSIONED] if config.storage.blobs == "database" else []),
        "mta_sts": [STS_VERSIONED],
    }[store]


@dataclass(frozen=True)
class SchemaState:
    store: str  # the store's connection (queue, archive, ...)
    schema: str  # the tables' name in sealgate_schema
    have: int
    wanted: int

    @property
    def verdict(self) -> str:
        if self.have == self.wanted:
            return "up to date"
        if self.have > self.wanted:
            return "newer than this Sealgate knows: upgrade it"
        return (
            "needs 'sealgate storage migrate'"
            if self.have
            else "empty: needs 'sealgate storage migrate'"
        )


def stores_of(storage: Storage) -> tuple[str, ...]:
    """The stores this configuration keeps in databases."""
    return STORES if storage.shared else tuple(s for s in STORES if s != "mta_sts")


def status(storage: Storage) -> list[SchemaState]:
    """Each store's schema versions, without changing anything (StorageError: the
    database cannot be reached or used)."""
    found = []
    for store in stores_of(storage):
        if not storage.exists(store):
            continue
        db = storage.open(store, auto_migrate=False)
        try:
            for schema in schemas(store, storage.config):
                have = stored_version(db, schema.store)
                found.append(SchemaState(store, schema.store, have, schema.version))
        finally:
            db.close()
    return found


def migrate_all(storage: Storage) -> list[tuple[str, int, int]]:
    """Bring every store's tables up to this version: (schema, before, after) each."""
    done = []
    for store in stores_of(storage):
        db = storage.open(store, auto_migrate=True)
        try:
            for schema in schemas(store, storage.config):
                before, after = migrate(db, schema)
                done.append((schema.store, before, after))
        finally:
            db.close()
    return done
