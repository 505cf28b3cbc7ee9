"""The error hierarchy: every error Sealgate raises on purpose is a `SealgateError`.

- `ConfigError`: the configuration (or something it refers to) is wrong; nothing
  starts.  It names the key, the file and, where known, the line.
- `SpoolError`: the spool could not make a message durable; the client gets a 4xx
  and nothing half-written is left.
- each stage's own, defined beside the code that raises them: `FetchError`,
  `StsError` (probe); `CertificateError`, `SmimeError`, `PgpError`, `DkimError`,
  `SplitError`, `KeyUnusable`, `EncryptFailed` (crypto); `Poison` (queue);
  `ArchiveError`, `SealError`, `CheckpointError`, `ApiError` (archive).  Those that
  describe bad input are `ValueError`s too.

Expected outcomes of delivery (deferred, bounced) are values, not exceptions
(`gateway.delivery.results`).
"""

from __future__ import annotations


class SealgateError(Exception):
    """Base of every error raised on purpose by Sealgate."""


class ConfigError(SealgateError):
    """A configuration problem, located as precisely as possible."""

    def __init__(self, key: str, problem: str, source: str = "", line: int | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


class SpoolError(SealgateError):
    """The spool could not store or read a message."""
