"""queue manager - schedule deliveries, retry, expire and bounce, per recipient
(Postfix's qmgr): the scheduler, not the delivery agent.

The manager runs in the main process.  It learns of every message that comes in (at
start, by reconciling the spool with the state store; then from the way in,
`gateway.spool.submit`, with the message's bytes when they are at hand), and
repeatedly leases the recipients that are due, grouped by message and recipient
domain so that recipients who share a destination go in one SMTP transaction.
Each group goes to the delivery agent (`gateway.delivery.attempt`), which decides,
makes the copies and sends; what it reports is recorded here, every recipient's
result, decision and evidence in one state-store transaction, and handed to the
archive.

Deferred and held recipients get their next attempt from ``delivery.retry_schedule``
(with up to 10% jitter); past ``delivery.max_queue_lifetime`` they expire, whatever
kept them (an attempt that failed unexpectedly counts as deferred, 4.3.0).  When
every recipient of a message is final, failed ones are reported to the sender in one
DSN (never for a null sender), and the spool file is removed once the archive has
every record of the message.  A crash between the last result and that step is
repaired at start, and finishing that failed is retried every minute
(`QueueStore.unfinished`).  A spooled message whose envelope cannot be taken
(`Poison`) is quarantined.  Finished messages stay in the state store for
``delivery.history_retention`` (for ``sealgate queue show``), then go - not while
their spool file is still here (their archive records not all written: forgotten,
the file would be taken for a new message at the next start).  A spool file the
store does not know, received longer ago than any message may wait, is never
delivered (`_set_aside_forgotten`).

At-least-once: a result is recorded only after the remote server answered; a crash
in between means the recipient is tried again.  A result the state store refuses
(a full disk) is retried until written.  Concurrency is bounded in total
(``delivery.concurrency``) and per domain (``delivery.concurrency_per_destination``).

With a shared store (``storage.database``: PostgreSQL) this node records each
message with its content, reads what another node accepted from the store, renews
its heartbeat every third of ``cluster.lease_timeout`` and takes over silent nodes'
leases; with ``cluster.ack: shared`` the sender's 250 waits for the record
(`queued`).  While the store cannot be reached, claiming and recording pause and
messages acknowledged meanwhile are recorded when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import os
import random
import sqlite3
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from gateway import __version__
from gateway.addresses import EnvelopeProblems, check_envelope, printable_envelope
from gateway.archive.service import ArchiveService
from gateway.background import Background
from gateway.batching import Batcher, Job, run_each
from gateway.batching import Outcome as JobOutcome
from gateway.config import Config, config_digest
from gateway.delivery.dsn import ReportedRecipient, build_dsn, build_notice
from gateway.delivery.results import Attempted, AttemptEvidence, Deposited, RecipientResult
from gateway.errors import SealgateError, SpoolError
from gateway.events import Event
from gateway.model import Envelope, Purpose, RecipientState
from gateway.observability.logging import AddressRedactor, get_logger
from gateway.observability.metrics import Metrics
from gateway.policy.language import Policy
from gateway.queue.groupcommit import GroupCommit
from gateway.queue.places import (
    NEW_PLACES,
    NEW_QUICK,
    QUICK,
    QUICK_AGAIN,
    SLOW_PLACES,
    STALL,
    Place,
    Share,
    Total,
)
from gateway.queue.store import (
    AttemptRecord,
    QueueStore,
    RecipientRow,
    domain_of,
)
from gateway.smtp import parameters
from gateway.spool import Spool
from gateway.spool.store import read_envelope
from gateway.spool.submit import Submit
from gateway.storage.database import StorageError
from gateway.storage.stores import Storage
from gateway.webhooks.events import Events, Row

log = get_logger("gateway.queue")
T = TypeVar("T")

POLL_INTERVAL = 1.0  # also picks up `sealgate queue retry/hold/release/delete`
PRUNE_INTERVAL = 60.0
SETTLE = 300.0  # a cluster's unfinished messages: left to the node finishing them this long
# cluster.ack: local - a message still open this long after it was recorded has its
# content put into the shared store (one delivered sooner never goes there)
SHARE_AFTER = 10.0
# After an SMTP worker died: its messages spooled before then but never announced
# (`adopt_strays`) are looked for this long after, once the other workers' lines of
# that moment have surely arrived.
STRAY_GRACE = 2.0
DURABLE_EVERY = 0.05  # seconds between archive syncs before spool files are removed
# Messages read at arrival wait here for their first attempt (no second read); the
# spool file stays the durable copy.
CACHE_MESSAGE_MAX = 256 * 1024
CACHE_TOTAL_MAX = 64 * 1024 * 1024
FEATURES_MAX = 10_000  # messages whose features are kept between their recipients' attempts
RECORD_RETRY_FIRST, RECORD_RETRY_MAX = 0.5, 30.0  # seconds between writes of results
UNREACHABLE = "4.4.1"  # no host of the destination could be reached (`deliver`)
# what is known of a destination without attempts (quick or slow, its window, a
# suspension that ended) is forgotten after this long: a gateway that has mailed
# hundreds of thousands of domains keeps only the recent ones (Postfix's queue manager
# forgets a destination when its queue empties)
FORGET_AFTER = 600.0


@dataclasses.dataclass
class _Open:
    """A message read for the attempts under way, and how many of them use it."""

    read: asyncio.Future[tuple[Envelope, bytes]]
    users: int = 0


@dataclasses.dataclass(frozen=True)
class _Suspension:
    """A destination none of whose hosts could be reached: its recipients wait until
    ``until`` without an attempt each, as Postfix's queue manager treats a dead site
    (`QueueManager._suspend`)."""

    until: float
    times: int  # waits in a row, less one
    diagnostic: str


class Agent(Protocol):
    """Carries out one attempt (`gateway.delivery.attempt.DeliveryAgent`)."""

    policy: Policy

    def apply(self, config: Config, policy: Policy | None = None) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def forget(self, queue_id: str) -> None: ...

    async def attempt(
        self, envelope: Envelope, data: bytes, domain: str, rows: list[Any]
    ) -> list[Attempted]: ...


# a node silent this long counts as gone for good (decommissioned), not as missing
SILENT_FOR = 7 * 86400
DELAY_SCAN_INTERVAL = 5.0  # how often messages are looked at for delivery.delay_warning


def _wants(envelope: Envelope, row: RecipientRow, event: str) -> bool:
    """Whether the sender asked to hear of this recipient's ``event`` (RFC 3461
    NOTIFY; without it, of failures and delays)."""
    return parameters.wants(_options(envelope, row.idx), event)


def _options(envelope: Envelope, idx: int) -> tuple[str, ...]:
    return envelope.recipients[idx].options if idx < len(envelope.recipients) else ()


def _reported(
    envelope: Envelope,
    row: RecipientRow,
    action: str,
    status: str,
    diagnostic: str,
    remote: str | None = None,
) -> ReportedRecipient:
    """A recipient as a report shows it, with the ORCPT its sender gave."""
    orcpt = parameters.option(_options(envelope, row.idx), "ORCPT")
    if orcpt is not None:
        kind, _, address = orcpt.partition(";")
        orcpt = f"{kind};{parameters.xtext_decode(address)}"
    return ReportedRecipient(row.address, status, diagnostic, remote, action=action, original=orcpt)


def _delayed_status(status: str) -> str:
    """A waiting recipient's status for a delay report: its last temporary status
    (never one of success or failure: RFC 3464 2.3.4), else 4.0.0."""
    return status if status.startswith("4.") else "4.0.0"


class QueueManager:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        redact: AddressRedactor,
        hostname: str,
        submit: Submit,
        agent: Agent,
        archive: ArchiveService | None = None,
        thread: ThreadPoolExecutor | None = None,
    ):
        # thread: the one thread to use the queue state from, when the caller shares
        # it with the node's other local store (the archive: `gateway.app`)
        self.config = config
        self.spool = spool
        self.archive = archive
        self.metrics = metrics
        self.redact = redact
        self.hostname = hostname
        self.submit = submit  # the way in for the DSNs it writes (`gateway.spool.submit`)
        self.agent = agent  # carries out attempts (`gateway.delivery.attempt`)
        # webhook events, written with the states they report (`gateway.webhooks`);
        # ``events_written`` wakes the dispatcher
        self.webhooks = Events(())
        self.events_written: Callable[[], None] = lambda: None
        dc = config.delivery
        # (a thread given is shut down by its owner)
        self._db_thread, self._own_thread = (
            thread or ThreadPoolExecutor(1, thread_name_prefix="queue-db"),
            thread is None,
        )
        # Removing a finished message's file can wait behind the file system journal
        # (the SMTP side renames and fsyncs in the same directory): never in the
        # database thread, which every attempt needs.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="spool-remove")
        self._removals = Batcher(self._remover, self._remove_batch)
        self._removed_all = False
        self._finishing: set[str] = set()  # messages being finished right now
        self._oldest: float | None = None  # arrival of the oldest unfinished message
        metrics.queue_oldest_age.set_function(
            lambda: 0.0 if self._oldest is None else max(0.0, time.time() - self._oldest)
        )
        self.store: QueueStore | None = None
        # with a shared store (storage.database: PostgreSQL): this node's id
        self.node: str | None = None
        # cluster.ack: local - messages recorded without their content, and when
        # (`SHARE_AFTER`); cluster.ack: shared puts it there before the 250
        self._unshared_since: dict[str, float] = {}
        self._commits: GroupCommit
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._enqueues = Background()  # enqueues, reports and drops under way
        self._enqueuing: set[str] = set()  # queue ids being recorded just now
        self._adopted: set[str] = set()  # strays recorded by `adopt_strays`
        # slow destinations share a quarter of the places (and borrow what the
        # others leave idle of three quarters once none of theirs has waited for
        # a place for `LEND_AFTER`), new ones another quarter
        # (`gateway.queue.places`): quick ones keep half at least
        self._slow_share = Share(dc.concurrency // 4)
        self._new_share = Share(dc.concurrency // 4)
        self._total = Total(dc.concurrency, slow=self._slow_share)
        # a slow destination's window: attempts at once, raised by deliveries
        self._slow_each: dict[str, Share] = defaultdict(lambda: Share(self._slow_start))
        self._new_each: dict[str, Share] = defaultdict(lambda: Share(NEW_PLACES))
        self._stalled = 0  # attempts running past `STALL`, holding no place
        metrics.delivery_stalled.set_function(lambda: self._stalled)
        self._quick: set[str] = set()  # destinations whose last attempt was quick
        self._slow: set[str] = set()  # destinations whose last attempt was not
        self._started: Counter[str] = Counter()  # attempts waiting or under way, by domain
        self._idle_since: dict[str, float] = {}  # destinations without attempts, since when
        self._swept = time.monotonic()
        self._per_domain: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(dc.concurrency_per_destination)
        )
        self._suspended: dict[str, _Suspension] = {}  # recipient domain -> until when
        metrics.destinations_suspended.set_function(
            lambda: sum(s.until > time.time() for s in self._suspended.values())
        )
        # acknowledged here, not recorded yet: the shared store could not be reached
        self._unrecorded: dict[str, int] = {}  # queue id -> size
        self._cache: OrderedDict[str, tuple[Envelope, bytes]] = OrderedDict()
        self._cached_bytes = 0
        self._handed_bytes = 0  # bytes handed over with messages not recorded yet
        self._open: dict[str, _Open] = {}  # messages read for the attempts under way
        self._rng = random.Random()  # noqa: S311 - retry jitter, not security

    def apply(self, config: Config, policy: Policy | None = None) -> None:
        """SIGHUP: the delivery settings and the policy (`DeliveryAgent.apply`, which
        raises `ConfigError` before anything changes), then the retry schedule and
        queue lifetime for every attempt that follows."""
        self.agent.apply(config, policy)
        self.config = config

    def _remove_batch(self, jobs: list[Job]) -> list[JobOutcome]:
        """In the removal thread: the archived copies on disk first (one sync for
        the batch), then the spool files go.  With the archive, a batch takes at
        least `DURABLE_EVERY`: removals gather meanwhile, so the archive syncs a few
        times a second, not once per message (files wait a little longer)."""
        if self.archive is None:
            return run_each(jobs)
        started = time.monotonic()
        self.archive.make_durable()
        outcomes = run_each(jobs)
        time.sleep(max(0.0, DURABLE_EVERY - (time.monotonic() - started)))
        return outcomes

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        storage = Storage(self.config)
        self.node = storage.node_id if storage.shared else None
        self.store = await self._db(lambda: QueueStore(storage.open("queue"), self.node))
        self._commits = GroupCommit(self.store, self._db_thread)
        await self.agent.start()
        await self._db(self.store.release_leases)
        if self.node is not None:
            await self._db(self.store.joined)
            self.metrics.cluster_unshared.set_function(lambda: self._unshared)
            # recorded by an earlier run that stopped before it shared them
            for queue_id in await self._db(self.store.unshared_here):
                self._unshared_since[queue_id] = 0.0
        # before anything is removed: the archive journals what it lacks
        keep = await self.archive.recover() if self.archive is not None else set()
        added, poison, leftover, forgotten = await self._db(self._reconcile, keep)
        poison.update(await self._set_aside_forgotten(forgotten))
        for queue_id, reason in poison.items():
            await self._quarantine(queue_id, reason)
        if self.node is not None and self.archive is not None:
            await self._archive_left_copies()  # (before the leftovers' files go)
        await self._complete_evidence(leftover)
        unfinished = await self._finish_unfinished()
        log.info(
            Event.QUEUE_STARTED,
            reconciled=added,
            finished=unfinished,
            quarantined=len(poison),
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _finish_unfinished(self) -> int:
        """Finish messages whose recipients are all final but which were not finished:
        a crash came in between (at start), or finishing failed (e.g. the DSN could
        not be spooled: retried every `PRUNE_INTERVAL`).  Returns how many."""
        assert self.store is not None
        finished = 0
        # with several nodes, only messages settled for a while: the node that made
        # the last recipient final is finishing it (one DSN, not one per node)
        settled = time.time() - (SETTLE if self.node is not None else 0)
        for queue_id in await self._db(self.store.unfinished, settled):
            message = await self._db(self.store.message, queue_id)
            if queue_id in self._finishing or (message or {}).get("done"):
                continue  # its attempt is finishing it, or has just done so
            finished += 1
            try:
                envelope, data = await self._read(queue_id)
            except SpoolError:  # removed already: only the state store lagged
                await self._db(self.store.finish, queue_id, False)
                continue
            rows = await self._db(self.store.recipients, queue_id)
            try:
                await self._finish(envelope, data, rows, recovering=True)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.error(
                    Event.DELIVERY_ERROR,
                    queue_id=queue_id,
                    error_type=type(e).__name__,
                    error=str(e)[:300],
                )
        return finished

    def _reconcile(
        self, keep: set[str]
    ) -> tuple[int, dict[str, str], list[Envelope], list[Envelope]]:
        """Add spooled messages the store does not know (a crash before `enqueue`).
        Returns how many were added; the messages that cannot be (to be quarantined,
        with why: one bad file never keeps the gateway from starting); the done
        messages whose spool file is still here (a stop or crash before the removal,
        or archive records that were not written): removed once the archive has
        every record (`_complete_evidence`), unless the archive could not journal
        the message itself (``keep``); and the unknown ones received longer ago than
        a message can wait (`_set_aside_forgotten`)."""
        assert self.store is not None
        known, added = self.store.known(), 0
        poison: dict[str, str] = {}
        leftover: list[Envelope] = []
        forgotten: list[Envelope] = []
        delivery = self.config.delivery
        too_old = time.time() - max(delivery.max_queue_lifetime, delivery.history_retention)
        # only the files the store does not know, or knows as done, are read
        for queue_id in sorted(self.spool.queue_ids()):
            done = known.get(queue_id)
            if done is False:
                continue
            try:
                item = read_envelope(self.spool.path_of(queue_id))
            except SpoolError:
                continue  # a file gone meanwhile, or unreadable: found when it is read
            if done is None and _received_before(item, too_old):
                forgotten.append(item)
            elif done is None:
                try:
                    added += self._add_checked(item, lease=False)
                except Exception as e:  # noqa: BLE001 - whatever it is, that message alone
                    poison[item.queue_id] = _why(e)
            elif done and item.queue_id not in keep:
                leftover.append(item)
        return added, poison, leftover, forgotten

    async def _set_aside_forgotten(self, forgotten: list[Envelope]) -> dict[str, str]:
        """Spool files the store does not know, of messages received longer ago than
        ``delivery.max_queue_lifetime`` and ``delivery.history_retention``: none of
        them can be waiting still.  One the archive has attempt records of was
        finished, and its history forgotten since (its file outlived it: another
        node finished it while this one was down, or its removal failed) - moved
        to ``spool/quarantine/``, never delivered again, without a bounce.  The
        others were never recorded (a crash before `enqueue`, found this late):
        returned as poison, to be bounced as expired."""
        expired: dict[str, str] = {}
        for envelope in forgotten:
            queue_id = envelope.queue_id
            if self.archive is None or not await self.archive.attempted(queue_id):
                expired[queue_id] = (
                    "found at start long after it was received (past "
                    "delivery.max_queue_lifetime) and never recorded: not delivered"
                )
                continue
            try:
                await self._db(self.spool.quarantine, queue_id, envelope.size)
            except OSError as e:
                log.error(Event.SPOOL_WRITE_FAILED, queue_id=queue_id, error=str(e)[:300])
                continue
            self.metrics.quarantined.inc()
            log.warning(
                Event.QUEUE_FORGOTTEN_SET_ASIDE,
                queue_id=queue_id,
                received_at=envelope.received_at,
                reason="finished long ago, its queue history forgotten: not delivered again",
            )
        return expired

    async def _complete_evidence(self, leftover: list[Envelope]) -> None:
        """At start, done messages whose spool files outlived them: journal the
        attempts the archive lacks from the queue state (their records were lost with
        the process that could not write them), then remove the files and any shared
        copy left (`_remove`) - those whose records still cannot be written stay until
        they are."""
        assert self.store is not None
        for envelope in leftover:
            queue_id = envelope.queue_id
            if self.archive is not None:
                history = await self._db(self.store.attempt_history, queue_id)
                await self.archive.complete_attempts(queue_id, history)
                if not await self.archive.written(queue_id):
                    self.archive.when_archived(queue_id, functools.partial(self._remove, envelope))
                    continue
            self._remove(envelope)

    def _add_checked(
        self, envelope: Envelope, lease: bool, data: bytes | None = None, fresh: bool = False
    ) -> bool:
        """In the database thread: record a spooled message, if its envelope passes
        the listener's checks (`Poison` if not); with ``cluster.ack: shared`` its
        content too (read from the spool when not given) - with ``local`` it goes
        there later (`_share_open`)."""
        assert self.store is not None
        problems = check_envelope(envelope)
        if not problems.ok:
            raise Poison(problems)
        if self._shares_at_once and data is None:
            envelope, data = self.spool.read(envelope.queue_id)
        shared = data if self._shares_at_once else None
        added = self.store.add(envelope, lease=lease, data=shared, fresh=fresh)
        if added and (events := self.webhooks.accepted(envelope)):
            self.store.add_events(events, time.time(), first=True)  # in the same transaction
        return added

    async def stop(self, grace: float = 10.0) -> None:
        # A flag, not Task.cancel(): asyncio.wait_for in Python 3.11 can swallow a
        # cancellation that coincides with the event it waits for.
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except TimeoutError:
                self._task.cancel()
                await asyncio.wait([self._task], timeout=grace)
        if self._attempts:
            _, pending = await asyncio.wait(self._attempts, timeout=grace)
            for t in pending:
                t.cancel()  # not recorded: tried again after restart
            if pending:  # they unwind (their sessions let go) before the agent closes
                await asyncio.wait(pending, timeout=grace)
        # what is under way in the background finishes - messages being recorded
        # (their attempts do not start now), the archive's records of those done and
        # then their spool files and shared copies, reports: none writes to a store
        # or the archive after it closed
        await self._enqueues.settle(grace)
        if self.archive is not None:  # (not stuck behind an archive that hangs)
            await asyncio.wait([asyncio.ensure_future(self.archive.settle())], timeout=grace)
            await self._enqueues.settle(grace)
        await self.agent.close()
        await asyncio.sleep(0)  # a removal scheduled for the end of the turn starts
        self._removed_all = True  # later ones (the archive catching up) wait for a start
        self._remover.shutdown(wait=True)  # the removals waiting are done first
        if self.store is not None:
            await self._db(self.store.close)
        if self._own_thread:
            self._db_thread.shutdown(wait=True)

    def submitted(self, envelope: Envelope, data: bytes | None) -> Awaitable[None] | None:
        """`gateway.spool.submit` made a message durable in this process: queue it,
        with its bytes when they were kept in memory (no read back).  With
        ``cluster.ack: shared`` the sender is answered when this is done."""
        return self.queued(envelope.queue_id, envelope, data=data)

    def queued(
        self,
        queue_id: str,
        envelope: Envelope | None = None,
        size: int | None = None,
        data: bytes | None = None,
    ) -> Awaitable[None] | None:
        """A message was spooled (here, or by a worker process): queue it in the
        background - or, with ``cluster.ack: shared``, return what the
        acknowledgement waits for (it fails if the shared store cannot record it)."""
        acknowledging = self.config.cluster.ack == "shared"
        if data is not None and self._handed_bytes + len(data) > CACHE_TOTAL_MAX:
            data = None  # falling behind: not held in memory meanwhile, read when recorded
        held = len(data) if data is not None else 0
        self._handed_bytes += held
        task = self._enqueues.run(
            self.enqueue(queue_id, envelope, size, data, acknowledging=acknowledging)
        )
        if held:

            def release(_: object) -> None:
                self._handed_bytes -= held

            task.add_done_callback(release)
        return task if acknowledging else None

    @property
    def handed_bytes(self) -> int:
        """The bytes of messages handed over with them and not recorded yet: held in
        memory, at most `CACHE_TOTAL_MAX` (beyond it they are read when recorded)."""
        return self._handed_bytes

    def _spawn(self, work: Awaitable[None]) -> None:
        self._enqueues.run(work)

    async def enqueue(
        self,
        queue_id: str,
        envelope: Envelope | None = None,
        size: int | None = None,
        data: bytes | None = None,
        acknowledging: bool = False,
        fresh: bool = True,
    ) -> None:
        """A message was spooled: record its recipients and try them now.  Without the
        envelope (a worker process spooled it), it is read back from the spool, and so
        are its bytes when they were not handed over and are small enough to be kept
        for the first attempt.

        When there is room for more attempts, the recipients are leased as they are
        recorded and their attempts start here, without a trip through `_run`."""
        assert self.store is not None
        lease = not self._stopping and self._quick_started < self.config.delivery.concurrency
        # a worker's late line about a message adopted meanwhile: looked up, not added
        fresh = fresh and queue_id not in self._adopted
        self._enqueuing.add(queue_id)
        try:
            recorded, data, added, lease = await self._commits.run(
                lambda: self._add(queue_id, envelope, size, data, lease, fresh)
            )
        except SpoolError as e:
            log.error(Event.SPOOL_CORRUPT, queue_id=queue_id, error=str(e))
            return
        except StorageError as e:  # the shared store went away: recorded when it is back
            if not e.temporary or acknowledging:
                raise  # (not acknowledged: the sender tries again)
            self.metrics.storage_errors.inc()
            self._unrecorded[queue_id] = size if size is not None else 0
            log.error(Event.QUEUE_STORE_FAILED, queue_id=queue_id, error=str(e)[:200])
            return
        except Exception as e:  # noqa: BLE001 - a message we cannot take: set aside
            await self._quarantine(queue_id, _why(e))
            return
        finally:
            self._enqueuing.discard(queue_id)
        if data is not None:
            self._cache_put(recorded, data)
        if added and self.webhooks:
            self.events_written()  # committed now: the dispatcher can see them
        if added and self.node is not None and not self._shares_at_once:
            self._unshared_since[queue_id] = time.monotonic()
        if added and self.archive is not None:
            self.archive.journal(recorded, data)
        if lease and added:
            now = time.time()
            self._start(
                [
                    RecipientRow(
                        queue_id,
                        idx,
                        r.address,
                        domain_of(r.address),
                        RecipientState.PENDING,
                        0,
                        now,
                        "",
                        "",
                    )
                    for idx, r in enumerate(recorded.recipients)
                ]
            )
        else:
            self._wake.set()

    def _add(
        self,
        queue_id: str,
        envelope: Envelope | None,
        size: int | None,
        data: bytes | None,
        lease: bool,
        fresh: bool = True,
    ) -> tuple[Envelope, bytes | None, bool, bool]:
        """In the database thread: record the message's recipients, reading what was
        not handed over (the bytes when small enough to be kept for the first attempt,
        or always with ``cluster.ack: shared``: they go to the shared store now), leased
        when ``lease`` and none of their destinations is busy (then returned True).
        ``fresh``: the store has never seen it (not a retry)."""
        assert self.store is not None
        size = envelope.size if envelope is not None else size
        if data is None or envelope is None:  # not all handed over: read the rest
            if self._shares_at_once or (size is not None and size <= CACHE_MESSAGE_MAX):
                envelope, data = self.spool.read(queue_id)
            elif envelope is None:
                envelope = read_envelope(self.spool.path_of(queue_id))
        # (a quick destination's attempts queue for its places here: bounded by the
        # quick ones' total above, they cost no claim - the relay's path)
        lease = lease and not any(
            self._busy(domain)
            for r in envelope.recipients
            if (domain := domain_of(r.address)) not in self._quick
        )
        added = self._add_checked(envelope, lease, data, fresh)
        return envelope, data, added, lease

    def _cache_put(self, envelope: Envelope, data: bytes) -> None:
        self._cache[envelope.queue_id] = (envelope, data)
        self._cached_bytes += len(data)
        while self._cached_bytes > CACHE_TOTAL_MAX and self._cache:
            _, (_, old) = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def _forget(self, queue_id: str) -> None:
        self.agent.forget(queue_id)
        cached = self._cache.pop(queue_id, None)
        if cached is not None:
            self._cached_bytes -= len(cached[1])

    # -- scheduling -----------------------------------------------------------------

    async def _run(self) -> None:
        """Claim and start attempts, keep the gauges, prune; with several nodes also
        renew this node's heartbeat and take over silent nodes' leases.  A store that
        cannot be reached pauses all of it (nothing is guessed) until it is back."""
        self._last = dict.fromkeys(("depth", "prune", "beat", "delay"), 0.0)
        while not self._stopping:
            # cleared before the round, not after it: an attempt that ends while the
            # round waits for the store (its claims, its gauges) wakes the next one
            # at once - cleared after, that wake-up was lost and the recipients left
            # for claims went 20 (one destination's room) a POLL_INTERVAL
            self._wake.clear()
            try:
                await self._round()
            except StorageError as e:
                if not e.temporary:
                    raise
                self.metrics.storage_errors.inc()
                log.error(Event.QUEUE_STORE_FAILED, error=str(e)[:200], retry=POLL_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

    async def _round(self) -> None:
        assert self.store is not None
        last = self._last
        now = time.time()
        if self.node is not None and now - last["beat"] >= self.config.cluster.lease_timeout / 3:
            await self._beat(now)
            last["beat"] = now
        if self._unrecorded:
            await self._record_unrecorded()
        if self._unshared_since:
            await self._share_open(time.monotonic() - SHARE_AFTER)
        # Claim no more than can start soon: the rest stay in the database - and
        # nothing for a destination with attempts enough waiting or under way.
        room = 2 * self.config.delivery.concurrency - self._quick_attempts
        busy = [domain for domain in self._started if self._busy(domain)]
        due = await self._db(self.store.claim, now, room, busy, self._room_for) if room > 0 else []
        self._start(due)
        if now - last["depth"] >= POLL_INTERVAL:
            last["depth"] = now
            for state, count in (await self._db(self.store.depth)).items():
                self.metrics.queue_recipients.labels(state).set(count)
            self._oldest = await self._db(self.store.oldest_open)
        if now - last["delay"] >= DELAY_SCAN_INTERVAL:
            last["delay"] = now
            await self._warn_delayed(now)
        if now - last["prune"] >= PRUNE_INTERVAL:
            last["prune"] = now
            await self._finish_unfinished()
            before = now - self.config.delivery.history_retention
            # a message whose file is still here (its archive records not all
            # written) is kept: forgotten, the next start would deliver it again
            await self._db(self.store.prune, before, self.spool.held)
            if self.node is not None:
                await self._remove_finished_elsewhere()

    async def _warn_delayed(self, now: float) -> None:
        """Tell the senders of messages waiting ``delivery.delay_warning`` which of
        their recipients are still being tried and until when - once per message
        (taken in the store first: with several nodes, one of them sends it; a
        crash in between loses the warning rather than sending it twice)."""
        assert self.store is not None
        delivery = self.config.delivery
        if delivery.delay_warning >= delivery.max_queue_lifetime:
            return
        for queue_id in await self._db(self.store.delayed, now - delivery.delay_warning):
            if not await self._db(self.store.warn, queue_id):
                continue
            try:
                envelope, data = await self._read(queue_id)
            except SpoolError:
                continue  # its content is gone: it will be set aside when next tried
            if not envelope.mail_from:
                continue  # no reports to the null sender
            waiting = [
                r
                for r in await self._db(self.store.recipients, queue_id)
                if not r.state.final and _wants(envelope, r, "DELAY")
            ]
            if not waiting:
                continue  # NOTIFY said not to
            arrival = datetime.datetime.fromisoformat(envelope.received_at)
            await self._send_report(
                envelope,
                data,
                [
                    _reported(envelope, r, "delayed", _delayed_status(r.status), r.diagnostic)
                    for r in waiting
                ],
                "delayed",
                retry_until=arrival + datetime.timedelta(seconds=delivery.max_queue_lifetime),
            )

    async def _beat(self, now: float) -> None:
        """This node is alive; nodes silent for ``cluster.lease_timeout`` lose their
        leases (their recipients are claimed by whichever node asks next: the bytes
        come from the shared store)."""
        assert self.store is not None
        info = {
            "version": __version__,
            "attempts": len(self._attempts),
            "config": config_digest(self.config),
            "policy": self.agent.policy.stamp,
            "unshared": self._unshared,
        }
        await self._db(self.store.heartbeat, info, now)
        timeout = self.config.cluster.lease_timeout
        beats = await self._db(self.store.heartbeats)
        self.metrics.cluster_nodes.labels("alive").set(sum(now - b <= timeout for b in beats))
        self.metrics.cluster_nodes.labels("silent").set(
            sum(timeout < now - b <= SILENT_FOR for b in beats)
        )
        freed = await self._db(self.store.take_over, timeout, now)
        for node, count in freed.items():
            self.metrics.cluster_takeovers.inc(count)
            # it may have been in the middle of an attempt for each of them
            self.metrics.cluster_possible_duplicates.inc(count)
            log.warning(Event.CLUSTER_TAKEOVER, node=node, recipients=count)
        if freed:
            self._wake.set()
        if self.archive is not None:
            await self._archive_adopted()

    @property
    def _unshared(self) -> int:
        """Messages acknowledged here whose record or content is not in the shared
        store yet: being recorded, waiting for the store to come back, or (``ack:
        local``) recorded, their content not shared yet (`SHARE_AFTER`)."""
        return len(self._enqueues) + len(self._unrecorded) + len(self._unshared_since)

    @property
    def _shares_at_once(self) -> bool:
        """A message's content goes into the shared store with its record."""
        return self.node is not None and self.config.cluster.ack == "shared"

    async def _share_open(self, before: float) -> None:
        """``cluster.ack: local``: the content of messages recorded before ``before``
        and still open goes into the shared store (any node can deliver them then),
        in one transaction; those finished meanwhile never go there."""
        assert self.store is not None
        due = [q for q, since in self._unshared_since.items() if since <= before]
        if not due:
            return
        kept = [self._cache[q] for q in due if q in self._cache]
        unread = [q for q in due if q not in self._cache]
        store, spool = self.store, self.spool

        def share() -> None:  # the rest read from the spool in the same trip
            found = list(kept)
            for queue_id in unread:
                with contextlib.suppress(SpoolError):  # set aside when next tried
                    found.append(spool.read(queue_id))
            store.share_many(found)

        await self._db(share)
        for queue_id in due:
            self._unshared_since.pop(queue_id, None)

    def adopt_strays_soon(self, since: float) -> None:
        """An SMTP worker that had started at ``since`` died: what it spooled meanwhile
        but could not announce (`adopt_strays`), once the other workers' lines of this
        moment are in."""
        cutoff = time.time()

        async def later() -> None:
            await asyncio.sleep(STRAY_GRACE)
            await self.adopt_strays(since, cutoff)

        if not self._stopping:
            self._spawn(later())

    async def adopt_strays(self, since: float, cutoff: float) -> int:
        """Record the spooled messages the store does not know, written between
        ``since`` and ``cutoff`` and not being recorded now: acknowledged by an SMTP
        worker that died before its ``queued`` line reached this process (else they
        waited for the next start).  Returns how many."""
        assert self.store is not None

        def strays() -> list[tuple[str, int]]:
            assert self.store is not None
            known = self.store.known()
            found = []
            for queue_id in sorted(self.spool.queue_ids()):
                path = self.spool.path_of(queue_id)
                if queue_id in known or not _written_between(path, since, cutoff):
                    continue
                try:
                    size = read_envelope(path).size
                except SpoolError:
                    size = 0  # set aside as corrupt when it is recorded
                found.append((queue_id, size))
            return found

        found = [
            (q, size)
            for q, size in await self._db(strays)
            if q not in self._enqueuing and q not in self._unrecorded
        ]
        for queue_id, size in found:
            self._adopted.add(queue_id)
            self.spool.note_committed(size)  # (counted when a worker says `queued`)
            await self.enqueue(queue_id, fresh=False)
        if found:
            self.metrics.strays_adopted.inc(len(found))
            log.warning(
                Event.QUEUE_STRAYS_ADOPTED,
                messages=len(found),
                queue_ids=[q for q, _ in found[:20]],
            )
        return len(found)

    async def _record_unrecorded(self) -> None:
        """Messages acknowledged while the shared store was away: recorded now."""
        for queue_id, size in list(self._unrecorded.items()):
            del self._unrecorded[queue_id]
            # perhaps committed before the error was seen: looked up first
            await self.enqueue(queue_id, size=size, fresh=False)
            if queue_id in self._unrecorded:
                return  # still away: the next round tries again

    async def _remove_finished_elsewhere(self) -> None:
        """Spool files of messages another node finished (once this node's own
        records of them are in the archive)."""
        assert self.store is not None
        local = await self._db(self.spool.queue_ids)
        for queue_id in await self._db(self.store.done_among, local):
            if self.archive is not None and not await self.archive.written(queue_id):
                continue
            self._removals.post(functools.partial(self.spool.remove, queue_id))

    async def _archive_adopted(self) -> None:
        """Messages a node finished but had not archived when it stopped (killed, its
        disk lost with their spool files): their shared copy is dropped only once they
        are archived, so it is still there.  This node takes them over, journals them
        and the attempts the queue's history holds, then lets the copy go."""
        assert self.store is not None
        silent = self.config.cluster.lease_timeout
        for envelope, data, node in await self._db(self.store.adopt_unarchived, silent):
            log.warning(Event.ARCHIVE_ADOPTED, queue_id=envelope.queue_id, node=node)
            await self._archive_then_drop(envelope, data)

    async def _archive_left_copies(self) -> None:
        """At start: this node's finished messages whose shared copy a stop left
        (their archive records were still being written) and whose spool file is
        not here to bring them in (`_complete_evidence` does those): journaled from
        the copy where the archive lacks them, then the copy goes."""
        assert self.store is not None
        for queue_id in await self._db(self.store.done_with_content_here):
            if self.spool.path_of(queue_id).exists():
                continue
            content = await self._db(self.store.content, queue_id)
            if content is not None:
                await self._archive_then_drop(*content)

    async def _archive_then_drop(self, envelope: Envelope, data: bytes) -> None:
        """A finished message known from its shared copy: the archive gets what it
        lacks of it (the message, the attempts the queue's history holds), then the
        copy goes."""
        assert self.store is not None and self.archive is not None
        queue_id = envelope.queue_id
        self.archive.ensure(envelope, data)
        await self.archive.complete_attempts(
            queue_id, await self._db(self.store.attempt_history, queue_id)
        )
        self.archive.when_archived(queue_id, functools.partial(self._drop_shared, queue_id))

    def _drop_shared(self, queue_id: str) -> None:
        """A done and archived message's shared copy goes, in the next group commit
        (alone, each would be a commit of its own)."""
        store = self.store
        assert store is not None
        self._spawn(self._commits.run(lambda: store.drop_content(queue_id)))

    def _start(self, leased: list[RecipientRow]) -> None:
        """An attempt per message and recipient domain, for recipients leased to us."""
        if self._stopping:
            return  # the leases end at the next start (`release_leases`)
        groups: dict[tuple[str, str], list[RecipientRow]] = defaultdict(list)
        for row in leased:
            groups[(row.queue_id, row.domain)].append(row)
        for (queue_id, domain), rows in groups.items():
            task = asyncio.get_running_loop().create_task(self._attempt(queue_id, domain, rows))
            self._attempts.add(task)
            self._started[domain] += 1
            task.add_done_callback(functools.partial(self._ended, domain))

    def _ended(self, domain: str, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._started[domain] -= 1
        if not self._started[domain]:
            # no attempt holds or waits for the destination's own places now
            del self._started[domain]
            self._per_domain.pop(domain, None)
            self._new_each.pop(domain, None)
            self._idle_since[domain] = time.monotonic()
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Forget the destinations without attempts for `FORGET_AFTER` seconds (looked
        at once a minute at most), and suspensions that ended that long ago."""
        now = time.monotonic()
        if now - self._swept < min(PRUNE_INTERVAL, FORGET_AFTER):
            return
        self._swept = now
        for domain, since in list(self._idle_since.items()):
            if domain in self._started:  # attempts again
                del self._idle_since[domain]
            elif now - since >= FORGET_AFTER:
                del self._idle_since[domain]
                self._quick.discard(domain)
                self._slow.discard(domain)
                self._slow_each.pop(domain, None)
        wall = time.time()
        for domain, suspension in list(self._suspended.items()):
            if wall - suspension.until >= FORGET_AFTER and domain not in self._started:
                del self._suspended[domain]

    def _busy(self, domain: str) -> bool:
        return self._room_for(domain) <= 0

    def _room_for(self, domain: str) -> int:
        """How many more attempts to ``domain`` are worth starting: a slow or new
        destination's up to as many as it may run at once (`_places`), a quick
        one's up to twice as many - more would only wait, and leased, could not
        be tried by another node.  (Also read from the database thread during a
        claim: it changes nothing.)"""
        started = self._started.get(domain, 0)
        if domain in self._quick:
            return 2 * self.config.delivery.concurrency_per_destination - started
        if domain not in self._slow:
            return NEW_PLACES - started
        window = self._slow_each.get(domain)  # (`_overran` made it)
        return (window.limit if window is not None else self._slow_start) - started

    @property
    def _slow_start(self) -> int:
        return min(SLOW_PLACES, self.config.delivery.concurrency_per_destination)

    @property
    def _quick_attempts(self) -> int:
        """Attempts for quick destinations under way or about to be: as many as each
        may run at once, at most (those for slow and new ones are bounded by their
        windows and `NEW_PLACES` each).  The claims' room: counted whole, the
        attempts queued behind one destination's limit stopped the claims for all
        the others (a slow destination taken for quick had hundreds)."""
        most = self.config.delivery.concurrency_per_destination
        return sum(min(n, most) for domain, n in self._started.items() if domain in self._quick)

    @property
    def _quick_started(self) -> int:
        """Every attempt waiting or under way for quick destinations."""
        return sum(n for domain, n in self._started.items() if domain in self._quick)

    async def _attempt(self, queue_id: str, domain: str, rows: list[RecipientRow]) -> None:
        recorded = False
        try:
            async with contextlib.AsyncExitStack() as holding:
                place = await holding.enter_async_context(self._places(domain))
                if await self._postponed(queue_id, domain, rows):
                    return
                async with self._opened(queue_id) as (envelope, data):
                    final = await self._attempt_locked(
                        envelope, data, domain, rows, place, holding.aclose
                    )
                    recorded = True
                    if final is not None:
                        await self._finish(envelope, data, final)
        except Exception as e:  # fail closed: nothing sent on this path, deferred
            log.error(
                Event.DELIVERY_ERROR,
                queue_id=queue_id,
                error_type=type(e).__name__,
                error=str(e)[:300],
            )
            if not recorded:  # once recorded, a result stands (finishing is retried)
                await self._record_error(queue_id, rows, e)
        finally:
            self._wake.set()  # room for the next claim

    @contextlib.asynccontextmanager
    async def _places(self, domain: str) -> AsyncIterator[Place]:
        """A place for an attempt to ``domain``: its destination's first (attempts
        waiting for a busy or dead destination hold none of the places others
        need), then - a slow destination - one of its window's from the slow share,
        or - a new one - its one place (`NEW_PLACES`) from the new share
        (`gateway.queue.places`), then one of the total: however many slow
        destinations there are, quick ones keep half the places at least and new
        ones are tried at once."""
        async with self._per_domain[domain]:
            place = Place(new=self._new_share, slow=self._slow_share)
            each, share = await self._own_place(domain)
            try:
                await place.take(self._total, share, key=domain)
                yield place
            finally:
                # a slow destination's next attempt, waiting, gets the place (and
                # the session just given back) before the other destinations
                self._let_go(place, domain)
                if each is not None:
                    each.release()

    async def _own_place(self, domain: str) -> tuple[Share | None, Share | None]:
        """The destination's own place by what it is now, and the share to take a
        place from next: a slow one's window and the slow share, a new one's place
        and the new share, nothing for a quick one.  An attempt that waited as a
        new destination's while the first attempt found it slow (or quick) waits
        again as what it is: a slow destination's attempts take slow places only."""
        while domain not in self._quick:
            slow = domain in self._slow
            each = (self._slow_each if slow else self._new_each)[domain]
            await each.acquire()
            if slow == (domain in self._slow) and domain not in self._quick:
                return each, self._slow_share if slow else self._new_share
            each.release()
        return None, None

    def _let_go(self, place: Place, domain: str | None = None) -> None:
        self._stalled -= place.stalled
        place.release(domain)

    def _overran(self, domain: str, place: Place) -> None:
        """An attempt to ``domain`` has taken `QUICK` seconds: the destination is
        slow, from the start of its window if it was not."""
        self._quick.discard(domain)
        if domain not in self._slow:
            self._slow.add(domain)
            self._slow_each[domain].resize(self._slow_start)
        place.overrun()

    def _feedback(
        self, domain: str, place: Place, took: float, results: list[RecipientResult]
    ) -> None:
        """What an attempt that took ``took`` seconds says of its destination: quick,
        or slow - its window one wider when it delivered, one narrower when not."""
        if took < (QUICK_AGAIN if domain in self._slow else QUICK):
            self._quick.add(domain)
            self._slow.discard(domain)
            return
        self._overran(domain, place)
        window = self._slow_each[domain]
        if any(r.outcome == "delivered" for r in results):
            most = self.config.delivery.concurrency_per_destination
            window.resize(min(window.limit + 1, most))
        else:
            window.resize(window.limit - 1)

    def _stall(self, domain: str, place: Place) -> None:
        """An attempt to ``domain`` has run `STALL` seconds: it gives up its places
        and the destination's window falls to one."""
        if place.stall():
            self._stalled += 1
            self._slow_each[domain].resize(1)
            log.info(Event.DELIVERY_STALLED, domain=domain, seconds=STALL)

    @contextlib.asynccontextmanager
    async def _opened(self, queue_id: str) -> AsyncIterator[tuple[Envelope, bytes]]:
        """A message for an attempt: kept from its arrival (`_cache`), else read once
        for all the attempts under way at the same time and let go when the last of
        them ends.  (Read for each, one 20 MB message to 20 destinations held ~1 GB
        in this process at once.)"""
        cached = self._cache.get(queue_id)
        if cached is not None:
            yield cached
            return
        opened = self._open.get(queue_id)
        if opened is None:
            read = asyncio.ensure_future(self._read(queue_id))
            read.add_done_callback(lambda f: f.cancelled() or f.exception())  # (seen)
            opened = self._open[queue_id] = _Open(read)
        opened.users += 1
        try:
            yield await asyncio.shield(opened.read)
        finally:
            opened.users -= 1
            if opened.users == 0 and self._open.get(queue_id) is opened:
                del self._open[queue_id]

    async def _attempt_locked(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        rows: list[RecipientRow],
        place: Place,
        let_go: Callable[[], Awaitable[None]],
    ) -> list[RecipientRow] | None:
        """One attempt for ``rows`` by the delivery agent, its results recorded;
        every recipient when this made the last of them final (the caller finishes
        the message).  The destination's places go back (``let_go``) once the
        delivery is over, before its results are written: the recipients stay
        leased until then, and the next attempt need not wait for this one's commit."""
        queue_id = envelope.queue_id
        began = time.monotonic()
        # a first attempt leaves the new share when it takes a while; slow as soon as
        # it takes that long: this attempt and the next take slow places
        loop = asyncio.get_running_loop()
        timers = (
            loop.call_later(NEW_QUICK, place.overrun),
            loop.call_later(QUICK, self._overran, domain, place),
            loop.call_later(STALL, self._stall, domain, place),
        )
        try:
            attempted = await self.agent.attempt(envelope, data, domain, list(rows))
        finally:
            for timer in timers:
                timer.cancel()
        results = [a.result for a in attempted]
        self._feedback(domain, place, time.monotonic() - began, results)
        await let_go()
        now = time.time()
        if results and all(r.outcome == "deferred" and r.status == UNREACHABLE for r in results):
            await self._suspend(domain, results[0].diagnostic, now)
        elif any(r.outcome == "delivered" for r in results):
            self._suspended.pop(domain, None)
        records = [
            self._next_state(envelope, row, a, now) for row, a in zip(rows, attempted, strict=True)
        ]
        for row, a, record in zip(rows, attempted, records, strict=True):
            self._report(envelope, row, a, record, now)
        whole = list(rows) if len(rows) == len(envelope.recipients) else None
        events = self._events(envelope, rows, attempted, records)
        final = await self._record(queue_id, records, now, every=whole, events=events)
        self._archive_attempt(queue_id, rows, records)
        self._tell_sender(envelope, data, rows, attempted, records)
        if final is None and any(r.state.waiting for r in records):
            self._forget(queue_id)  # a retry is minutes away: it reads the spool again
        return final

    async def _suspend(self, domain: str, diagnostic: str, now: float) -> None:
        """No host of ``domain`` could be reached: its recipients wait, without an
        attempt each, as long as one recipient would after as many failures in a
        row (``delivery.retry_schedule``); an attempt at the end of each wait finds
        out whether it is back.  Messages past ``delivery.max_queue_lifetime`` are
        still tried, and expire."""
        assert self.store is not None
        known = self._suspended.get(domain)
        if known is not None and known.until > now:
            return  # an attempt that began before it was suspended
        times = known.times + 1 if known is not None else 0
        until = now + self._retry_wait(times)
        why = f"delivery temporarily suspended: {diagnostic}"
        self._suspended[domain] = _Suspension(until, times, why)
        arrived_after = now - self.config.delivery.max_queue_lifetime
        try:  # what is due already waits in the store, not claimed one by one
            waiting = await self._db(
                self.store.suspend, domain, until, UNREACHABLE, why, arrived_after
            )
        except (sqlite3.Error, StorageError) as e:  # then each waits as it is claimed
            log.error(Event.QUEUE_STORE_FAILED, error=str(e)[:200])
            waiting = 0
        log.warning(
            Event.DESTINATION_SUSPENDED,
            domain=domain,
            seconds=round(until - now),
            waiting=waiting,
            error=diagnostic[:300],
        )

    async def _postponed(self, queue_id: str, domain: str, rows: list[RecipientRow]) -> bool:
        """Recipients claimed for a destination that is suspended now wait for its
        end instead (not an attempt: nothing is counted or journaled)."""
        suspension = self._suspended.get(domain)
        now = time.time()
        if suspension is None or suspension.until <= now:
            return False
        if any(r.state is RecipientState.HELD for r in rows):
            return False  # held by the policy: its decision is made again
        assert self.store is not None
        store, arrived_after = self.store, now - self.config.delivery.max_queue_lifetime
        return await self._commits.run(
            lambda: store.postpone(
                queue_id,
                [r.idx for r in rows],
                suspension.until,
                UNREACHABLE,
                suspension.diagnostic,
                arrived_after,
            )
        )

    def _events(
        self,
        envelope: Envelope,
        rows: list[RecipientRow],
        attempted: list[Attempted],
        records: list[AttemptRecord],
    ) -> list[Row]:
        """The webhook events of an attempt's outcomes (none without endpoints)."""
        if not self.webhooks:
            return []
        events: list[Row] = []
        for row, a, record in zip(rows, attempted, records, strict=True):
            events += self.webhooks.recipient(
                envelope,
                row.address,
                row.state,
                record.state,
                record.status,
                record.diagnostic,
                a.decision.mode.value,
                record.stored_evidence,
                isinstance(a.made, Deposited),
            )
        return events

    def _tell_sender(
        self,
        envelope: Envelope,
        data: bytes,
        rows: list[RecipientRow],
        attempted: list[Attempted],
        records: list[AttemptRecord],
    ) -> None:
        """What the sender asked to hear of this attempt: the recipients delivered
        (NOTIFY=SUCCESS: "delivered" into the portal, "relayed" to a mail server that
        does not offer DSN - one that does was passed the request and reports), and
        ``notify.sender_on``'s notices for each recipient that just became held or
        was sent via the portal."""
        if not envelope.mail_from:
            return
        told = [
            _reported(
                envelope,
                row,
                "delivered" if isinstance(a.made, Deposited) else "relayed",
                record.status,
                a.result.diagnostic,
                a.result.evidence.mx_host if a.result.evidence else None,
            )
            for row, a, record in zip(rows, attempted, records, strict=True)
            if record.state == RecipientState.DELIVERED
            and _wants(envelope, row, "SUCCESS")
            and not (a.result.evidence and a.result.evidence.dsn_passed_on)
        ]
        if told:
            self._spawn(self._send_report(envelope, data, told, "success"))
        events = self.config.notify.sender_on
        if not events:
            return
        for row, a, record in zip(rows, attempted, records, strict=True):
            held = record.state == RecipientState.HELD and row.state != RecipientState.HELD
            if "held" in events and held:
                why = "; ".join(a.decision.reasons) or record.diagnostic
                subject = "Held: your message is not sent yet"
                lines = [
                    f"Your message to <{row.address}> is held: it cannot be sent as",
                    "the policy requires for it yet, and is decided again later.",
                    f"Why: {why}",
                    f"An administrator sees it with: sealgate queue show {envelope.queue_id}",
                ]
            elif (
                "portal" in events
                and record.state == RecipientState.DELIVERED
                and isinstance(a.made, Deposited)
            ):
                subject = "Sent via the secure portal"
                lines = [
                    f"Your message to <{row.address}> was placed in the secure portal:",
                    "the recipient was sent a link to read it there, until",
                    f"{a.made.expires}.",
                ]
            else:
                continue
            notice = build_notice(
                sender=envelope.mail_from,
                reporting_mta=self.hostname,
                queue_id=envelope.queue_id,
                original=data,
                subject=subject,
                lines=lines,
            )
            self._spawn(self._submit_report(envelope, notice, "notice", 1))

    async def _submit_report(
        self, envelope: Envelope, report: bytes, action: str, recipients: int
    ) -> None:
        """Queue a report or notice to the message's sender (from the null sender)."""
        report_id = await self.submit("", [envelope.mail_from], report, Purpose.DSN)
        self.metrics.dsn_sent.labels(action).inc()
        log.info(
            Event.DSN_SENT,
            queue_id=envelope.queue_id,
            dsn_queue_id=report_id,
            action=action,
            recipients=recipients,
        )

    async def _send_report(
        self,
        envelope: Envelope,
        data: bytes,
        recipients: list[ReportedRecipient],
        action: str,
        retry_until: datetime.datetime | None = None,
    ) -> None:
        """A delivery status notification to the message's sender (`build_dsn`)."""
        report = build_dsn(
            sender=envelope.mail_from,
            reporting_mta=self.hostname,
            queue_id=envelope.queue_id,
            arrival=envelope.received_at,
            original=data,
            failed=recipients,
            retry_until=retry_until,
            envid=parameters.option(envelope.mail_options, "ENVID"),
        )
        await self._submit_report(envelope, report, action, len(recipients))

    async def _read(self, queue_id: str) -> tuple[Envelope, bytes]:
        """A message's envelope and bytes: kept from its arrival, else from the spool,
        else (another node accepted it) from the shared store."""
        cached = self._cache.get(queue_id)
        if cached is not None:
            return cached
        try:
            return await self._db(self.spool.read, queue_id)
        except SpoolError:
            if self.node is None:
                raise
            assert self.store is not None
            found = await self._db(self.store.content, queue_id)
            if found is None:
                raise
            return found

    async def _record(
        self,
        queue_id: str,
        records: list[AttemptRecord],
        now: float,
        add: Envelope | None = None,
        every: list[RecipientRow] | None = None,
        events: list[Row] | None = None,
    ) -> list[RecipientRow] | None:
        """Record an attempt's results (`QueueStore.record`; ``add``: the message
        first, in the same transaction; ``every``: the attempt's rows when they are
        all the message's recipients).  A write the database refuses (disk full,
        I/O error) is retried until it succeeds, the results waiting in memory and
        the recipients still leased: what was delivered is not delivered again
        because its result could not be written at once."""
        assert self.store is not None
        store, delay = self.store, RECORD_RETRY_FIRST

        def write() -> list[RecipientRow] | None:
            if add is not None:
                store.add(add)
            final = store.record(queue_id, records, now, every)
            if events:  # webhook events with the states they report
                store.add_events(events, now)
            return final

        while True:
            try:
                final = await self._commits.run(write)
                if events:
                    self.events_written()
                return final
            except (sqlite3.OperationalError, StorageError) as e:
                if self._stopping:
                    raise  # not recorded: the leases end at the next start, tried again
                self.metrics.queue_store_errors.inc()
                log.error(
                    Event.QUEUE_STORE_FAILED, queue_id=queue_id, error=str(e)[:200], retry=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX)

    def _archive_attempt(
        self, queue_id: str, rows: list[RecipientRow], records: list[AttemptRecord]
    ) -> None:
        if self.archive is None:
            return
        self.archive.attempt(
            queue_id,
            [
                {
                    "idx": row.idx,
                    "address": row.address,
                    "attempt": row.attempts + 1,
                    "state": record.state,
                    "status": record.status,
                    "diagnostic": record.diagnostic,
                    # (their JSON as the queue state has it: `gateway.canonical`)
                    "evidence": record.evidence_text if record.stored_evidence else None,
                    "decision": record.decision_text,  # with its reasons and facts
                }
                for row, record in zip(rows, records, strict=True)
            ],
        )

    async def _record_error(
        self, queue_id: str, rows: list[RecipientRow], error: Exception
    ) -> None:
        """An attempt that failed unexpectedly: its recipients are deferred (4.3.0)
        like after any temporary failure - retried on the schedule, expired past
        ``delivery.max_queue_lifetime`` and then reported in a DSN, whatever the
        error.  Only when even that cannot be written are the leases let go, for a
        new attempt a minute later."""
        assert self.store is not None
        now = time.time()
        diagnostic = f"internal error during the attempt ({type(error).__name__})"
        try:
            message = await self._db(self.store.message, queue_id)
            arrival = _timestamp(message["received_at"]) if message else now
            records = [
                self._scheduled(
                    row, RecipientState.DEFERRED, "4.3.0", diagnostic, arrival, now, "error"
                )
                for row in rows
            ]
            final = await self._record(queue_id, records, now)
            self._archive_attempt(queue_id, rows, records)
            if final is not None:
                try:
                    envelope, data = await self._read(queue_id)
                except SpoolError:  # nothing left to report from: done
                    await self._db(self.store.finish, queue_id, False)
                    return
                await self._finish(envelope, data, final)
        except Exception as e:  # noqa: BLE001 - the state store itself is failing
            log.error(Event.QUEUE_STORE_FAILED, queue_id=queue_id, error=str(e)[:200])
            with contextlib.suppress(Exception):
                idxs = [r.idx for r in rows]
                await self._db(self.store.release_leases, queue_id, idxs, now + 60)

    async def _quarantine(self, queue_id: str, reason: str) -> None:
        """A spooled message the queue cannot take (see `Poison`): archived with a
        printable envelope, every recipient bounced (5.1.3 for a bad address, 5.1.7
        when the sender is bad, else 5.3.0), the sender told in a DSN when the
        sender address is usable, and the file moved to ``spool/quarantine/`` for
        inspection.  Never raises: the next message, or the start, goes on."""
        assert self.store is not None
        try:
            envelope, data = await self._db(self.spool.read, queue_id)
        except SpoolError as e:
            log.error(Event.SPOOL_CORRUPT, queue_id=queue_id, error=str(e)[:300])
            return
        self.metrics.quarantined.inc()
        log.error(Event.MESSAGE_QUARANTINED, queue_id=queue_id, reason=reason[:300])
        problems = check_envelope(envelope)
        clean = printable_envelope(envelope)
        clean = dataclasses.replace(clean, extra={**clean.extra, "quarantined": reason})
        if self.archive is not None:
            self.archive.journal(clean, data)
        now = time.time()
        records = []
        for idx in range(len(clean.recipients)):
            bad = problems.recipients.get(idx)
            if bad is not None:
                status, why = "5.1.3", f"bad recipient address ({bad})"
            elif problems.sender is not None:
                status, why = "5.1.7", f"bad sender address ({problems.sender})"
            else:
                status, why = "5.3.0", f"message quarantined: {reason}"
            records.append(
                AttemptRecord(idx, RecipientState.BOUNCED, status, why, None, now, "quarantined")
            )
        try:  # the message and its bounces in one transaction: never half recorded
            final = await self._record(queue_id, records, now, add=clean)
        except Exception as e:  # noqa: BLE001 - kept in queue/: quarantined at the next start
            log.error(Event.QUEUE_STORE_FAILED, queue_id=queue_id, error=str(e)[:200])
            return
        rows = final if final is not None else await self._db(self.store.recipients, queue_id)
        self._archive_attempt(queue_id, rows, records)
        await self._finish(clean, data, rows, tell_sender=problems.sender is None, quarantined=True)

    def _next_state(
        self, envelope: Envelope, row: RecipientRow, attempted: Attempted, now: float
    ) -> AttemptRecord:
        result = attempted.result
        scheduled = self._scheduled(
            row,
            RecipientState(result.outcome),
            result.status,
            result.diagnostic,
            _timestamp(envelope.received_at),
            now,
            result.outcome,
        )
        evidence = AttemptEvidence(
            attempted.decision, result.evidence, attempted.made, result.copy_sha256
        )
        return dataclasses.replace(scheduled, evidence=evidence)

    def _scheduled(
        self,
        row: RecipientRow,
        state: RecipientState,
        status: str,
        diagnostic: str,
        arrival: float,
        now: float,
        outcome: str,
    ) -> AttemptRecord:
        """The state after an attempt: a deferred or held recipient gets its next
        attempt from ``delivery.retry_schedule``, or expires (4.4.7) past
        ``delivery.max_queue_lifetime`` - whatever the reason it was not sent."""
        next_attempt = now
        if state.waiting:
            if now - arrival >= self.config.delivery.max_queue_lifetime:
                state, status = RecipientState.EXPIRED, "4.4.7"
                diagnostic = f"delivery time expired; last error: {diagnostic}"
            else:
                wait = self._retry_wait(row.attempts)
                next_attempt = now + wait * self._rng.uniform(0.9, 1.1)
        return AttemptRecord(row.idx, state, status, diagnostic, None, next_attempt, outcome)

    def _retry_wait(self, failures: int) -> float:
        """How long ``delivery.retry_schedule`` waits after that many failures in a
        row (its last wait repeats) - for a recipient, and for a suspended destination."""
        schedule = self.config.delivery.retry_schedule
        return float(schedule[min(failures, len(schedule) - 1)])

    def _report(
        self,
        envelope: Envelope,
        row: RecipientRow,
        attempted: Attempted,
        record: AttemptRecord,
        now: float,
    ) -> None:
        decision = attempted.decision
        ev = attempted.result.evidence
        self.metrics.policy_decisions.labels(decision.mode.value, decision.rule).inc()
        if not record.state.waiting:
            self.metrics.queue_time.labels(record.state).observe(
                now - _timestamp(envelope.received_at)
            )
        log.info(
            Event.DELIVERY_ATTEMPT,
            queue_id=row.queue_id,
            rcpt=self.redact(row.address),
            outcome=record.state,
            status=record.status,
            mode=decision.mode.value,
            rule=decision.rule,
            tls_level=decision.tls_level.label,
            mx=ev.mx_host if ev else None,
            ip=ev.ip if ev else None,
            tls_version=ev.tls_version if ev else None,
            reused=ev.reused if ev else None,
        )

    def _remove(self, envelope: Envelope, shared: bool = True) -> None:
        """Remove a done message's spool file, in the background (one job for all
        that are waiting); if the process dies first, the next start removes it
        (`_reconcile`), as it does for a message whose archive records were written
        only while the gateway stopped.  With several nodes its shared copy goes too
        (unless it was never ``shared``)."""
        if self._removed_all:  # stopped: the next start does both (`_complete_evidence`)
            return
        self._removals.post(lambda: self.spool.remove(envelope.queue_id, envelope.size))
        if self.node is not None and self.store is not None and shared:
            self._drop_shared(envelope.queue_id)

    async def _finish(
        self,
        envelope: Envelope,
        data: bytes,
        rows: list[RecipientRow],
        *,
        recovering: bool = False,
        tell_sender: bool = True,
        quarantined: bool = False,
    ) -> None:
        """Every recipient is final: report failures to the sender (unless not to
        ``tell_sender``: a sender address that is not usable), forget the message, and
        remove its spool file - or move it to quarantine.  (All delivered: done
        already, in the transaction of the last result, unless ``recovering`` a
        message a crash left unfinished.)"""
        self._finishing.add(envelope.queue_id)
        try:
            await self._finish_now(envelope, data, rows, recovering, tell_sender, quarantined)
        finally:
            self._finishing.discard(envelope.queue_id)

    async def _finish_now(
        self,
        envelope: Envelope,
        data: bytes,
        rows: list[RecipientRow],
        recovering: bool,
        tell_sender: bool,
        quarantined: bool,
    ) -> None:
        assert self.store is not None
        self._forget(envelope.queue_id)
        # done: shared now or never (ack: local); nothing to drop if never
        shared = self._unshared_since.pop(envelope.queue_id, None) is None
        failed = [
            r
            for r in rows
            if r.state in (RecipientState.BOUNCED, RecipientState.EXPIRED)
            and _wants(envelope, r, "FAILURE")
        ]
        dsn_sent = False
        if failed and envelope.mail_from and tell_sender:
            await self._send_report(
                envelope,
                data,
                [_reported(envelope, r, "failed", r.status, r.diagnostic) for r in failed],
                "failed",
            )
            dsn_sent = True
        if failed or recovering:
            await self._db(self.store.finish, envelope.queue_id, dsn_sent)
        if (
            self.node is not None
            and self.archive is not None
            and not self.spool.path_of(envelope.queue_id).exists()
        ):  # accepted by a node that may not have journaled it before it died
            self.archive.ensure(envelope, data)
        if quarantined:
            dispose: Callable[[], None] = lambda: self.spool.quarantine(  # noqa: E731
                envelope.queue_id, envelope.size
            )
        else:
            dispose = lambda: self._remove(envelope, shared)  # noqa: E731
        if self.archive is None:
            dispose()
        else:  # the spool keeps it until every record of it is in the archive
            self.archive.when_archived(envelope.queue_id, dispose)
        log.info(
            Event.MESSAGE_DONE,
            queue_id=envelope.queue_id,
            delivered=sum(r.state is RecipientState.DELIVERED for r in rows),
            failed=len(failed),
        )


def _timestamp(received_at: str) -> float:
    return datetime.datetime.fromisoformat(received_at).timestamp()


def _received_before(envelope: Envelope, when: float) -> bool:
    try:
        return _timestamp(envelope.received_at) < when
    except (TypeError, ValueError):  # the envelope checks judge a bad date
        return False


class Poison(SealgateError):  # noqa: N818 - what it is, not an error of ours
    """A spooled message whose envelope the queue cannot take (it would fail the
    listener's checks: `gateway.addresses.check_envelope`)."""

    def __init__(self, problems: EnvelopeProblems):
        super().__init__(problems.summary())
        self.problems = problems


def _why(error: Exception) -> str:
    """Why a message is quarantined, without its content (the problems found, or the
    kind of error)."""
    if isinstance(error, Poison):
        return str(error)
    return f"could not be queued ({type(error).__name__})"


def _written_between(path: os.PathLike[str], since: float, cutoff: float) -> bool:
    try:
        return since <= os.stat(path).st_mtime <= cutoff
    except OSError:  # gone meanwhile
        return False
