"""The archive in the daemon: opening it as configured (keys made on first start),
and `ArchiveService`, which journals from the mail path without slowing it.

Completeness: the SMTP side answers 250 once the spool file is durable; the archive
journals the message from there.  Its spool file is removed only after the archived
copy is on disk (`Archive.make_durable` in the removal batch), and at start whatever
the spool holds that the archive lacks is journaled first (`recover`).  So a message
answered 250 is in the archive, or still in the spool and journaled at the next
start: nothing in between can lose it.

Every write runs on one thread, many per transaction (a `gateway.batching.Batcher`
over `Archive.batch`): the event loop hands a job over and goes on.  With the
embedded stores (SQLite) that thread also writes the queue state, in turn (the
daemon's ``stores`` thread: `gateway.app`); with a database server, the archive has
its own.  Only the spool-file removal waits: for every record of the message (its
journal, attempts, copies and accesses), and a record that fails is written again
every few seconds until it is in (`retry_failed`) - evidence is never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.addresses import check_envelope
from gateway.archive.journal import COPY_PREFIX, Archive, ArchiveError, Retention, RetentionRule
from gateway.archive.sealing import MasterKeys, SealError, key_of, open_sealed, seal
from gateway.archive.store import ArchiveIndex, BlobStore, FileBlobStore, SqlBlobStore
from gateway.batching import Batcher
from gateway.config import Config
from gateway.errors import ConfigError, SpoolError
from gateway.events import Event
from gateway.layout import StateLayout
from gateway.model import Envelope
from gateway.observability.logging import get_logger, write_private_file
from gateway.observability.metrics import Metrics
from gateway.spool import Spool
from gateway.spool.store import read_envelope
from gateway.storage.stores import Storage

log = get_logger("gateway.archive")

GENERATED_MASTER_KEY = "local-1"
RETRY_EVERY = 5.0  # seconds between writes of records that failed
# content registered as being written this long ago and still not in the log was
# left by a writer that stopped (a batch takes seconds; a retry registers anew)
UNFINISHED_AFTER = 3600.0
# Under load the archive's batches linger longer than the queue state's
# (`gateway.batching.LINGER`, 5 ms): nothing on the mail path waits for a record -
# the spool keeps the message until its records are written, and only a changed
# copy of a megabyte or more stays counted in ``delivery.copy_memory`` until then -
# and a commit costs little more for a hundred messages than for five (the last
# page of each of the index's twenty-odd B-trees written to the log again, a
# statement for each table, the thread's caches warmed again).  Measured on the
# relay (rounds in turn, medians, the main process's CPU a message over the
# archive off): at 150 msg/s +0.70 ms with 25 ms, +0.12 ms with 500 ms; at
# saturation (550 msg/s, where 25 ms gathered some 23 messages already) the same
# rate and about the same cost (a batch then holds a median of 560 records: some
# 280 messages' journals and attempts).  A stop does not wait the linger out
# (`Batcher.flush`).
LINGER = 0.5


def archive_dir(config: Config) -> Path:
    return StateLayout(config.state_dir).archive


def _read_master_key(path: Path, option: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {e.strerror}") from None
    if len(raw) == 32:
        return raw
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(option, f"{path} is not a 32-byte key (raw, or 64 hex digits)")
    return key


def master_keys(config: Config, create: bool) -> MasterKeys:
    """The configured master keys (the first is current), or the generated one."""
    ac = config.archive
    if ac.master_keys:
        keys: dict[str, bytes] = {}
        for n, mk in enumerate(ac.master_keys):
            option = f"archive.master_keys[{n}]"
            if mk.id in keys:
                raise ConfigError(option, f"key id {mk.id!r} appears twice")
            keys[mk.id] = _read_master_key(mk.file, option + ".file")
        return MasterKeys(ac.master_keys[0].id, keys)
    path = archive_dir(config) / "keys" / f"master-{GENERATED_MASTER_KEY}.key"
    if not path.exists():
        if not create:
            raise ConfigError("archive.master_keys", f"no master key: {path} does not exist")
        write_private_file(path, secrets.token_bytes(32))
        log.warning(Event.ARCHIVE_KEY_GENERATED, kind="master", path=str(path))
    return MasterKeys(GENERATED_MASTER_KEY, {GENERATED_MASTER_KEY: _read_master_key(path, "")})


def signing_key(config: Config, create: bool) -> ed25519.Ed25519PrivateKey:
    path = config.archive.signing_key_file
    option = "archive.signing_key_file"
    if path is None:
        path = archive_dir(config) / "keys" / "checkpoint-signing.pem"
        if not path.exists() and create:
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_private_file(path, pem)
            public_path(config).write_bytes(public_pem(key.public_key()))
            log.warning(Event.ARCHIVE_KEY_GENERATED, kind="checkpoint-signing", path=str(path))
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(option, f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ConfigError(option, f"{path} is not an Ed25519 key")
    return loaded


def public_path(config: Config) -> Path:
    return archive_dir(config) / "keys" / "checkpoint-signing.pub.pem"


def public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def origin_of(config: Config, hostname: str) -> str:
    origin = config.archive.origin or f"{hostname}/sealgate-archive"
    if any(c.isspace() for c in origin) or "+" in origin:
        raise ConfigError("archive.origin", f"{origin!r} must not contain spaces or '+'")
    return origin


def retention_of(config: Config) -> Retention:
    ac = config.archive
    return Retention(
        ac.retention_days,
        ac.retention_floor_days,
        tuple(
            RetentionRule(
                r.days,
                r.sender.lower() if r.sender else None,
                r.sender_domain.lower() if r.sender_domain else None,
                r.recipient_domain.lower() if r.recipient_domain else None,
                r.mode,
            )
            for r in ac.retention_rules
        ),
    )


def blob_store(config: Config, index: ArchiveIndex) -> BlobStore:
    """Where the archive's content goes (storage.blobs)."""
    where = config.storage.blobs
    if where == "files":
        return FileBlobStore(archive_dir(config) / "blobs")
    if where.startswith("s3://"):
        from gateway.storage.s3 import S3BlobStore

        return S3BlobStore.from_config(config)
    return SqlBlobStore(index.db)


