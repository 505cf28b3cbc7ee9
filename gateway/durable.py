"""durable - files that are whole on disk or not there at all.

Every file Sealgate writes that must survive a crash goes through here: spool files
(`gateway.spool.store`, which batches the directory fsync itself), archive blobs in
files (`gateway.archive.store.FileBlobStore`), keys and the generated certificate.
The steps: write everything (a short write is continued, never ignored), fsync the
file, rename it into place, fsync the directory.  A failure at any step (a full disk)
removes the temporary file and raises `OSError`; the name then holds what it held
before, never a truncated file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of ``data``: ``os.write`` may write less than it was given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` (names created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: Path, data: bytes, mode: int = 0o600, *, sync: bool = True, replace: bool = True
) -> None:
    """Put ``data`` at ``path`` whole, or raise and leave ``path`` as it was.

    ``sync``: fsync the file and the directory (False: the caller makes it durable
    later, e.g. for a batch).  ``replace``: an existing file is replaced (False:
    `FileExistsError`, and nothing is written - for secrets made once)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)  # durability: the bytes before the name
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name exists: never overwrites
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)
