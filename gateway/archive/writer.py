"""Who writes the archive: the daemon's records as operations, run by a writer.

`ArchiveService` (the mail path's side) issues each record as an operation - journal
a message, an attempt, an access, a copy, a checkpoint, a sweep - and a `Batcher`
hands those of one turn of the event loop to a writer as one batch, run as one
transaction (`Archive.batch`).  Two writers, by ``archive.writer``:

- `ProcessWriter` (``process``, the default): a process of its own
  (``python -m gateway.archive.writer``).  Sealing, SQL and their commit then take
  nothing from the main process's interpreter lock, which its event loop needs to
  deliver: measured on the relay, the archive's work was about 0.19 ms of the main
  process's CPU a message, in the thread that also writes the queue's state.  The
  main process's archive thread only pickles a batch, sends it and waits (the lock
  released) for the outcomes.
- `LocalWriter` (``thread``): the same batches on that thread, in the main process -
  one process fewer, for small sites and for tests that reach into the archive.

The two processes talk over a private socket pair, in frames (a 4-byte length, then
a pickle): the writer's first frame is its configuration and host name, then each
is a batch, answered by one ``(value, error)`` per operation.  Pickle is safe here:
both ends are the same program, and nobody else holds the socket.

If the writer process dies, the batch it held fails (its records are written again,
`ArchiveService.retry_failed`: a record the process had committed before it died is
then in the log twice - evidence is never lost, at worst repeated) and the next
batch starts another.  It dies with the main process (PR_SET_PDEATHSIG), and exits
when the socket closes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.archive.journal import Archive, ArchiveError
from gateway.batching import Outcome
from gateway.config import Config
from gateway.model import Envelope
from gateway.spool.store import read_message

HEADER = struct.Struct("!I")
START_TIMEOUT = 30.0  # seconds for a new writer process to open the archive


# -- operations -------------------------------------------------------------------------


class Operation(Protocol):
    def run(self, archive: Archive) -> Any: ...


@dataclass(frozen=True)
class Journal:
    """Journal one message (its success is what the journaled-message metrics count:
    the value is its size, or None when ``if_missing`` found it journaled already)."""

    envelope: Envelope
    data: bytes | None  # None: a large message, not kept in memory: read when run
    path: str  # its spool file, where ``data`` is read from when None
    subjects: bool
    if_missing: bool = False  # another node accepted it: only if the archive lacks it

    def blob_names(self) -> tuple[str, ...]:
        return (f"msg-{self.envelope.queue_id}",)

    def run(self, archive: Archive) -> int | None:
        if self.if_missing and archive.has_content(self.envelope.queue_id):
            return None
        body = self.data
        if body is None:
            body = read_message(Path(self.path))[1]
        envelope = self.envelope.to_dict()
        # the passphrase's hash opens the portal copy: the archive needs it no more
        # than the notification does
        envelope.pop("portal_passphrase", None)
        archive.journal_message(envelope, body, subject=self.subjects)
        return len(body)


@dataclass(frozen=True)
class Attempt:
    """One attempt's outcome and evidence for some recipients."""

    queue_id: str
    recipients: list[dict[str, Any]]

    def run(self, archive: Archive) -> str:
        return archive.journal_attempt(self.queue_id, self.recipients)


@dataclass(frozen=True)
class Access:
    """An access to a message from outside the archive (e.g. the portal)."""

    queue_id: str
    actor: str
    action: str
    detail: dict[str, Any] = field(default_factory=dict)

    def run(self, archive: Archive) -> str:
        return archive.access(self.actor, self.action, self.queue_id, **self.detail)


@dataclass(frozen=True)
class Copy:
    """A copy the gateway changed, as sent."""

    queue_id: str
    data: bytes
    name: str  # `copy_name`: its digest, taken once

    def blob_names(self) -> tuple[str, ...]:
        return (self.name,)

    def run(self, archive: Archive) -> str:
        return archive.journal_copy(self.queue_id, self.data, self.name)


@dataclass(frozen=True)
class Checkpoint:
    """Sign a checkpoint if the log grew since ``last`` (its size then); the size."""

    last: int

    def run(self, archive: Archive) -> int:
        size = archive.size()
        if size != self.last:
            archive.checkpoint()
        return size


@dataclass(frozen=True)
class Sweep:
    """Remove content a stopped writer left unfinished (`Archive.sweep_unfinished`)."""

    older_than: float
    node: str | None

    def run(self, archive: Archive) -> tuple[int, int]:
        return archive.sweep_unfinished(self.older_than, self.node)


@dataclass(frozen=True)
class Nothing:
    """Done when every operation issued before it is (a barrier)."""

    def run(self, archive: Archive) -> None:
        return None


