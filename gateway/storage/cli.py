"""``sealgate storage``: where state is kept, its schema versions, and migrations."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.storage.database import StorageError
from gateway.storage.stores import Storage, migrate_all, status


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    storage = sub.add_parser(
        "storage", help="where state is kept (storage.database): schema versions, migrations"
    )
    ssub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    st = with_config(ssub.add_parser("status", help="each store's schema version"))
    st.add_argument("--json", action="store_true")
    with_config(
        ssub.add_parser(
            "migrate", help="bring every store's tables up to this version (nodes may be running)"
        )
    )
    cp = with_config(
        ssub.add_parser(
            "copy",
            help="move this stopped node's state (SQLite) into an empty PostgreSQL database "
            "(and its archive content into object storage), then verify the archive there",
        )
    )
    cp.add_argument("--to", required=True, metavar="postgresql://USER@HOST:PORT/DB")
    cp.add_argument(
        "--blobs",
        metavar="s3://BUCKET/PREFIX",
        help="archive content there (storage.s3.* of this configuration); default: in the database",
    )
    cp.add_argument("--password-file", type=Path, help="default: storage.password_file")


def run(config: Config, args: argparse.Namespace) -> int:
    storage = Storage(config)
    where = config.storage.database if storage.shared else f"SQLite under {config.state_dir}"
    if args.storage_command == "copy":
        return _copy(config, args)
    if args.storage_command == "migrate":
        for schema, before, after in migrate_all(storage):
            change = "up to date" if before == after else f"{before} -> {after}"
            print(f"{schema:<14} {change}")
        print(f"{where}: migrated")
        return 0
    states = status(storage)
    if args.json:
        print(
            json.dumps(
                {
                    "database": where,
                    "schemas": [
                        {
                            "store": s.store,
                            "schema": s.schema,
                            "version": s.have,
                            "wanted": s.wanted,
                            "verdict": s.verdict,
                        }
                        for s in states
                    ],
                },
                indent=2,
            )
        )
    else:
        print(where)
        for s in states:
            print(f"  {s.schema:<14} version {s.have} (this Sealgate: {s.wanted})  {s.verdict}")
    return 0 if all(s.have == s.wanted for s in states) else 1


def _copy(config: Config, args: argparse.Namespace) -> int:
    from gateway.archive.service import open_archive
    from gateway.config import load_config_text
    from gateway.layout import StateLayout
    from gateway.statelock import StateLock
    from gateway.storage.copy import copy_state

    # the target's settings checked as if they were in the file
    probe = {"storage": {"database": args.to, "blobs": args.blobs or "database"}}
    load_config_text(json.dumps(probe), "--to/--blobs")
    if args.password_file is not None:
        storage = dataclasses.replace(config.storage, password_file=args.password_file)
        config = dataclasses.replace(config, storage=storage)
    lock = StateLock(StateLayout(config.state_dir).lock)
    lock.acquire()  # StateInUse: the node runs - it must be stopped to be copied
    try:
        target = copy_state(config, args.to, args.blobs, print)
    finally:
        lock.release()
    if not config.archive.enabled:
        return 0
    archive = open_archive(target, config.smtp.hostname or "localhost", create=False)
    try:
        report = archive.verify()
    finally:
        archive.index.close()
    if not report.ok:
        for p in report.problems[:20]:
            print(f"  {p.record_id}: {p.what}")
        print(f"the copied archive does NOT verify ({len(report.problems)} problems)")
        return 1
    print(
        f"copied archive verifies: {report.leaves} records, {report.checkpoints} checkpoints, "
        f"{report.disposed} purged under retention"
    )
    print(
        f"now set storage.database: {args.to}"
        + (f" and storage.blobs: {args.blobs}" if args.blobs else "")
    )
    return 0


def check(config: Config) -> list[str]:
    """What keeps this configuration's storage from working, one line each (for
    ``check-config``): the database unreachable or refusing, a schema too new or not
    migrated, the bucket missing or without Object Lock."""
    problems = []
    storage = Storage(config)
    if storage.shared:
        try:
            for s in status(storage):
                if s.have != s.wanted and not (s.have < s.wanted and config.storage.auto_migrate):
                    problems.append(f"storage.database: {s.schema} tables: {s.verdict}")
        except StorageError as e:
            problems.append(f"storage.database: {e}")
    if config.storage.blobs.startswith("s3://"):
        from gateway.storage.s3 import S3BlobStore

        try:
            S3BlobStore.from_config(config).check()
        except StorageError as e:
            problems.append(f"storage.blobs: {e}")
    return problems
