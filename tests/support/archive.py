"""The archive of a running gateway, read as the command line reads it: through a
connection of its own.  The daemon's connection belongs to its archive thread; a
test that read through it from the event loop's thread would race that thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