KEY_CHECK = "key-check"


def _check_keys(index: ArchiveIndex, keys: MasterKeys, signer: ed25519.Ed25519PrivateKey) -> None:
    """Every node of a cluster writes one archive: it needs the archive's master keys
    and checkpoint signing key, not keys of its own (a node that made its own on
    first start would write records the others cannot open).  The archive keeps a
    sealed check value and the signing key's public half; a node whose keys do not
    match is refused with what to do."""
    public = public_pem(signer.public_key()).decode()
    stored_public = index.setting("signing_public_key")
    if stored_public is None:
        index.put_setting("signing_public_key", public)
    elif stored_public != public:
        raise ConfigError(
            "archive.signing_key_file",
            "this archive's checkpoints are signed with another key: give every node the "
            "same archive.signing_key_file (the key the first node made is in its "
            "state_dir/archive/keys/)",
        )
    check = index.setting(KEY_CHECK)
    if check is not None:
        sealed = base64.b64decode(check)
        try:
            open_sealed(sealed, KEY_CHECK, keys)
        except SealError:
            raise ConfigError(
                "archive.master_keys",
                "this archive was written with master keys this node does not have: give "
                "every node the same archive.master_keys (the key the first node made is in "
                "its state_dir/archive/keys/)",
            ) from None
        if key_of(sealed) == keys.current:
            return
    index.put_setting(KEY_CHECK, base64.b64encode(seal(b"sealgate", KEY_CHECK, keys)).decode())


