"""statelock - one gateway per state directory.

Two daemons on one ``state_dir`` would both deliver its spool and its queue - every
message twice, and two writers in files that expect one.  The daemon (and `sealgate
storage copy`, which needs the node stopped) holds an exclusive ``flock`` on
``<state_dir>/sealgate.lock`` for as long as it runs; the file holds the holder's
process id, for the message the next one gets.  The kernel lets go of the lock when
the process ends, however it ends: nothing is left to clean up after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gateway.errors import SealgateError


class StateInUse(SealgateError):
    """Another process holds the state directory."""


class StateLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or StateInUse naming the process that does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateInUse(
                f"{self.path.parent} is in use by another sealgate (pid {holder}); "
                "two gateways on one state directory would deliver its mail twice"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor lets go of the lock
            self._fd = None
