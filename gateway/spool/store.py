"""spool - make accepted messages durable before the client hears "250".

Layout under ``<state_dir>/spool/`` (format: ``FORMAT.md`` beside this file):

    tmp/<id>      being written; never trusted, removed at start
    queue/<id>    complete: message bytes + envelope JSON + fixed-size footer
    corrupt/<id>  a queue file that failed validation, kept for inspection
    quarantine/<id>  a valid file whose envelope could not be processed (e.g. an
                  address no version of the SMTP listener should have accepted),
                  archived, bounced and kept for inspection
    free/<n>/<id> the file of a message that is done, its content overwritten with
                  zeros, kept for the writer process ``n`` to write its next
                  message into (`Recycler`); removed at start

Durability: a message is written to ``tmp/``, fsync'd, renamed into ``queue/`` and
the ``queue/`` directory is fsync'd.  Only then does `SpoolWriter.commit` return, and
only then does the SMTP layer answer 250.  A crash before the directory fsync loses
only a message that was never acknowledged; ``tmp/`` leftovers are removed on start.
Commits that end in the same turn of the event loop share one I/O job and one
directory fsync (group commit, `Spool.commit_io`).
A file in ``queue/`` is self-validating (magic footer, lengths, SHA-256 of the
message), so a torn or truncated file is never mistaken for a complete one.

File I/O runs in a dedicated thread pool.  Small messages stay in memory until
commit (one write, one fsync); large ones spill to the ``tmp/`` file as they arrive,
so memory per session stays bounded.  An SMTP worker commits small messages on its
event loop instead (`Spool.inline_commits`): a batch of them costs a few fsyncs
of a few KB each, less than handing it to a thread and back on a busy machine (on
the 2-core benchmark machine: about half the acceptance latency at 20 sessions, and
0.15-0.27 ms less of the workers' CPU per message; figures in the README).  A batch
holding a spilled (large) message goes to a thread, and so does every batch for
`INLINE_BACKOFF` seconds while the inline batches' smoothed time is above
`INLINE_STALL` (a slow disk, not one slow fsync): the other sessions are not held
up behind it.

Recycled files: a file's inode and blocks are reused instead of freed and allocated
again for the next message - as PostgreSQL recycles its WAL segments.  On this
project's benchmark machine (ext4) creating, fsyncing and unlinking a 4 KB file
cost 280-490 us of CPU, writing over a recycled one (same fsync) ~230 us; on a
journaling file system the fsync of a file whose blocks are already allocated also
commits less.  A done message's file is overwritten with zeros as it is recycled
(nothing of it can be read under ``free/``; the pages rarely reach the disk before
the next message overwrites them), only files up to `RECYCLE_SIZE` are kept, at
most `RECYCLE_KEEP` files and `RECYCLE_BYTES` per writer, none while the disk is
short of space.  The writers are the SMTP workers and the main process, which
writes Sealgate's own mail and the API's: each file goes back to the kind of
writer that wrote it (`Recycler`).  The pool should hold what the queue holds at a
busy time: when it runs dry, every further message is a new file - on the benchmark machine's ext4
(no journal: each new inode is checked against those deleted in the last minutes)
creating them was 12.6 % of all CPU samples of a relay run, about 1 ms a file.  One
daemon relaying 4 rounds of 3,000 x 4 KB (a backlog of ~2,000 at the peak) used
4.0-4.3 ms of machine CPU per message in its later rounds with 256 files per
writer, 3.5-3.6 ms with the pool as large as that.

Failure: every OS error becomes `SpoolError`; the temporary file is removed and the
SMTP layer answers 451 4.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.background import Background
from gateway.batching import run_each, settle
from gateway.canonical import canonical_text
from gateway.durable import fsync_dir, write_all
from gateway.errors import SpoolError
from gateway.model import Envelope

MAGIC = b"SEALGATE-SPOOL/1"
FOOTER_LEN = len(MAGIC) + 1 + 20 + 1 + 20 + 1
SPILL_THRESHOLD = 256 * 1024
# `Spool.inline_commits`: while the inline batches' smoothed time (each batch weighing
# `INLINE_WEIGHT`) is above this - a slow disk, not one slow fsync - the batches of the
# next `INLINE_BACKOFF` seconds go to a thread
INLINE_STALL = 0.02
INLINE_WEIGHT = 0.2
INLINE_BACKOFF = 2.0
# While other sessions of the process may commit soon (`Spool.siblings`), a commit
# within this long of the last batch's end waits until then, so that more share a
# batch and its directory fsync (PostgreSQL's commit_delay, with commit_siblings): a
# busy listener's 250s come up to this much later, a lone session's never wait.
COMMIT_LINGER = 0.002
RECYCLE_SIZE = 256 * 1024  # larger files are removed, not zero-filled for reuse
RECYCLE_KEEP = 4096  # recycled files kept for each writer process at most
RECYCLE_BYTES = 64 * 1024**2  # and their bytes
RECOUNT_EVERY = 128  # turns of a writer (a file recycled or refused) between counts of its pool
# how an envelope written canonical begins (`to_dict`'s keys sorted)
CANONICAL_START = b'{"client":'
WHOLE_READ = 1024 * 1024  # a spool file up to this size is read in one system call
RESCAN_AFTER = 0.5  # seconds before a writer whose free/ was empty looks again
_ZEROS = memoryview(bytes(RECYCLE_SIZE))  # what a recycled file is overwritten with
_UNDOING = Background()  # removals of messages given up, held until done

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: no words in queue ids
_QUEUE_ID = re.compile(f"[{_ALPHABET}]{{16}}")


def new_queue_id() -> str:
    """A 16-character id that sorts by arrival time (microseconds) and is unique."""
    n = (time.time_ns() // 1000) << 24 | secrets.randbits(24)
    chars = []
    for _ in range(16):
        n, r = divmod(n, len(_ALPHABET))
        chars.append(_ALPHABET[r])
    return "".join(reversed(chars))


def is_queue_id(text: str) -> bool:
    return _QUEUE_ID.fullmatch(text) is not None


def _footer(message_len: int, json_len: int) -> bytes:
    return MAGIC + b" %020d %020d\n" % (message_len, json_len)


@dataclass(frozen=True)
class RecoveryReport:
    recovered: int
    recovered_bytes: int
    incomplete_removed: int
    corrupt: tuple[str, ...]


class Spool:
    def __init__(self, root: Path, io_threads: int = 8):
        self.root = root
        self.tmp_dir = root / "tmp"
        self.queue_dir = root / "queue"
        self.corrupt_dir = root / "corrupt"
        self.quarantine_dir = root / "quarantine"
        self.free_dir = root / "free"
        self.recycler: Recycler | None = None  # the main process: files recycled
        self.reuse: Reuse | None = None  # a writer: recycled files written into
        self._io_threads = io_threads
        self._pool: ThreadPoolExecutor | None = None
        self.messages = 0
        self.bytes = 0
        self._count_lock = threading.Lock()  # removals may run in another thread
        # with a recycler (the main process): the messages it wrote itself - its own
        # mail and the API's - whose files go back to its own pool when they are done
        self._written: set[str] = set()
        # the batch being formed: each commit, its caller's future, whether it is small
        self._batch: list[tuple[Callable[[], object], asyncio.Future[object], bool]] = []
        # an SMTP worker's: batches of small commits run on the event loop
        self.inline_commits = False
        self._threaded_until = 0.0
        self._inline_time = 0.0  # the inline batches' smoothed time (`_submit_batch`)
        self._batch_ended = float("-inf")  # when the last batch of commits ended
        # how many others may commit soon (an SMTP worker: its other sessions); none:
        # commits never wait (`COMMIT_LINGER`)
        self.siblings: Callable[[], int] = lambda: 0

    # -- lifecycle ----------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Create the layout, drop unacknowledged leftovers, count what is queued.
        A file is checked by its footer here (torn or foreign files go to
        ``corrupt/``); its envelope is read when the message is (a queue of 100,000
        messages is counted in a second, not read three times over at start)."""
        for d in (self.root, self.tmp_dir, self.queue_dir, self.corrupt_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink()
            removed += 1
        if removed:
            fsync_dir(self.tmp_dir)
        _clear_free(self.free_dir)
        corrupt: list[str] = []
        count = total = 0
        with os.scandir(self.queue_dir) as entries:
            paths = sorted(e.path for e in entries if not e.name.startswith("."))
        for path in paths:
            try:
                size = _checked_size(path)
            except SpoolError:
                name = os.path.basename(path)
                os.replace(path, self.corrupt_dir / name)
                corrupt.append(name)
                continue
            count += 1
            total += size
        if corrupt:
            fsync_dir(self.queue_dir)
            fsync_dir(self.corrupt_dir)
        self.messages, self.bytes = count, total
        self.start_io()
        return RecoveryReport(count, total, removed, tuple(corrupt))

    def start_io(self) -> None:
        """Start the I/O threads without recovery (SMTP worker processes: the main
        process has recovered the spool already)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="spool-io")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def run_io(self, fn: Callable[..., object], *args: object) -> object:
        if self._pool is None:
            raise SpoolError("spool is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def commit_io(self, fn: Callable[[], object], small: bool = False) -> asyncio.Future[object]:
        """Run a commit step (write, fsync, rename into queue/) in an I/O thread -
        or, ``small`` (nothing spilled, one write) with `inline_commits`, on the
        event loop; the future is done once the queue directory has been fsynced
        after it.  The step runs even if the future is cancelled meanwhile.

        Group commit: the commits of one turn of the event loop run together in one
        I/O job, one after the other, followed by one fsync of the directory for all
        of them - one thread wake-up and one directory fsync per batch, not per
        message.  A commit that fails reports its own error; a failed directory fsync
        fails every commit of the batch (none of them is known to be durable)."""
        if self._pool is None:
            raise SpoolError("spool is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._batch.append((fn, future, small))
        if len(self._batch) == 1:
            wait = self._batch_ended + COMMIT_LINGER - time.monotonic()
            if wait > 0 and self.siblings() > 0:
                loop.call_later(wait, self._submit_batch, loop)
            else:
                loop.call_soon(self._submit_batch, loop)
        return future

    def _submit_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._batch = self._batch, []
        assert self._pool is not None
        inline = self.inline_commits and all(small for _, _, small in batch)
        if not (inline and time.monotonic() >= self._threaded_until):
            self._pool.submit(self._run_batch, batch, loop)
            return
        started = time.monotonic()
        self._run_batch(batch, None)
        ended = time.monotonic()
        # Smoothed: one fsync of 20-30 ms (another process's checkpoint, the disk's
        # hiccup) sent every batch of the next 10 s to a thread - and threaded
        # commits cost a worker about 0.3 ms of CPU a message more, taken from the
        # main process's deliveries (the relay 20 % slower until the backoff ended).
        self._inline_time += INLINE_WEIGHT * (ended - started - self._inline_time)
        if self._inline_time > INLINE_STALL:
            self._threaded_until = ended + INLINE_BACKOFF

    def _run_batch(
        self,
        batch: list[tuple[Callable[[], object], asyncio.Future[object], bool]],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """The batch's commits and the directory fsync; its callers are told on
        ``loop`` (None: run on the event loop, told at once)."""
        outcomes = run_each([fn for fn, _, _ in batch])
        if any(error is None for _, error in outcomes):
            try:
                # Durability: the renames above are on disk before anyone answers 250.
                fsync_dir(self.queue_dir)
            except OSError as e:
                outcomes = [(None, error or e) for _, error in outcomes]
        self._batch_ended = time.monotonic()
        settled = list(zip([f for _, f, _ in batch], outcomes, strict=True))
        if loop is None:
            settle(settled)
        else:
            loop.call_soon_threadsafe(settle, settled)

    def writer(self, queue_id: str) -> SpoolWriter:
        return SpoolWriter(self, queue_id)

    # -- reading (queue inspection, delivery) -----------------------------------

    def path_of(self, queue_id: str) -> Path:
        if not is_queue_id(queue_id):
            raise SpoolError(f"{queue_id!r} is not a queue id")
        return self.queue_dir / queue_id

    def queue_ids(self) -> list[str]:
        """The ids of the queued messages (their file names; nothing is read)."""
        if not self.queue_dir.is_dir():
            return []
        return [n for n in os.listdir(self.queue_dir) if not n.startswith(".")]

    def held(self, queue_ids: list[str]) -> set[str]:
        """Those of ``queue_ids`` whose file is in the queue directory."""
        return {q for q in queue_ids if os.path.exists(self.path_of(q))}

    def read(self, queue_id: str, verify: bool = True) -> tuple[Envelope, bytes]:
        return read_message(self.path_of(queue_id), verify=verify)

    def remove(self, queue_id: str, size: int | None = None) -> None:
        """Forget a message that is done (every recipient delivered or failed): its
        file recycled for a writer (`Recycler`), or removed."""
        path = self.path_of(queue_id)
        if size is None:
            try:
                size = read_envelope(path).size
            except SpoolError:
                size = 0
        own = self._forget_written(queue_id)
        with contextlib.suppress(FileNotFoundError):
            if self.recycler is None or not self.recycler.take(path, queue_id, own):
                os.unlink(path)
            with self._count_lock:
                self.messages = max(0, self.messages - 1)
                self.bytes = max(0, self.bytes - size)

    def quarantine(self, queue_id: str, size: int) -> None:
        """Move a message that cannot be processed out of the queue, durably (both
        directories fsynced): it is never read at start again."""
        self.quarantine_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            os.replace(self.path_of(queue_id), self.quarantine_dir / queue_id)
        except FileNotFoundError:
            return
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.queue_dir)
        self._forget_written(queue_id)
        with self._count_lock:
            self.messages = max(0, self.messages - 1)
            self.bytes = max(0, self.bytes - size)

    def free_space(self) -> int:
        """Bytes free for us on the spool's file system."""
        st = os.statvfs(self.queue_dir)
        return st.f_bavail * st.f_frsize

    def note_committed(self, size: int) -> None:
        """A message committed (by a worker, which said so, or here)."""
        with self._count_lock:
            self.messages += 1
            self.bytes += size

    def note_written(self, queue_id: str, size: int) -> None:
        """A message committed by this process's own writer."""
        self.note_committed(size)
        if self.recycler is not None:  # the main process: it recycles its own files
            with self._count_lock:
                self._written.add(queue_id)

    def _forget_written(self, queue_id: str) -> bool:
        """Whether this process wrote the message; forgotten from here on."""
        with self._count_lock:
            if queue_id not in self._written:
                return False
            self._written.discard(queue_id)
            return True


class SpoolWriter:
    """Receives one message's bytes in pieces and commits them durably."""

    def __init__(self, spool: Spool, queue_id: str):
        self.spool = spool
        self.queue_id = queue_id
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._sha = hashlib.sha256()
        self._fd: int | None = None  # the tmp/ file, once the message spills to disk
        self._written = 0  # bytes written into it
        self._reused = False  # a recycled file: what lies beyond the message is cut
        self._tmp_path = os.path.join(spool.tmp_dir, queue_id)
        self.failed: SpoolError | None = None
        self.message: bytes | None = None  # after commit: the bytes, unless they spilled

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes) -> None:
        if self.failed or not data:
            return
        self._sha.update(data)
        self._size += len(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= SPILL_THRESHOLD:
            chunk = b"".join(self._buffer)
            self._buffer, self._buffered = [], 0
            try:
                await self.spool.run_io(self._spill, chunk)
            except OSError as e:
                self.failed = SpoolError(f"cannot write {self._tmp_path}: {e.strerror or e}")
                await self.abort()

    def _open_tmp(self) -> int:
        reuse = self.spool.reuse
        if reuse is not None and (fd := reuse.open_as(self._tmp_path)) is not None:
            self._reused = True
            return fd
        return os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def _spill(self, chunk: bytes) -> None:
        if self._fd is None:
            self._fd = self._open_tmp()
        write_all(self._fd, chunk)
        self._written += len(chunk)

    async def commit(self, make_envelope: Callable[[int, str], Envelope]) -> Envelope:
        """Make the message durable; returns only when it will survive a crash."""
        if self.failed:
            raise self.failed
        envelope = make_envelope(self._size, self._sha.hexdigest())
        # canonical (keys sorted, no spaces): the archive journals these bytes as they
        # are (`Envelope.spooled_json`); as cheap to write as unsorted JSON
        meta = canonical_text(envelope.to_dict()).encode("utf-8", "surrogateescape") + b"\n"
        _keep_json(envelope, meta[:-1])  # as a read of the file would find it
        # The message itself, when it never spilled to disk: handed on to the queue,
        # which then need not read back what it was just given.
        self.message = b"".join(self._buffer) if self._fd is None else None
        # One buffer, one write: each system call in the I/O thread costs a GIL handoff.
        tail = (meta, _footer(self._size, len(meta)))
        blob = b"".join(
            (self.message, *tail) if self.message is not None else self._buffer + list(tail)
        )
        self._buffer = []
        # Returns after the directory fsync: the rename is on disk too.
        step = self.spool.commit_io(lambda: self._commit_sync(blob), small=self.message is not None)
        try:
            await asyncio.shield(step)
        except asyncio.CancelledError:
            # The caller is gone before its answer (a connection reset while the
            # commit ran): never acknowledged, so not kept - else it would wait in
            # queue/, announced to no one, until the next start delivered it.
            step.add_done_callback(self._abandoned)
            raise
        except OSError as e:
            await self.abort()
            raise SpoolError(f"cannot commit {self.queue_id}: {e.strerror or e}") from e
        self.spool.note_written(self.queue_id, self._size)
        return envelope

    def _abandoned(self, step: asyncio.Future[object]) -> None:
        """A commit whose caller was cancelled is through: its file goes again."""
        if step.cancelled() or step.exception() is not None:
            self.abort_soon()
        else:
            self.spool.note_written(self.queue_id, self._size)
            _UNDOING.run(self.spool.run_io(self.spool.remove, self.queue_id, self._size))

    def abort_soon(self) -> None:
        """`abort` from a caller that cannot wait for it (being cancelled itself)."""
        _UNDOING.run(self.abort())

    def _commit_sync(self, blob: bytes) -> None:
        fd = self._fd if self._fd is not None else self._open_tmp()
        self._fd = fd
        write_all(fd, blob)
        if self._reused:  # cut what the recycled file held beyond this message (zeros)
            os.ftruncate(fd, self._written + len(blob))
        # Durability: the data must be on disk before the name appears in queue/.
        os.fsync(fd)
        os.close(fd)
        self._fd = None
        os.rename(self._tmp_path, os.path.join(self.spool.queue_dir, self.queue_id))

    async def abort(self) -> None:
        """Forget this message: nothing of it stays on disk."""
        self._buffer = []
        # Best effort: tmp/ is also cleared at the next start.
        with contextlib.suppress(OSError, SpoolError):
            await self.spool.run_io(self._abort_sync)

    def _abort_sync(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp_path)


# -- the file format ----------------------------------------------------------------


def _checked_size(path: str) -> int:
    """The message size a file's footer gives, the footer checked (no envelope read:
    four system calls, for counting the queue at start)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return _footer_layout(fd, os.fstat(fd).st_size, Path(path))[0]
        finally:
            os.close(fd)
    except OSError as e:
        raise SpoolError(f"{os.path.basename(path)}: {e.strerror}") from e


def _footer_layout(fd: int, end: int, path: Path) -> tuple[int, int]:
    """`_layout` of the open file ``fd`` of ``end`` bytes, its footer read."""
    return _layout(os.pread(fd, FOOTER_LEN, max(0, end - FOOTER_LEN)), end, path)


def _layout(footer: bytes, end: int, path: Path) -> tuple[int, int]:
    """(message length, envelope length) from a file's footer (its last `FOOTER_LEN`
    bytes, or all of a shorter one) and size."""
    if end < FOOTER_LEN:
        raise SpoolError(f"{path.name}: too short to be a spool file")
    parts = footer.rstrip(b"\n").split(b" ")
    if (
        len(parts) != 3
        or parts[0] != MAGIC
        or not footer.endswith(b"\n")
        or not (parts[1].isdigit() and parts[2].isdigit())
    ):
        raise SpoolError(f"{path.name}: no valid spool footer (torn or foreign file)")
    message_len, json_len = int(parts[1]), int(parts[2])
    if message_len + json_len + FOOTER_LEN != end:
        raise SpoolError(f"{path.name}: lengths in the footer do not match the file size")
    return message_len, json_len


def _parse_envelope(raw: bytes, name: str) -> Envelope:
    try:
        envelope = Envelope.from_dict(json.loads(raw.decode("utf-8", "surrogateescape")))
    except (ValueError, KeyError, TypeError) as e:
        raise SpoolError(f"{name}: envelope is not valid: {e}") from e
    # written canonical (its keys sorted: "client" first; earlier versions wrote
    # "queue_id" first) and ASCII (bytes that are not UTF-8 cannot be journaled as
    # they are): kept for the archive
    if raw.startswith(CANONICAL_START):
        _keep_json(envelope, raw.removesuffix(b"\n"))
    return envelope


def _keep_json(envelope: Envelope, raw: bytes) -> None:
    """``raw``, the envelope's canonical JSON as spooled, kept with it when ASCII
    (`Envelope.spooled_json`: bytes that are not UTF-8 cannot be journaled as they
    are)."""
    if raw.isascii():
        object.__setattr__(envelope, "spooled_json", raw)


def handed_envelope(raw: bytes, queue_id: str, size: int) -> Envelope:
    """The envelope a worker process spooled, handed over as the canonical JSON it
    wrote (`SpoolWriter.commit`), checked as a spool file's envelope is against its
    name and size; `SpoolError` if it is not that."""
    envelope = _parse_envelope(raw, queue_id)
    if envelope.queue_id != queue_id or envelope.size != size or envelope.spooled_json is None:
        raise SpoolError(f"{queue_id}: the envelope handed over does not describe it")
    return envelope


def read_envelope(path: Path) -> Envelope:
    return _read(path, with_data=False)[0]


def read_message(path: Path, verify: bool = True) -> tuple[Envelope, bytes]:
    env, data = _read(path, with_data=True)
    if verify and hashlib.sha256(data).hexdigest() != env.sha256:
        raise SpoolError(f"{path.name}: message bytes do not match their SHA-256")
    return env, data


def _read(path: Path, with_data: bool) -> tuple[Envelope, bytes]:
    """A file's envelope and (``with_data``) message, checked against its footer and
    its name.  System calls, not a buffered file object: a file of up to
    `WHOLE_READ` bytes is read in one piece (open, fstat, one read, close - at every
    delivery's first attempt), a larger one in three."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpoolError(f"no message {path.name} in the spool") from None
    except OSError as e:
        raise SpoolError(f"{path.name}: {e.strerror}") from e
    try:
        end = os.fstat(fd).st_size
        if with_data and end <= WHOLE_READ:
            whole = _pread_exact(fd, end, 0, path)
            message_len, json_len = _layout(whole[-FOOTER_LEN:], end, path)
            data = whole[:message_len]
            raw = whole[message_len : message_len + json_len]
        else:
            message_len, json_len = _footer_layout(fd, end, path)
            data = _pread_exact(fd, message_len, 0, path) if with_data else b""
            raw = _pread_exact(fd, json_len, message_len, path)
    except OSError as e:
        raise SpoolError(f"{path.name}: {e.strerror}") from e
    finally:
        os.close(fd)
    env = _parse_envelope(raw, path.name)
    if env.size != message_len or env.queue_id != path.name:
        raise SpoolError(f"{path.name}: envelope does not describe this file")
    return env, data


def _pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    """``size`` bytes at ``offset`` (a regular file gives them in one read; a file cut
    short meanwhile is torn)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise SpoolError(f"{path.name}: shorter than its footer says (torn file)")
        data += more
    return data


def _clear_free(free_dir: Path) -> None:
    """Remove what a previous run left recycled (a file recycled just before a crash
    may not have been overwritten yet)."""
    if not free_dir.is_dir():
        return
    for entry in free_dir.iterdir():
        if entry.is_dir():
            for leftover in entry.iterdir():
                leftover.unlink()
        else:
            entry.unlink()


class Recycler:
    """The main process's side: done messages' files, overwritten with zeros, go to
    the writers' ``free/<n>/``, named ``<queue id>.<size>``: a file the main process
    wrote itself (its own mail, the API's) to its own pool (`own`), every other file
    to the SMTP workers' in turn.  Each writer's pool holds at most `RECYCLE_KEEP`
    files and `RECYCLE_BYTES`, and none is kept while the file system has less than
    twice ``keep_free`` bytes free (the spool's ``min_free_space``: the queue state
    and the archive need the room more).  What a writer took is counted again every
    `RECOUNT_EVERY` turns."""

    def __init__(self, free_dir: Path, workers: int, keep_free: int = 0):
        self.root = free_dir
        # ``workers`` SMTP worker processes, 0 .. workers - 1, then the main process;
        # with one worker or none the main process accepts the mail itself: pool 0
        self._workers = max(1, workers)
        self.own = workers if workers > 1 else 0
        self.dirs = [free_dir / str(n) for n in range(max(self._workers, self.own + 1))]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep_free = keep_free
        self._held = [0] * len(self.dirs)
        self._held_bytes = [0] * len(self.dirs)
        self._since_count = [RECOUNT_EVERY] * len(self.dirs)  # the first turn counts
        self._low_space = False
        self._next = 0
        self._lock = threading.Lock()

    def take(self, path: Path, name: str, own: bool = False) -> bool:
        """Recycle the file at ``path`` (``own``: written by the main process); False
        when it is not (too large, enough kept, the disk short of space): the caller
        removes it.  True once the file has left ``queue/``, even when overwriting it
        failed (it is removed then)."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size > RECYCLE_SIZE or (n := self._room(size, own)) is None:
                return False
            # Zeroed under free/ itself, where no writer looks, then handed to one: a
            # writer never takes a file still being overwritten.  (A crash meanwhile
            # leaves it in free/, removed at start.)
            staged = self.root / name
            try:
                os.rename(path, staged)  # out of queue/ from here on: gone, whatever follows
            except OSError:
                self._give_back(n, size)
                raise
            try:
                write_all(fd, _ZEROS[:size])
                os.rename(staged, self.dirs[n] / f"{name}.{size}")
            except OSError:  # (an I/O error) not recycled: removed instead
                self._give_back(n, size)
                with contextlib.suppress(OSError):  # else removed at the next start
                    os.unlink(staged)
        finally:
            os.close(fd)
        return True

    def _give_back(self, n: int, size: int) -> None:
        with self._lock:
            self._held[n] = max(0, self._held[n] - 1)
            self._held_bytes[n] = max(0, self._held_bytes[n] - size)

    def _room(self, size: int, own: bool) -> int | None:
        """The main process's pool (``own``) or the next worker's turn, if that pool
        has room for a file of ``size``."""
        with self._lock:
            if own:
                n = self.own
            else:
                n = self._next
                self._next = (n + 1) % self._workers
            # Counted per turn, not per file given: a pool found full is counted
            # again too (its writer keeps taking from it).
            self._since_count[n] += 1
            if self._since_count[n] > RECOUNT_EVERY:
                self._count(n)
                self._since_count[n] = 1
            if (
                self._low_space
                or self._held[n] >= RECYCLE_KEEP
                or self._held_bytes[n] + size > RECYCLE_BYTES
            ):
                return None
            self._held[n] += 1
            self._held_bytes[n] += size
            return n

    def _count(self, n: int) -> None:
        count = total = 0
        with os.scandir(self.dirs[n]) as entries:
            for entry in entries:
                count += 1
                _, _, size = entry.name.rpartition(".")
                total += int(size) if size.isdigit() else RECYCLE_SIZE
        self._held[n], self._held_bytes[n] = count, total
        if self.keep_free:
            st = os.statvfs(self.dirs[n])
            self._low_space = st.f_bavail * st.f_frsize < 2 * self.keep_free


class Reuse:
    """A writer's side: the recycled files of its ``free/<n>/``, each taken by a
    rename to the message's ``tmp/`` name (atomic: a file is written once)."""

    def __init__(self, free_dir: Path, writer: int):
        self.dir = free_dir / str(writer)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._names: list[str] = []
        self._looked = 0.0
        self._lock = threading.Lock()

    def open_as(self, path: str) -> int | None:
        """A recycled file renamed to ``path`` and opened for writing; None when
        there is none (the caller creates the file)."""
        while (name := self._next()) is not None:
            try:
                os.rename(os.path.join(self.dir, name), path)
            except FileNotFoundError:
                continue  # removed meanwhile (a restart's clearing)
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        return None

    def _next(self) -> str | None:
        with self._lock:
            if not self._names:
                now = time.monotonic()
                if now - self._looked < RESCAN_AFTER:
                    return None
                self._looked = now
                with os.scandir(self.dir) as entries:
                    self._names = [e.name for e in entries]
                if not self._names:
                    return None
                self._looked = 0.0  # found some: look again as soon as they are used
            return self._names.pop()
