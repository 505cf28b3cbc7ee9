"""queue manager - schedule deliveries, retry, expire and bounce, per recipient.

The manager runs in the main process.  It learns of every spooled message (at start,
by reconciling the spool with the state store; then from each "queued" event), and
repeatedly takes the recipients that are due, grouped by message and recipient
domain so that recipients who share a destination go in one SMTP transaction.

For each group: learn the domain's facts (`gateway.probe.prober`, cached) and each
recipient's keys, let the policy decide per recipient (`gateway.policy.engine`), and
act on the decision: ``tls`` - route the domain (`gateway.delivery.router`), apply
its MTA-STS policy, deliver at the decided level (`gateway.delivery.client`, which
applies DANE per MX and reuses idle sessions from `SessionCache`); when the level
cannot be met on the connection, probe again, decide again without ``tls`` and take
the next mode.  ``smime`` / ``pgp`` - the recipient's own copy, encrypted to its key
(`gateway.crypto`), delivered the same way; a key that cannot be used moves it to the
next mode.  ``bounce`` - fail the recipient (5.7.10).  ``portal`` - the message is
kept in the portal (`gateway.portal`) and a notification sent; without the portal,
and for ``hold``, the recipient is ``held``, decided again at each retry.  Every
recipient's result, decision and evidence are recorded in one state-store
transaction.  Deferred recipients get their next attempt from
``delivery.retry_schedule`` (with up to 10% jitter); past
``delivery.max_queue_lifetime`` they expire.  When every recipient of a message is
final, failed ones are reported to the sender in one DSN (never for a null sender),
and the spool file is removed.  A crash between the last result and that step is
repaired at start (`QueueStore.unfinished`).  Finished messages stay in the state
store for ``delivery.history_retention`` (for ``sealgate queue show``), then go.

At-least-once: a result is recorded only after the remote server answered; a crash
in between means the recipient is tried again.  Concurrency is bounded in total
(``delivery.concurrency``) and per domain (``delivery.concurrency_per_destination``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import random
import sqlite3
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cryptography import x509

from gateway.addresses import EnvelopeProblems, check_envelope, printable_envelope
from gateway.archive.service import ArchiveService
from gateway.batching import Batcher, Job, run_each
from gateway.batching import Outcome as JobOutcome
from gateway.config import Config
from gateway.config_check import Signer, dkim_key, load_signer
from gateway.crypto import dkim, smime
from gateway.crypto.certs import CertificateError, check
from gateway.crypto.dkim import DkimKey
from gateway.crypto.pgp import PgpEncryptor, PgpError, PgpSigner
from gateway.delivery.client import ClientSettings, Outcome, RecipientResult, deliver
from gateway.delivery.dsn import FailedRecipient, build_dsn
from gateway.delivery.router import Routed, RouteFailure, Router
from gateway.delivery.sessions import ReuseLimits, SessionCache
from gateway.delivery.tls_policy import TlsLevel
from gateway.errors import ConfigError, SpoolError
from gateway.events import EncryptionFailure, Event
from gateway.model import Envelope
from gateway.observability.logging import AddressRedactor, get_logger
from gateway.observability.metrics import Metrics
from gateway.policy.engine import decide
from gateway.policy.features import Features, message_features, strip_subject_tags
from gateway.policy.language import Policy, load_policy_for
from gateway.policy.model import DELIVERY_MODES, Decision, Mode
from gateway.portal.service import CONTENT_FREE, Portal
from gateway.probe.dns import Resolver
from gateway.probe.facts import RecipientFacts
from gateway.probe.keys import KeyStore, NoKeys
from gateway.probe.mta_sts import StsCache, StsMode
from gateway.probe.prober import Prober, ProbeSettings
from gateway.queue.groupcommit import GroupCommit
from gateway.queue.store import (
    AttemptRecord,
    QueueStore,
    RecipientRow,
    domain_of,
    evidence_dict,
)
from gateway.spool import Spool
from gateway.spool.store import read_envelope

log = get_logger("gateway.queue")
T = TypeVar("T")

POLL_INTERVAL = 1.0  # also picks up `sealgate queue retry/hold/release/delete`
PRUNE_INTERVAL = 60.0
DURABLE_EVERY = 0.05  # seconds between archive syncs before spool files are removed
# Messages read at arrival wait here for their first attempt (no second read); the
# spool file stays the durable copy.
CACHE_MESSAGE_MAX = 256 * 1024
CACHE_TOTAL_MAX = 64 * 1024 * 1024
FEATURES_MAX = 10_000  # messages whose features are kept between their recipients' attempts
THREAD_FEATURES_ABOVE = 32 * 1024  # classifying larger messages runs in a thread, not the loop
RECORD_RETRY_FIRST, RECORD_RETRY_MAX = 0.5, 30.0  # seconds between writes of results


class QueueManager:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        redact: AddressRedactor,
        hostname: str,
        inject: Callable[..., Awaitable[str]],
        policy: Policy | None = None,
        keys: KeyStore | None = None,
        archive: ArchiveService | None = None,
    ):
        self.spool = spool
        self.archive = archive
        self.portal: Portal | None = None  # set by the app when the portal runs
        self.metrics = metrics
        self.redact = redact
        self.hostname = hostname
        self.inject = inject  # spools a message we generate (DSNs); returns its queue id
        self.sessions: SessionCache | None = None
        self.sts: StsCache | None = None  # outlives reloads: cached policies stay
        self.keys: KeyStore = keys or NoKeys()
        self._retired: set[asyncio.Task[None]] = set()
        self._features: dict[str, tuple[str, Features]] = {}
        self._smime_signer: Signer | None = None
        self._smime_subject: str | None = None
        self._dkim: DkimKey | None = None
        self._pgp_signer: PgpSigner | None = None
        # Encryption runs here, off the event loop: gpg processes and S/MIME of
        # large messages, and gpg signing (three at once: a gpg waits on its pipes).
        self._crypto = ThreadPoolExecutor(3, thread_name_prefix="crypto")
        self._certs: dict[bytes, x509.Certificate] = {}
        self._pgp = PgpEncryptor(config.state_dir / "pgp")
        self.apply(config, policy)
        dc = config.delivery
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-db")
        # Removing a finished message's file can wait behind the file system journal
        # (the SMTP side renames and fsyncs in the same directory): never in the
        # database thread, which every attempt needs.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="spool-remove")
        self._removals = Batcher(self._remover, self._remove_batch)
        self._removed_all = False
        self._finishing: set[str] = set()  # messages being finished right now
        self.store: QueueStore | None = None
        self._commits: GroupCommit
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._total = asyncio.Semaphore(dc.concurrency)
        self._per_domain: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(dc.concurrency_per_destination)
        )
        self._cache: OrderedDict[str, tuple[Envelope, bytes]] = OrderedDict()
        self._cached_bytes = 0
        self._rng = random.Random()  # noqa: S311 - retry jitter, not security

    def apply(self, config: Config, policy: Policy | None = None) -> None:
        """Take the policy, routes, resolvers and timeouts from ``config`` (start,
        SIGHUP); ``policy`` when the caller loaded it already.  A policy or a signing
        key that does not load raises `ConfigError` before anything changes.

        Attempts in progress finish with the settings (and the policy) they started
        with; every attempt that starts afterwards uses the new ones.  Idle sessions
        and probe facts were made under the old settings: they are dropped.
        """
        new_policy = policy or load_policy_for(config)
        pgp_signer = None
        if config.pgp.signing_key_file is not None:
            try:
                home = config.state_dir / "pgp-signing"
                pgp_signer = PgpSigner(home, config.pgp.signing_key_file)
            except PgpError as e:
                raise ConfigError("pgp.signing_key_file", str(e)) from None
        sm = config.smime
        signer = None
        if sm.signing_cert_file is not None and sm.signing_key_file is not None:
            signer = load_signer(sm.signing_cert_file, sm.signing_key_file)
        dkim_signing = dkim_key(config)
        # everything that can fail has been read: from here on, nothing raises
        self.policy, self._pgp_signer, self._dkim = new_policy, pgp_signer, dkim_signing
        self._smime_signer, self._smime_subject = signer, sm.subject
        self.config = config
        dc = config.delivery
        self.resolver = Resolver(config.dns.nameservers)
        self.router = Router(self.resolver, dc.port, config.routes, dc.smart_host, dc.max_mx_hosts)
        self.settings = ClientSettings(
            self.hostname,
            config.tls.ca_file,
            dc.connect_timeout,
            dc.command_timeout,
            dane=config.dns.dnssec == "trust-ad",
        )
        if self.sts is None:
            self.sts = StsCache(self.resolver, path=config.state_dir / "mta-sts.json")
        self.sts.resolver = self.resolver
        self.sts.port = config.mta_sts.port
        self.sts.ca_file = config.tls.ca_file
        self.sts.timeout = config.mta_sts.fetch_timeout
        self.prober = Prober(
            self.router,
            self.resolver,
            ProbeSettings.from_config(config, self.hostname),
            self.sts,
            self.keys,
            self.metrics,
        )
        old, self.sessions = (
            self.sessions,
            SessionCache(
                ReuseLimits(dc.reuse_idle_time, dc.reuse_max_age, dc.reuse_max_messages),
                per_key=dc.concurrency_per_destination,
            ),
        )
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

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
        path = self.config.state_dir / "queue.db"
        self.store = await self._db(QueueStore, path)
        self._commits = GroupCommit(self.store, self._db_thread)
        assert self.sts is not None
        await asyncio.to_thread(self.sts.load)
        await self._db(self.store.release_leases)
        # before anything is removed: the archive journals what it lacks
        keep = await self.archive.recover() if self.archive is not None else set()
        added, poison, leftover = await self._db(self._reconcile, keep)
        for queue_id, reason in poison.items():
            await self._quarantine(queue_id, reason)
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
        unfinished = await self._db(self.store.unfinished)
        for queue_id in unfinished:
            message = await self._db(self.store.message, queue_id)
            if queue_id in self._finishing or (message or {}).get("done"):
                continue  # its attempt is finishing it, or has just done so
            try:
                envelope, data = await self._db(self.spool.read, queue_id)
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
        return len(unfinished)

    def _reconcile(self, keep: set[str]) -> tuple[int, dict[str, str], list[Envelope]]:
        """Add spooled messages the store does not know (a crash before `enqueue`).
        Returns how many were added; the messages that cannot be (to be quarantined,
        with why: one bad file never keeps the gateway from starting); and the done
        messages whose spool file is still here (a stop or crash before the removal,
        or archive records that were not written): removed once the archive has
        every record (`_complete_evidence`), unless the archive could not journal
        the message itself (``keep``)."""
        assert self.store is not None
        known, added = self.store.known(), 0
        poison: dict[str, str] = {}
        leftover: list[Envelope] = []
        for item in self.spool.envelopes():
            if not isinstance(item, Envelope):
                continue
            done = known.get(item.queue_id)
            if done is None:
                try:
                    added += self._add_checked(item, lease=False)
                except Exception as e:  # noqa: BLE001 - whatever it is, that message alone
                    poison[item.queue_id] = _why(e)
            elif done and item.queue_id not in keep:
                leftover.append(item)
        return added, poison, leftover

    async def _complete_evidence(self, leftover: list[Envelope]) -> None:
        """At start, done messages whose spool files outlived them: journal the
        attempts the archive lacks from the queue state (their records were lost with
        the process that could not write them), then remove the files - those whose
        records still cannot be written stay until they are."""
        assert self.store is not None
        ready = []
        for envelope in leftover:
            queue_id = envelope.queue_id
            if self.archive is not None:
                history = await self._db(self.store.attempt_history, queue_id)
                await self.archive.complete_attempts(queue_id, history)
                if not await self.archive.written(queue_id):
                    self.archive.when_archived(queue_id, functools.partial(self._remove, envelope))
                    continue
            ready.append(envelope)
        if ready and self.archive is not None:
            await asyncio.to_thread(self.archive.make_durable)
        for envelope in ready:
            await self._db(self.spool.remove, envelope.queue_id, envelope.size)

    def _add_checked(self, envelope: Envelope, lease: bool) -> bool:
        """In the database thread: record a spooled message, if its envelope passes
        the listener's checks (`Poison` if not)."""
        assert self.store is not None
        problems = check_envelope(envelope)
        if not problems.ok:
            raise Poison(problems)
        return self.store.add(envelope, lease=lease)

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
        if self._attempts:
            _, pending = await asyncio.wait(self._attempts, timeout=grace)
            for t in pending:
                t.cancel()  # not recorded: tried again after restart
        if self.sessions is not None:
            await self.sessions.close()
        if self._retired:
            await asyncio.wait(self._retired, timeout=5)
        await asyncio.sleep(0)  # a removal scheduled for the end of the turn starts
        self._removed_all = True  # later ones (the archive catching up) wait for a start
        self._remover.shutdown(wait=True)  # the removals waiting are done first
        self._crypto.shutdown(wait=True)
        if self.store is not None:
            await self._db(self.store.close)
        self._db_thread.shutdown(wait=True)

    async def enqueue(
        self, queue_id: str, envelope: Envelope | None = None, size: int | None = None
    ) -> None:
        """A message was spooled: record its recipients and try them now.  Without the
        envelope (a worker process spooled it), it is read back from the spool.

        When there is room for more attempts, the recipients are leased as they are
        recorded and their attempts start here, without a trip through `_run`."""
        assert self.store is not None
        lease = not self._stopping and len(self._attempts) < self.config.delivery.concurrency
        try:
            recorded, data, added = await self._commits.run(
                lambda: self._add(queue_id, envelope, size, lease)
            )
        except SpoolError as e:
            log.error(Event.SPOOL_CORRUPT, queue_id=queue_id, error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - a message we cannot take: set aside
            await self._quarantine(queue_id, _why(e))
            return
        if data is not None:
            self._cache_put(recorded, data)
        if added and self.archive is not None:
            self.archive.journal(recorded, data)
        if lease and added:
            now = time.time()
            self._start(
                [
                    RecipientRow(
                        queue_id, idx, r.address, domain_of(r.address), "pending", 0, now, "", ""
                    )
                    for idx, r in enumerate(recorded.recipients)
                ]
            )
        else:
            self._wake.set()

    def _add(
        self, queue_id: str, envelope: Envelope | None, size: int | None, lease: bool
    ) -> tuple[Envelope, bytes | None, bool]:
        """In the database thread: record the message's recipients, reading the
        message when it is small enough to be kept for its first attempt."""
        assert self.store is not None
        data = None
        size = envelope.size if envelope is not None else size
        if size is not None and size <= CACHE_MESSAGE_MAX:
            envelope, data = self.spool.read(queue_id)
        elif envelope is None:
            envelope = read_envelope(self.spool.path_of(queue_id))
        added = self._add_checked(envelope, lease)
        return envelope, data, added

    def _cache_put(self, envelope: Envelope, data: bytes) -> None:
        self._cache[envelope.queue_id] = (envelope, data)
        self._cached_bytes += len(data)
        while self._cached_bytes > CACHE_TOTAL_MAX and self._cache:
            _, (_, old) = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def _forget(self, queue_id: str) -> None:
        self._features.pop(queue_id, None)
        cached = self._cache.pop(queue_id, None)
        if cached is not None:
            self._cached_bytes -= len(cached[1])

    # -- scheduling -----------------------------------------------------------------

    async def _run(self) -> None:
        assert self.store is not None
        last_depth = last_prune = 0.0
        while not self._stopping:
            now = time.time()
            # Claim no more than can start soon: the rest stay in the database.
            room = 2 * self.config.delivery.concurrency - len(self._attempts)
            due = await self._db(self.store.claim, now, room) if room > 0 else []
            self._start(due)
            if now - last_depth >= POLL_INTERVAL:
                last_depth = now
                for state, count in (await self._db(self.store.depth)).items():
                    self.metrics.queue_recipients.labels(state).set(count)
            if now - last_prune >= PRUNE_INTERVAL:
                last_prune = now
                await self._finish_unfinished()
                before = now - self.config.delivery.history_retention
                await self._db(self.store.prune, before)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

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
            task.add_done_callback(self._attempts.discard)

    async def _attempt(self, queue_id: str, domain: str, rows: list[RecipientRow]) -> None:
        recorded = False
        try:
            async with self._total, self._per_domain[domain]:
                envelope, data, final = await self._attempt_locked(queue_id, domain, rows)
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

    async def _attempt_locked(
        self, queue_id: str, domain: str, rows: list[RecipientRow]
    ) -> tuple[Envelope, bytes, list[RecipientRow] | None]:
        """Decide, send and record for ``rows``; the message, and every recipient
        when this made the last of them final (the caller finishes it)."""
        assert self.store is not None
        cached = self._cache.get(queue_id)
        envelope, data = cached if cached is not None else await self._db(self.spool.read, queue_id)
        policy, prober = self.policy, self.prober  # one policy for the whole attempt
        features = await self._features_of(queue_id, policy, data)
        now = time.time()
        decisions: dict[int, Decision] = {}
        facts_of: dict[int, RecipientFacts] = {}
        content_free = envelope.extra.get("purpose") in CONTENT_FREE
        for row in rows:
            if content_free:  # a portal notification or code: nothing to protect
                decisions[row.idx] = CONTENT_FREE_DECISION
                continue
            facts_of[row.idx] = facts = await prober.recipient(row.address)
            evaluation = decide(policy, envelope.mail_from, row.address, features, facts, now)
            if _could_use_discovered_key(policy.discovered_keys, evaluation.decision, facts):
                keys = await prober.keys.discover(row.address)
                if keys.pgp is not None:
                    facts_of[row.idx] = facts = dataclasses.replace(facts, keys=keys)
                    evaluation = decide(
                        policy, envelope.mail_from, row.address, features, facts, now
                    )
            decisions[row.idx] = evaluation.decision
        results: dict[int, RecipientResult] = {}
        transforms: dict[int, dict[str, Any]] = {}
        causes: dict[int, RecipientResult] = {}
        pending = rows
        for _ in range(len(DELIVERY_MODES) + 1):  # each round rules out one more mode
            failed: list[tuple[RecipientRow, RecipientResult]] = []
            tls: dict[tuple[TlsLevel, tuple[str, ...]], list[RecipientRow]] = defaultdict(list)
            for row in pending:
                decision = decisions[row.idx]
                if decision.mode is Mode.TLS:
                    tls[(decision.tls_level, decision.strip_tags)].append(row)
                elif decision.mode in (Mode.SMIME, Mode.PGP):
                    sent = await self._send_encrypted(
                        envelope, data, domain, row, decision, facts_of
                    )
                    if isinstance(sent, RecipientResult):
                        failed.append((row, sent))
                    else:
                        results[row.idx], transforms[row.idx] = sent
                elif decision.mode is Mode.PORTAL and self.portal is not None:
                    results[row.idx], transforms[row.idx] = await self.portal.deposit(
                        envelope, data, row.address, decision.portal_expiry
                    )
                else:
                    results[row.idx] = _not_sent(row.address, decision, causes.get(row.idx))
            for (level, tags), group in tls.items():
                sent_tls = await self._send(envelope, data, domain, group, level, tags)
                for row, result in zip(group, sent_tls, strict=True):
                    if result.tls_failure is not None:
                        failed.append((row, result))
                    else:
                        results[row.idx] = result
            if not failed:
                break
            # The mode decided could not be used (the TLS level was not met on the
            # connection, the key could not be used): learn the facts again and take
            # the next mode - never a lower TLS level, never the original instead.
            if any(decisions[r.idx].mode is Mode.TLS for r, _ in failed):
                prober.forget(domain)
            for row, cause in failed:
                before = decisions[row.idx]
                excluded = (*before.excluded, before.mode)
                facts_of[row.idx] = facts = await prober.recipient(row.address)
                evaluation = decide(
                    policy, envelope.mail_from, row.address, features, facts, now, excluded
                )
                decisions[row.idx] = evaluation.decision
                causes[row.idx] = cause
                self.metrics.policy_fallbacks.labels(evaluation.decision.mode.value).inc()
            pending = [row for row, _ in failed]
        now = time.time()
        records = [
            self._next_state(
                envelope, row, results[row.idx], decisions[row.idx], now, transforms.get(row.idx)
            )
            for row in rows
        ]
        for row, record in zip(rows, records, strict=True):
            self._report(envelope, row, results[row.idx], record, decisions[row.idx], now)
        final = await self._record(queue_id, records, now)
        self._archive_attempt(queue_id, rows, records)
        if final is None and any(r.state in ("deferred", "held") for r in records):
            self._forget(queue_id)  # a retry is minutes away: it reads the spool again
        return envelope, data, final

    async def _record(
        self,
        queue_id: str,
        records: list[AttemptRecord],
        now: float,
        add: Envelope | None = None,
    ) -> list[RecipientRow] | None:
        """Record an attempt's results (`QueueStore.record`; ``add``: the message
        first, in the same transaction).  A write the database refuses (disk full,
        I/O error) is retried until it succeeds, the results waiting in memory and
        the recipients still leased: what was delivered is not delivered again
        because its result could not be written at once."""
        assert self.store is not None
        store, delay = self.store, RECORD_RETRY_FIRST

        def write() -> list[RecipientRow] | None:
            if add is not None:
                store.add(add)
            return store.record(queue_id, records, now)

        while True:
            try:
                return await self._commits.run(write)
            except sqlite3.OperationalError as e:
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
                    "evidence": record.evidence,
                    "decision": record.decision,  # with its reasons and facts
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
                self._scheduled(row, "deferred", "4.3.0", diagnostic, arrival, now, "error")
                for row in rows
            ]
            final = await self._record(queue_id, records, now)
            self._archive_attempt(queue_id, rows, records)
            if final is not None:
                try:
                    envelope, data = await self._db(self.spool.read, queue_id)
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
            records.append(AttemptRecord(idx, "bounced", status, why, None, now, "quarantined"))
        try:  # the message and its bounces in one transaction: never half recorded
            final = await self._record(queue_id, records, now, add=clean)
        except Exception as e:  # noqa: BLE001 - kept in queue/: quarantined at the next start
            log.error(Event.QUEUE_STORE_FAILED, queue_id=queue_id, error=str(e)[:200])
            return
        rows = final if final is not None else await self._db(self.store.recipients, queue_id)
        self._archive_attempt(queue_id, rows, records)
        await self._finish(clean, data, rows, tell_sender=problems.sender is None, quarantined=True)

    async def _signed(self, copy: bytes, changed: bool) -> bytes:
        """A changed copy without the original DKIM signature (it would fail), signed
        with ours when ``dkim.*`` is set; an unchanged one as it is (or signed too
        under ``dkim.sign: all``)."""
        if changed:
            copy = dkim.without_signatures(copy)
        key = self._dkim
        if key is None or not (changed or self.config.dkim.sign == "all"):
            return copy
        try:
            if len(copy) > THREAD_FEATURES_ABOVE:
                signature = await asyncio.to_thread(dkim.sign, copy, key)
            else:
                signature = dkim.sign(copy, key)
        except dkim.DkimError as e:  # e.g. no From field: it goes out unsigned
            log.warning(Event.DKIM_NOT_SIGNED, error=str(e)[:300])
            return copy
        return signature + copy

    def _certificate(self, der: bytes) -> x509.Certificate:
        """The certificate, parsed and checked once; its validity period checked at
        every use (CertificateError when it cannot be used now)."""
        cert = self._certs.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            check(cert)
            if len(self._certs) > 10_000:
                self._certs.clear()
            self._certs[der] = cert
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise CertificateError(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return cert

    async def _send_encrypted(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        row: RecipientRow,
        decision: Decision,
        facts_of: dict[int, RecipientFacts],
    ) -> tuple[RecipientResult, dict[str, Any]] | RecipientResult:
        """Encrypt ``row``'s own copy to its key (S/MIME or PGP, as decided) and deliver
        it; the result and the evidence of the encryption, or (a `RecipientResult`
        alone) why it could not be encrypted - then nothing was sent."""
        mode = decision.mode
        keys = facts_of[row.idx].keys
        info = keys.smime if mode is Mode.SMIME else keys.pgp
        plain = strip_subject_tags(data, decision.strip_tags) if decision.strip_tags else data
        sealed, reason, detail = None, EncryptionFailure.KEY_MISSING, "no key"
        material = await self.prober.keys.material(info) if info is not None else None
        if info is not None and material is not None:
            loop = asyncio.get_running_loop()
            try:
                if mode is Mode.SMIME:
                    cert = self._certificate(material)
                    work = functools.partial(
                        smime.encrypt,
                        plain,
                        cert,
                        signer=self._smime_signer,
                        subject=self._smime_subject,
                    )
                    # a small copy takes well under a millisecond: no thread hand-off
                    big = len(plain) > THREAD_FEATURES_ABOVE or self._smime_signer is not None
                    sealed = await loop.run_in_executor(self._crypto, work) if big else work()
                else:
                    if info.not_after and _expired(info.not_after):
                        raise CertificateError(f"expired on {info.not_after[:10]}")
                    work = functools.partial(
                        self._pgp.encrypt, plain, info.fingerprint, material, self._pgp_signer
                    )
                    # in-process, a fraction of a millisecond for a small copy; larger
                    # ones, and signing, in a thread (over 1 MiB: a gpg subprocess)
                    big = len(plain) > THREAD_FEATURES_ABOVE or self._pgp_signer is not None
                    sealed = await loop.run_in_executor(self._crypto, work) if big else work()
            except (CertificateError, ValueError) as e:
                reason, detail = EncryptionFailure.KEY_INVALID, str(e)
            except (smime.SmimeError, PgpError, OSError) as e:
                reason, detail = EncryptionFailure.ENCRYPT_FAILED, str(e)
        if sealed is None or info is None:
            self.metrics.encryption_errors.labels(mode.value, reason.value).inc()
            log.warning(
                Event.ENCRYPTION_FAILED,
                queue_id=row.queue_id,
                rcpt=self.redact(row.address),
                mode=mode.value,
                reason=reason.value,
                error=detail[:300],
            )
            name = "S/MIME" if mode is Mode.SMIME else "PGP"
            why = f"{name}: {reason.value.replace('_', ' ')}: {detail[:200]}"
            return RecipientResult(row.address, "deferred", "4.7.10", why)
        (result,) = await self._send(
            envelope, sealed, domain, [row], decision.tls_level, (), changed=True
        )
        if result.outcome == "delivered":
            self.metrics.messages_encrypted.labels(mode.value).inc()
        transform = {
            "mode": mode.value,
            "key_fingerprint": info.fingerprint,
            "key_source": info.source,
            "signed": (self._smime_signer if mode is Mode.SMIME else self._pgp_signer) is not None,
            "sent_sha256": hashlib.sha256(sealed).hexdigest(),
            "sent_size": len(sealed),
        }
        return result, transform

    async def _features_of(self, queue_id: str, policy: Policy, data: bytes) -> Features:
        """What the policy reads from the message, once per message and policy."""
        known = self._features.get(queue_id)
        if known is not None and known[0] == policy.stamp:
            return known[1]
        if policy.reads_content and len(data) > THREAD_FEATURES_ABOVE:
            features = await asyncio.to_thread(message_features, policy, data)
        else:
            features = message_features(policy, data)
        if len(self._features) >= FEATURES_MAX:
            self._features.clear()
        self._features[queue_id] = (policy.stamp, features)
        return features

    async def _send(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        rows: list[RecipientRow],
        level: TlsLevel,
        strip_tags: tuple[str, ...],
        changed: bool = False,
    ) -> list[RecipientResult]:
        """Deliver one copy to ``rows`` over TLS at ``level`` (at least); ``changed``:
        the copy is not the message as received (it is signed anew, see `_signed`)."""
        routed = await self.router.route(domain)
        note = ""
        if isinstance(routed, Routed):
            routed, level, note = await self._apply_mta_sts(domain, routed, level)
        addresses = [r.address for r in rows]
        if isinstance(routed, RouteFailure):
            outcome: Outcome = "bounced" if routed.permanent else "deferred"
            results = [RecipientResult(a, outcome, routed.status, routed.reason) for a in addresses]
        else:
            body = strip_subject_tags(data, strip_tags) if strip_tags else data
            body = await self._signed(body, changed or bool(strip_tags))
            sent = envelope.trace_headers.encode("utf-8", "surrogateescape") + body
            copy_sha256 = None
            if (changed or body is not data) and self.archive is not None:
                # not the message as received: the archive keeps the copy as sent
                copy_sha256 = hashlib.sha256(sent).hexdigest()
                self.archive.copy(envelope.queue_id, sent)
            results = await deliver(
                routed,
                level,
                envelope.mail_from,
                addresses,
                sent,
                self.settings,
                self.resolver,
                smtputf8="SMTPUTF8" in envelope.mail_options,
                eightbit="BODY=8BITMIME" in envelope.mail_options,
                sessions=self.sessions,
                metrics=self.metrics,
            )
            if copy_sha256 is not None:
                results = [dataclasses.replace(r, copy_sha256=copy_sha256) for r in results]
            for result in results:
                ev = result.evidence
                tls_version = Metrics.tls_label(ev.tls_version if ev else None)
                self.metrics.delivery_attempts.labels(
                    result.outcome, level.label, tls_version
                ).inc()
        if note:
            results = [_with_mta_sts(r, note) for r in results]
        return results

    async def _apply_mta_sts(
        self, domain: str, routed: Routed, level: TlsLevel
    ) -> tuple[Routed | RouteFailure, TlsLevel, str]:
        """RFC 8461 for mail routed by MX records: under an ``enforce`` policy only
        the policy's MX hosts, at least at the ``mta-sts`` level (verified TLS, never
        lower); ``testing`` is noted in the evidence and changes nothing.  Routes and
        the smart host are the administrator's choice: no policy lookup."""
        if not self.config.mta_sts.enabled or routed.hops[0].via not in ("mx", "implicit-mx"):
            return routed, level, ""
        assert self.sts is not None
        sts = await self.sts.policy(domain)
        self.metrics.mta_sts_lookups.labels(sts.source.value).inc()
        if sts.policy is None or sts.policy.mode is StsMode.NONE:
            return routed, level, ""
        note = f"{sts.policy.mode.value} id={sts.policy_id} ({sts.source.value})"
        if not sts.enforced:
            return routed, level, note
        allowed = tuple(h for h in routed.hops if sts.policy.matches(h.host))
        if not allowed:
            reason = f"no MX host of {domain} matches its MTA-STS policy (id={sts.policy_id})"
            return RouteFailure(False, "4.7.5", reason), level, note
        return dataclasses.replace(routed, hops=allowed), max(level, TlsLevel.MTA_STS), note

    def _next_state(
        self,
        envelope: Envelope,
        row: RecipientRow,
        result: RecipientResult,
        decision: Decision,
        now: float,
        transform: dict[str, Any] | None = None,
    ) -> AttemptRecord:
        scheduled = self._scheduled(
            row,
            result.outcome,
            result.status,
            result.diagnostic,
            _timestamp(envelope.received_at),
            now,
            result.outcome,
        )
        evidence = evidence_dict(result.evidence) or {}
        evidence["decision"] = {
            "mode": decision.mode.value,
            "rule": decision.rule,
            "tls_level": decision.tls_level.label,
            "level_source": decision.level_source,
            "policy": decision.policy,
        }
        if transform is not None:
            evidence["encryption"] = transform
        if result.copy_sha256 is not None:
            evidence["copy_sha256"] = result.copy_sha256
        return dataclasses.replace(scheduled, evidence=evidence, decision=decision.to_dict())

    def _scheduled(
        self,
        row: RecipientRow,
        state: str,
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
        if state in ("deferred", "held"):
            if now - arrival >= self.config.delivery.max_queue_lifetime:
                state, status = "expired", "4.4.7"
                diagnostic = f"delivery time expired; last error: {diagnostic}"
            else:
                schedule = self.config.delivery.retry_schedule
                wait = schedule[min(row.attempts, len(schedule) - 1)]
                next_attempt = now + wait * self._rng.uniform(0.9, 1.1)
        return AttemptRecord(row.idx, state, status, diagnostic, None, next_attempt, outcome)

    def _report(
        self,
        envelope: Envelope,
        row: RecipientRow,
        result: RecipientResult,
        record: AttemptRecord,
        decision: Decision,
        now: float,
    ) -> None:
        ev = result.evidence
        self.metrics.policy_decisions.labels(decision.mode.value, decision.rule).inc()
        if record.state not in ("deferred", "held"):
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

    def _remove(self, envelope: Envelope) -> None:
        """Remove a done message's spool file, in the background (one job for all
        that are waiting); if the process dies first, the next start removes it
        (`_reconcile`), as it does for a message whose archive records were written
        only while the gateway stopped."""
        if not self._removed_all:
            self._removals.post(lambda: self.spool.remove(envelope.queue_id, envelope.size))

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
        failed = [r for r in rows if r.state in ("bounced", "expired")]
        dsn_sent = False
        if failed and envelope.mail_from and tell_sender:
            report = build_dsn(
                sender=envelope.mail_from,
                reporting_mta=self.hostname,
                queue_id=envelope.queue_id,
                arrival=envelope.received_at,
                original=data,
                failed=[FailedRecipient(r.address, r.status, r.diagnostic) for r in failed],
            )
            dsn_id = await self.inject("", [envelope.mail_from], report)
            self.metrics.dsn_sent.inc()
            log.info(
                Event.DSN_SENT, queue_id=envelope.queue_id, dsn_queue_id=dsn_id, failed=len(failed)
            )
            dsn_sent = True
        if failed or recovering:
            await self._db(self.store.finish, envelope.queue_id, dsn_sent)
        if quarantined:
            dispose: Callable[[], None] = lambda: self.spool.quarantine(  # noqa: E731
                envelope.queue_id, envelope.size
            )
        else:
            dispose = lambda: self._remove(envelope)  # noqa: E731
        if self.archive is None:
            dispose()
        else:  # the spool keeps it until every record of it is in the archive
            self.archive.when_archived(envelope.queue_id, dispose)
        log.info(
            Event.MESSAGE_DONE,
            queue_id=envelope.queue_id,
            delivered=sum(r.state == "delivered" for r in rows),
            failed=len(failed),
        )


CONTENT_FREE_DECISION = Decision(
    mode=Mode.TLS,
    tls_level=TlsLevel.MAY,
    fallback=Mode.HOLD,
    rule="portal-message",
    reasons=("a portal notification or code carries no message content: sent as it is",),
    level_source="portal",
    candidates=(Mode.TLS,),
)


def _not_sent(
    address: str, decision: Decision, cause: RecipientResult | None = None
) -> RecipientResult:
    """The result for a recipient the decision does not send to over TLS now.
    ``cause``: the delivery failure that moved it off TLS."""
    after = f" (after: {cause.status} {cause.diagnostic[:200]})" if cause else ""
    evidence = cause.evidence if cause else None
    rule = f"rule {decision.rule}" if decision.rule != "defaults" else "the policy defaults"
    if decision.mode is Mode.BOUNCE:
        passed = "; ".join(r for r in decision.reasons if not r.startswith("no allowed mode"))
        why = f"no secure way to deliver is allowed by {rule} ({passed[:300]}){after}"
        return RecipientResult(address, "bounced", "5.7.10", why, evidence)
    if decision.mode is Mode.HOLD:
        passed = "; ".join(r for r in decision.reasons if not r.startswith("no allowed mode"))
        why = f"held by {rule}: no allowed mode can be used now ({passed[:300]}){after}"
    else:
        why = (
            f"held: {rule} decided {decision.mode.value}, but the portal is not enabled "
            f"(portal.enabled){after}"
        )
    return RecipientResult(address, "held", "4.7.10", why, evidence)


def _with_mta_sts(result: RecipientResult, note: str) -> RecipientResult:
    if result.evidence is None:
        return dataclasses.replace(result, diagnostic=f"{result.diagnostic} [MTA-STS {note}]")
    return dataclasses.replace(result, evidence=dataclasses.replace(result.evidence, mta_sts=note))


def _could_use_discovered_key(allowed: bool, decision: Decision, facts: RecipientFacts) -> bool:
    """A PGP key found now (WKD) could change ``decision``: the policy uses discovered
    keys, PGP is allowed, and the mode chosen comes after it (portal, hold, bounce)."""
    if not allowed or facts.keys.pgp is not None or Mode.PGP not in decision.candidates:
        return False
    return decision.mode not in (Mode.TLS, Mode.SMIME)


def _expired(not_after: str) -> bool:
    when = datetime.datetime.fromisoformat(not_after)
    return when <= datetime.datetime.now(datetime.UTC)


def _timestamp(received_at: str) -> float:
    return datetime.datetime.fromisoformat(received_at).timestamp()


class Poison(Exception):  # noqa: N818 - what it is, not an error of ours
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
