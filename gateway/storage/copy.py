"""copy - move a stopped single node's state into the shared stores
(``sealgate storage copy --to postgresql://... [--blobs s3://...]``).

Every table of every store is copied row by row into the target's tables (made at
this version first; the target must be empty), the archive's content into the
target's blob store, the MTA-STS cache from its JSON file into its table, and the
content of every message still in the spool into the shared queue, so that any node
can deliver it.  The archive is then verified on the target - its old checkpoints
included: the same leaves in the same order give the same roots.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.storage.database import Database, Dialect
from gateway.storage.stores import STORES, Storage, migrate_all

BATCH = 1000
# tables a store keeps for itself: the schema's version, SQLite's own, the shadow
# tables of SQLite's full-text index (its rows are copied through ``subjects``)
_SKIP = ("sealgate_schema", "sqlite_")


def target_config(config: Config, to: str, blobs: str | None) -> Config:
    storage = dataclasses.replace(
        config.storage, database=to, blobs=blobs or "database", auto_migrate=True
    )
    return dataclasses.replace(config, storage=storage)


def copy_state(config: Config, to: str, blobs: str | None, say: Callable[[str], None]) -> Config:
    """Copy this node's state to ``to``; returns the configuration that uses it."""
    source = Storage(config)
    if source.shared:
        raise ConfigError("storage.database", "the state to copy is in SQLite (a single node)")
    target_cfg = target_config(config, to, blobs)
    target = Storage(target_cfg)
    migrate_all(target)
    for store in STORES:
        if store == "mta_sts":
            _copy_mta_sts(source, target, say)
            continue
        if not source.exists(store):
            continue
        src = source.open(store)
        dst = target.open(store)
        try:
            _refuse_nonempty(dst, store)
            if store == "archive" and "subjects" in _tables(src):  # subjects were indexed
                from gateway.archive.store import SUBJECTS

                dst.create(SUBJECTS[dst.dialect])
            for table in _tables(src):
                if store == "archive" and table == "blobs":
                    continue  # into the target's blob store, below
                n = _copy_table(src, dst, table)
                say(f"{store}.{table}: {n} rows")
            if store == "queue":
                say(f"queue: {_share_spooled(config, target, dst)} spooled messages shared")
        finally:
            src.close()
            dst.close()
    say(f"archive content: {_copy_blobs(config, target_cfg)} records")
    return target_cfg


def _tables(db: Database) -> list[str]:
    names = [
        r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY rowid")
    ]
    subjects_shadow = [n for n in names if n.startswith("subjects_")]
    return [n for n in names if not n.startswith(_SKIP) and n not in subjects_shadow]


def _columns(db: Database, table: str) -> list[str]:
    if db.dialect is Dialect.SQLITE:
        return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    rows = db.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
        (table,),
    )
    return [r[0] for r in rows]


def _refuse_nonempty(dst: Database, store: str) -> None:
    for table in ("messages", "keys", "items", "leaves"):
        if (
            dst.has_table(table)
            and dst.execute(
                f"SELECT 1 FROM {table} LIMIT 1"  # noqa: S608 - a fixed name
            ).fetchone()
        ):
            raise ConfigError(
                "storage.database",
                f"{dst.name}: the {store} store is not empty: copy into an empty database",
            )


def _copy_table(src: Database, dst: Database, table: str) -> int:
    wanted = set(_columns(dst, table))
    if not wanted:
        return 0  # a table this version no longer has
    columns = [c for c in _columns(src, table) if c in wanted]
    names = ", ".join(columns)
    marks = ",".join("?" * len(columns))
    count = 0
    with dst.transaction():
        if table == "log_head" or table == "changes":  # one row, made by the schema
            dst.execute(f"DELETE FROM {table}")  # noqa: S608 - names from the schemas
        rows = src.execute(f"SELECT {names} FROM {table}")  # noqa: S608
        while batch := rows.fetchmany(BATCH):
            dst.executemany(
                f"INSERT INTO {table} ({names}) VALUES ({marks})",  # noqa: S608
                [[bytes(v) if isinstance(v, memoryview) else v for v in r] for r in batch],
            )
            count += len(batch)
        if "id" in columns and count:  # an identity column: its sequence follows
            dst.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                f"(SELECT max(id) FROM {table}))"
            )
    return count


def _share_spooled(config: Config, target: Storage, dst: Database) -> int:
    """The content of every message in the spool into the shared queue, claimable
    by any node."""
    from gateway.errors import SpoolError
    from gateway.queue.store import QueueStore
    from gateway.spool import Spool

    spool = Spool(target.layout.spool)
    store = QueueStore(dst, target.node_id)
    shared = 0
    for queue_id in spool.queue_ids():
        try:
            envelope, data = spool.read(queue_id)
        except SpoolError:
            continue
        if store.share(envelope, data):
            shared += 1
    dst.execute("UPDATE messages SET node=? WHERE node IS NULL", (target.node_id,))
    return shared


def _copy_mta_sts(source: Storage, target: Storage, say: Callable[[str], None]) -> None:
    from gateway.probe.mta_sts import JsonStsStore, SqlStsStore

    policies = JsonStsStore(source.path("mta_sts")).load(time.time())
    store = SqlStsStore(target.open("mta_sts"))
    try:
        for domain, cached in policies.items():
            store.save(domain, cached)
    finally:
        store.close()
    say(f"mta_sts: {len(policies)} policies")


def _copy_blobs(config: Config, target_cfg: Config) -> int:
    from gateway.archive.service import blob_store
    from gateway.archive.store import ArchiveIndex

    source = Storage(config)
    if not source.exists("archive"):
        return 0
    src_index = ArchiveIndex(source.open("archive"))
    dst_index = ArchiveIndex(Storage(target_cfg).open("archive"))
    try:
        src: Any = blob_store(config, src_index)
        dst: Any = blob_store(target_cfg, dst_index)
        count = 0
        for name in list(src.names()):
            data = src.get(name)
            if data is not None:
                dst.put(name, data)
                count += 1
        return count
    finally:
        src_index.close()
        dst_index.close()
