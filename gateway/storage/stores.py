"""stores - where each of Sealgate's stores lives, as configured (``storage.*``).

Embedded (``storage.database: sqlite``, the default): a SQLite file per store under
``state_dir`` (`gateway.layout`), the MTA-STS cache a JSON file.  Shared
(``storage.database: postgresql://...``): every store in one PostgreSQL database,
each in a schema of its own (``sealgate_queue``, ``sealgate_archive``, ...), so the
stores keep their table names and an administrator sees which table is whose.
"""

from __future__ import annotations

import socket
from pathlib import Path

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.layout import StateLayout
from gateway.storage.database import Database

STORES = ("queue", "keydir", "portal", "archive", "mta_sts")


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
            return Database.sqlite(path, synchronous=synchronous)
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