def open_archive(config: Config, hostname: str, create: bool = True) -> Archive:
    """The archive at <state_dir>/archive, as configured.  ``create``: make the
    directory and keys when missing (the daemon); else ConfigError (the CLI)."""
    directory = archive_dir(config)
    storage = Storage(config)
    if not create and not storage.exists("archive"):
        raise ConfigError("archive", f"no archive at {directory} (has the gateway run?)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = master_keys(config, create)
    signer = signing_key(config, create)
    index = ArchiveIndex(storage.open("archive"), subjects=config.archive.index_subjects)
    try:
        # The log's name is fixed when it is made: checkpoints are signed under it.
        stored = index.setting("origin")
        origin = origin_of(config, hostname) if stored is None else stored
        if config.archive.origin is not None and config.archive.origin != origin:
            raise ConfigError(
                "archive.origin",
                f"this archive's log is named {origin!r}; its name cannot change",
            )
        if stored is None:
            index.put_setting("origin", origin)
        _check_keys(index, keys, signer)
        archive = Archive(
            blob_store(config, index), index, keys, origin, signer, origin, retention_of(config)
        )
        archive.enforce_floor()
    except ArchiveError as e:
        index.close()
        raise ConfigError("archive.retention_floor_days", str(e)) from None
    except BaseException:
        index.close()
        raise
    return archive


class ArchiveService:
    """Journals from the mail path on its thread (see the module)."""

    def __init__(
        self,
        archive: Archive,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        thread: ThreadPoolExecutor | None = None,
    ):
        """``thread``: the one thread to write on, when the caller shares it with the
        node's other local store (the queue state: `gateway.app`); else its own."""
        self.archive = archive
        archive.node = Storage(config).node_id  # the daemon's writes (the CLI's: "")
        self.spool = spool
        self.metrics = metrics
        self.interval = config.archive.checkpoint_interval
        self.subjects = config.archive.index_subjects
        self._own_thread = thread is None
        self._thread = thread or ThreadPoolExecutor(1, thread_name_prefix="archive")
        self._batcher = Batcher(self._thread, archive.batch, linger=LINGER)  # (under load)
        # per message: records being written, and records to write again
        self._pending: dict[str, set[asyncio.Future[Any]]] = {}
        self._failed: dict[str, list[Any]] = {}
        self._after: dict[str, Callable[[], None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._checkpointed = -1  # the log's size at the last checkpoint
        self._last_checkpoint = 0.0  # when (monotonic)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- lifecycle ------------------------------------------------------------------

    async def recover(self) -> set[str]:
        """Remove what this node left unfinished when it stopped, and journal every
        spooled message the archive lacks (a crash before its journal committed).
        Returns the ones that could not be journaled: their spool files must stay."""
        await self.sweep_unfinished(at_start=True)
        failed = set()
        recovered = 0
        spooled = await self._run(lambda: sorted(self.spool.queue_ids()))
        for queue_id in await self._run(self.archive.lacking_content, spooled):
            try:
                item = await self._run(read_envelope, self.spool.path_of(queue_id))
            except SpoolError:
                continue  # gone meanwhile, or unreadable: the queue finds it
            if not check_envelope(item).ok:
                continue  # a poison message: the queue journals it as it quarantines it
            job = self._journal_job(item, None)
            try:
                await self._batcher.run(job)
                recovered += 1
            except (OSError, SpoolError, ValueError, sqlite3.Error) as e:
                failed.add(item.queue_id)
                self._failed[item.queue_id] = [job]
                log.error(Event.ARCHIVE_ERROR, queue_id=item.queue_id, error=str(e)[:300])
        log.info(Event.ARCHIVE_RECOVERED, messages=recovered, failed=len(failed))
        return failed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._periodic())

    async def sweep_unfinished(self, at_start: bool = False) -> None:
        """Remove content whose write a stopped writer left unfinished (its record
        never committed): at start this node's own from before, then any node's
        registered more than `UNFINISHED_AFTER` ago."""
        node = self.archive.node if at_start else None
        removed, kept = await self._run(self.archive.sweep_unfinished, UNFINISHED_AFTER, node)
        if removed or kept:
            log.warning(Event.ARCHIVE_UNFINISHED, removed=removed, kept=kept)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._batcher.flush(lambda: None)  # what is queued is written
            await self.retry_failed()
            await self._checkpoint(now=True)
        except Exception as e:  # noqa: BLE001 - stopping: what failed stays in the spool
            log.error(Event.ARCHIVE_ERROR, error=str(e)[:300])
        if self._failed:
            log.error(Event.ARCHIVE_ERROR, unwritten_messages=len(self._failed))
        if self._own_thread:
            self._thread.shutdown(wait=True)
        self.archive.index.close()

    async def _periodic(self) -> None:
        """Records that failed are written again every `RETRY_EVERY` seconds; the
        checkpoint and the gauges follow ``archive.checkpoint_interval`` (the gauges
        at least every minute)."""
        gauges = 0.0
        while True:
            await asyncio.sleep(RETRY_EVERY)
            try:
                await self.retry_failed()
                if time.monotonic() - self._last_checkpoint >= self.interval:
                    await self._checkpoint()
                if time.monotonic() - gauges >= min(self.interval, 60.0):
                    gauges = time.monotonic()
                    await self.refresh_gauges()
                    await self.sweep_unfinished()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.error(Event.ARCHIVE_ERROR, error=str(e)[:300])

    async def _checkpoint(self, now: bool = False) -> None:
        """``now``: without waiting out the batches' linger (a stop)."""

        def job() -> int:
            size = self.archive.size()
            if size != self._checkpointed:
                self.archive.checkpoint()
            return size

        run = self._batcher.flush if now else self._batcher.run
        self._checkpointed = await run(job)
        self._last_checkpoint = time.monotonic()

    async def refresh_gauges(self) -> None:
        """Archive size, the last verification and the access counts (the command
        line writes them to the archive: they are read from there)."""
        await self._run(self._update_gauges)

    def _update_gauges(self) -> None:
        self.metrics.archive_bytes.set(self.archive.index.bytes_used())
        last = self.archive.setting("last_verify")
        if last:
            result = json.loads(last)
            self.metrics.archive_verify_time.set(result["at"])
            self.metrics.archive_verify_ok.set(1 if result["ok"] else 0)
            self.metrics.archive_verify_seconds.set(result["seconds"])
        counts = self.archive.access_counts()
        self.metrics.archive_searches.set(counts.get("search", 0))
        self.metrics.archive_exports.set(counts.get("export", 0))

    async def retry_failed(self) -> None:
        """Write again every record that failed (the disk was full, the database
        refused it), each message's in order; a message whose records are all
        written may lose its spool file now."""
        for queue_id, jobs in list(self._failed.items()):
            while jobs:
                try:
                    value = await self._batcher.run(jobs[0])
                except Exception as e:  # noqa: BLE001 - still failing: the next round
                    log.warning(Event.ARCHIVE_ERROR, queue_id=queue_id, error=str(e)[:300])
                    break
                done = jobs.pop(0)
                if isinstance(done, _Journal):
                    self._journaled(value)
            if not jobs:
                del self._failed[queue_id]
                self._maybe_after(queue_id)

    # -- the mail path ----------------------------------------------------------------

    def _journal_job(
        self, envelope: Envelope, data: bytes | None, checked: bool = True
    ) -> _Journal:
        return _Journal(self.archive, self.spool, envelope, data, self.subjects, checked)

    def journal(self, envelope: Envelope, data: bytes | None) -> None:
        """Journal a message that was just spooled (``data``: its bytes when at hand,
        else they are read from the spool)."""
        self._track(envelope.queue_id, self._journal_job(envelope, data))

    def ensure(self, envelope: Envelope, data: bytes) -> None:
        """Journal a message another node accepted, if the archive lacks it (that
        node stopped before its journal committed)."""
        job = self._journal_job(envelope, data, checked=False)  # the shared store's copy

        def journal_if_missing() -> Any:
            if self.archive.has_content(envelope.queue_id):
                return None
            return job()

        self._track(envelope.queue_id, journal_if_missing)

    def attempt(self, queue_id: str, recipients: list[dict[str, Any]]) -> None:
        """One attempt's outcome and evidence for some recipients."""
        self._track(queue_id, lambda: self.archive.journal_attempt(queue_id, recipients))

    def access(self, queue_id: str, actor: str, action: str, **detail: Any) -> None:
        """An access to a message from outside the archive (e.g. the portal)."""
        self._track(queue_id, lambda: self.archive.access(actor, action, queue_id, **detail))

    def copy(self, queue_id: str, data: bytes, digest: str) -> asyncio.Future[Any]:
        """A copy the gateway changed, as sent; done when it is written (or has
        failed, to be written again later).  ``digest``: its SHA-256 in hex (the
        caller took it for the copy's evidence)."""
        return self._track(queue_id, _Copy(self.archive, queue_id, data, COPY_PREFIX + digest))

    async def complete_attempts(self, queue_id: str, history: list[dict[str, Any]]) -> int:
        """Journal the attempts of ``history`` (from the queue state) that the
        archive has no record of, as one record; how many."""

        def missing() -> list[dict[str, Any]]:
            have = {
                (r.get("idx"), r.get("attempt"))
                for event in self.archive.events(queue_id, ("attempt",))
                for r in event["body"].get("recipients", [])
            }
            return [h for h in history if (h["idx"], h["attempt"]) not in have]

        lacking = await self._run(missing)
        if lacking:
            self.attempt(queue_id, lacking)
            log.warning(Event.ARCHIVE_RECOVERED, queue_id=queue_id, attempts=len(lacking))
        return len(lacking)

    def _track(self, queue_id: str, job: Any) -> asyncio.Future[Any]:
        """Write ``job``'s record in the next batch; if it fails, keep it to write again
        (`retry_failed`) - a message's records are never dropped."""
        future = self._batcher.submit(job)
        self._pending.setdefault(queue_id, set()).add(future)
        future.add_done_callback(lambda f: self._settle(queue_id, job, f))
        return future

    def _settle(self, queue_id: str, job: Any, future: asyncio.Future[Any]) -> None:
        pending = self._pending.get(queue_id)
        if pending is not None:
            pending.discard(future)
            if not pending:
                del self._pending[queue_id]
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._failed.setdefault(queue_id, []).append(job)
            self.metrics.archive_errors.inc()
            log.error(Event.ARCHIVE_ERROR, queue_id=queue_id, error=str(error)[:300])
            return
        if isinstance(job, _Journal):
            self._journaled(future.result())
        self._maybe_after(queue_id)

    def _journaled(self, size: int) -> None:
        self.metrics.archive_journaled.inc()
        self.metrics.archive_journaled_bytes.inc(size)

    async def written(self, queue_id: str) -> bool:
        """Wait for the records of this message being written; False when some of
        them failed (they are retried)."""
        pending = list(self._pending.get(queue_id, ()))
        if pending:
            await asyncio.wait([asyncio.shield(f) for f in pending])
        return queue_id not in self._failed

    async def attempted(self, queue_id: str) -> bool:
        """Whether the archive holds a record of a delivery attempt of this message
        (then a queue recorded it once)."""
        return bool(await self._run(self.archive.events, queue_id, ("attempt",)))

    async def settle(self) -> None:
        """Wait for the records issued so far being written (and what waited for
        them run: `when_archived`) - a stopping queue, before it closes its store."""
        with contextlib.suppress(Exception):  # a failed write is kept and retried
            await self._batcher.flush(lambda: None)

    def has_failed(self, queue_id: str) -> bool:
        """Some record of this message could not be written yet (it is retried)."""
        return queue_id in self._failed

    def when_archived(self, queue_id: str, action: Callable[[], None]) -> None:
        """Run ``action`` (a spool file's removal) once every record of this message
        issued so far is written: at once if they are, else when the last one is -
        after retries, if some failed.  Nobody waits meanwhile."""
        self._after[queue_id] = action
        self._maybe_after(queue_id)

    def _maybe_after(self, queue_id: str) -> None:
        if queue_id in self._pending or queue_id in self._failed:
            if queue_id in self._failed and queue_id in self._after:
                log.warning(Event.ARCHIVE_NOT_REMOVED, queue_id=queue_id)
            return
        action = self._after.pop(queue_id, None)
        if action is not None:
            action()

    def make_durable(self) -> None:
        """Before spool files go (in the removal thread): every committed record on
        disk."""
        self.archive.make_durable()


@dataclass(frozen=True)
class _Journal:
    """The job that journals one message (its success is what the journaled-message
    metrics count); run on the archive's thread, again after a failure."""

    archive: Archive
    spool: Spool
    envelope: Envelope
    data: bytes | None  # None: a large message, not kept in memory: read when run
    subjects: bool
    # the bytes are the ones the envelope's digest was taken of: read from the spool
    # (which checks them) or handed over by what did; not a shared store's copy
    checked: bool = True

    journals_message = True  # first in its batch (`Archive.batch`)

    def blob_names(self) -> tuple[str, ...]:
        return (f"msg-{self.envelope.queue_id}",)

    def __call__(self) -> int:
        body = self.data
        if body is None:
            body = self.spool.read(self.envelope.queue_id)[1]
        envelope = self.envelope.to_dict()
        # the passphrase's hash opens the portal copy: the archive needs it no more
        # than the notification does
        envelope.pop("portal_passphrase", None)
        digest = self.envelope.sha256 if self.checked else None
        # the spool's JSON of it, as it is - unless it holds the passphrase's hash
        text = None if self.envelope.portal_passphrase else self.envelope.spooled_json
        self.archive.journal_message(
            envelope, body, subject=self.subjects, data_sha256=digest, envelope_json=text
        )
        return len(body)


@dataclass(frozen=True)
class _Copy:
    """The job that journals a copy the gateway changed, as sent."""

    archive: Archive
    queue_id: str
    data: bytes
    name: str  # `copy_name`: its digest, taken once

    def blob_names(self) -> tuple[str, ...]:
        return (self.name,)

    def __call__(self) -> str:
        return self.archive.journal_copy(self.queue_id, self.data, self.name)