class _Bound:
    """An operation as `Archive.batch` takes a job: called with no argument, and
    naming the content it will store."""

    __slots__ = ("archive", "op")

    def __init__(self, op: Operation, archive: Archive):
        self.op, self.archive = op, archive

    def blob_names(self) -> tuple[str, ...]:
        names = getattr(self.op, "blob_names", None)
        return names() if names is not None else ()

    def __call__(self) -> Any:
        return self.op.run(self.archive)


def run_batch(archive: Archive, ops: list[Operation]) -> list[Outcome]:
    return archive.batch([_Bound(op, archive) for op in ops])


# -- writers ----------------------------------------------------------------------------


class Writer(Protocol):
    def run_batch(self, ops: list[Operation]) -> list[Outcome]: ...
    def close(self) -> None: ...


class LocalWriter:
    """Runs each batch in this process (on the caller's thread)."""

    def __init__(self, archive: Archive):
        self.archive = archive

    def run_batch(self, ops: list[Operation]) -> list[Outcome]:
        return run_batch(self.archive, ops)

    def close(self) -> None:
        pass


class ProcessWriter:
    """Runs each batch in the writer process, started at the first batch and again
    after it died.  `run_batch` is called on one thread at a time (the archive's)."""

    def __init__(self, config: Config, hostname: str):
        self.config, self.hostname = config, hostname
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.started = 0  # processes started (for tests and curiosity)

    def start(self) -> None:
        """Start the process now (else the first batch does), and wait until it has
        opened the archive."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self.proc is not None and self.proc.poll() is None:
            return self._sock
        self._stop_process()
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "gateway.archive.writer", "--fd", str(theirs.fileno())]
        # our own interpreter and module; the configuration goes over the socket
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()])  # noqa: S603
        theirs.close()
        self.started += 1
        self._sock = ours
        try:
            ours.settimeout(START_TIMEOUT)
            _send(ours, (self.config, self.hostname))
            error = _receive(ours)  # None once the archive is open
            ours.settimeout(None)
        except (OSError, EOFError) as e:
            self._stop_process()
            raise ArchiveError(f"the archive's writer process did not start: {e}") from None
        if error is not None:
            self._stop_process()
            raise ArchiveError(f"the archive's writer process could not open it: {error}")
        return ours

    def run_batch(self, ops: list[Operation]) -> list[Outcome]:
        with self._lock:
            sock = self._ensure()
            try:
                _send(sock, ops)
                outcomes: list[Outcome] = _receive(sock)
            except (OSError, EOFError) as e:
                self._stop_process()
                raise ArchiveError(f"the archive's writer process stopped: {e}") from None
            return outcomes

    def close(self) -> None:
        with self._lock:
            self._stop_process(grace=10.0)

    def _stop_process(self, grace: float = 0.0) -> None:
        """Close the socket (the process exits when it reads its end) and reap it;
        after ``grace`` seconds, kill it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _send(sock: socket.socket, value: Any) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(HEADER.pack(len(payload)) + payload)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n
    return bytes(buffer)


def _receive(sock: socket.socket) -> Any:
    (size,) = HEADER.unpack(_receive_exactly(sock, HEADER.size))
    return pickle.loads(_receive_exactly(sock, size))  # noqa: S301 - our own process, a private socket


# -- the writer process -----------------------------------------------------------------


def _portable(outcomes: list[Outcome]) -> list[Outcome]:
    """Outcomes that pickle: an error that does not becomes an `ArchiveError` that
    names it."""
    portable: list[Outcome] = []
    for value, error in outcomes:
        if error is not None:
            try:
                pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
            except Exception:  # noqa: BLE001 - whatever it is, its text goes
                error = ArchiveError(f"{type(error).__name__}: {error}")
        portable.append((value, error))
    return portable


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def serve(sock: socket.socket) -> None:
    """Open the archive as the first frame says, then run batches until the socket
    closes."""
    from gateway.archive.service import open_archive
    from gateway.observability.logging import configure_logging
    from gateway.storage.stores import Storage

    config, hostname = _receive(sock)
    configure_logging(config.logging.level)
    try:
        archive = open_archive(config, hostname, create=False)
    except Exception as e:  # noqa: BLE001 - told to the main process, which says it
        _send(sock, str(e)[:500])
        return
    archive.node = Storage(config).node_id
    try:
        _send(sock, None)
        while True:
            try:
                ops = _receive(sock)
            except EOFError:
                return
            try:
                outcomes = run_batch(archive, ops)
            except Exception as e:  # noqa: BLE001 - the batch as a whole failed
                outcomes = [(None, e)] * len(ops)
            _send(sock, _portable(outcomes))
    finally:
        archive.index.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sealgate-archive-writer")
    p.add_argument("--fd", type=int, required=True, help="the socket to the main process")
    args = p.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process says when (Ctrl-C)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(socket.socket(fileno=args.fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
