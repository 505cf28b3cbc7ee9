"""queue manager - schedule deliveries, retry, expire and bounce, per recipient.

The manager runs in the main process.  It learns of every spooled message (at start,
by reconciling the spool with the state store; then from each "queued" event), and
repeatedly takes the recipients that are due, grouped by message and recipient
domain so that recipients who share a destination go in one SMTP transaction.

For each group: route the domain (`gateway.delivery.router`), choose the TLS level
(``delivery.tls_policy`` for the domain, else ``delivery.tls_level``), deliver
(`gateway.delivery.client`), and record every recipient's result with its evidence in
one state-store transaction.  Deferred recipients get their next attempt from
``delivery.retry_schedule`` (with up to 10% jitter); past
``delivery.max_queue_lifetime`` they expire.  When every recipient of a message is
final, failed ones are reported to the sender in one DSN (never for a null sender),
and the spool file is removed.

At-least-once: a result is recorded only after the remote server answered; a crash
in between means the recipient is tried again.  Concurrency is bounded in total
(``delivery.concurrency``) and per domain (``delivery.concurrency_per_destination``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.config import Config
from gateway.delivery.client import ClientSettings, Outcome, RecipientResult, deliver
from gateway.delivery.dsn import FailedRecipient, build_dsn
from gateway.delivery.router import RouteFailure, Router
from gateway.delivery.tls_policy import TlsLevel
from gateway.errors import SpoolError
from gateway.events import Event
from gateway.model import Envelope
from gateway.observability.logging import AddressRedactor, get_logger
from gateway.observability.metrics import Metrics
from gateway.probe.dns import Resolver
from gateway.queue.store import FINAL_STATES, QueueStore, RecipientRow, evidence_dict
from gateway.spool import Spool

log = get_logger("gateway.queue")
T = TypeVar("T")

POLL_INTERVAL = 1.0  # also picks up `sealgate queue retry/hold/release/delete`


class QueueManager:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        redact: AddressRedactor,
        hostname: str,
        inject: Callable[[str, list[str], bytes], Awaitable[str]],
    ):
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.redact = redact
        self.hostname = hostname
        self.inject = inject  # spools a message we generate (DSNs); returns its queue id
        self.apply(config)
        dc = config.delivery
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-db")
        self.store: QueueStore | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._finishing: dict[str, asyncio.Lock] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._total = asyncio.Semaphore(dc.concurrency)
        self._per_domain: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(dc.concurrency_per_destination)
        )
        self._rng = random.Random()  # noqa: S311 - retry jitter, not security

    def apply(self, config: Config) -> None:
        """Take routes, TLS levels, resolvers and timeouts from ``config`` (start, SIGHUP).

        Attempts in progress finish with the settings they started with; every attempt
        that starts afterwards uses the new ones.
        """
        self.config = config
        dc = config.delivery
        self.resolver = Resolver(config.dns.nameservers)
        self.router = Router(self.resolver, dc.port, config.routes, dc.smart_host, dc.max_mx_hosts)
        self.settings = ClientSettings(
            self.hostname, config.tls.ca_file, dc.connect_timeout, dc.command_timeout
        )

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.state_dir / "queue.db"
        self.store = await self._db(QueueStore, path)
        await self._db(self.store.release_leases)
        added = await self._db(self._reconcile)
        log.info(Event.QUEUE_STARTED, reconciled=added)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _reconcile(self) -> int:
        assert self.store is not None
        known, added = self.store.known(), 0
        for item in self.spool.envelopes():
            if isinstance(item, Envelope) and item.queue_id not in known:
                added += self.store.add(item)
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
        if self._attempts:
            _, pending = await asyncio.wait(self._attempts, timeout=grace)
            for t in pending:
                t.cancel()  # not recorded: tried again after restart
        if self.store is not None:
            await self._db(self.store.close)
        self._db_thread.shutdown(wait=True)

    async def enqueue(self, queue_id: str, envelope: Envelope | None = None) -> None:
        """A message was spooled: record its recipients and try them now.  Without the
        envelope (a worker process spooled it), it is read back from the spool."""
        if envelope is None:
            try:
                envelope = await self._db(lambda: self.spool.read(queue_id, verify=False)[0])
            except SpoolError as e:
                log.error(Event.SPOOL_CORRUPT, queue_id=queue_id, error=str(e))
                return
        assert self.store is not None
        await self._db(self.store.add, envelope)
        self._wake.set()

    # -- scheduling -----------------------------------------------------------------

    async def _run(self) -> None:
        assert self.store is not None
        while not self._stopping:
            now = time.time()
            # Claim no more than can start soon: the rest stay in the database.
            room = 2 * self.config.delivery.concurrency - len(self._attempts)
            due = await self._db(self.store.claim, now, room) if room > 0 else []
            groups: dict[tuple[str, str], list[RecipientRow]] = defaultdict(list)
            for row in due:
                groups[(row.queue_id, row.domain)].append(row)
            for (queue_id, domain), rows in groups.items():
                task = asyncio.get_running_loop().create_task(self._attempt(queue_id, domain, rows))
                self._attempts.add(task)
                task.add_done_callback(self._attempts.discard)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

    async def _attempt(self, queue_id: str, domain: str, rows: list[RecipientRow]) -> None:
        try:
            async with self._total, self._per_domain[domain]:
                await self._attempt_locked(queue_id, domain, rows)
        except Exception as e:  # fail closed: record nothing, try again later
            assert self.store is not None
            await self._db(
                self.store.release_leases, queue_id, [r.idx for r in rows], time.time() + 60
            )
            log.error(
                Event.DELIVERY_ERROR,
                queue_id=queue_id,
                error_type=type(e).__name__,
                error=str(e)[:300],
            )
        finally:
            self._wake.set()  # room for the next claim

    async def _attempt_locked(self, queue_id: str, domain: str, rows: list[RecipientRow]) -> None:
        envelope, data = await self._db(self.spool.read, queue_id)
        level = TlsLevel.parse(
            self.config.delivery.tls_policy.get(domain, self.config.delivery.tls_level)
        )
        routed = await self.router.route(domain)
        addresses = [r.address for r in rows]
        if isinstance(routed, RouteFailure):
            outcome: Outcome = "bounced" if routed.permanent else "deferred"
            results = [RecipientResult(a, outcome, routed.status, routed.reason) for a in addresses]
        else:
            results = await deliver(
                routed,
                level,
                envelope.mail_from,
                addresses,
                envelope.trace_headers.encode("utf-8", "surrogateescape") + data,
                self.settings,
                self.resolver,
                smtputf8="SMTPUTF8" in envelope.mail_options,
                eightbit="BODY=8BITMIME" in envelope.mail_options,
            )
        for row, result in zip(rows, results, strict=True):
            await self._record(envelope, row, result, level)
        await self._maybe_finish(envelope, data)

    async def _record(
        self, envelope: Envelope, row: RecipientRow, result: RecipientResult, level: TlsLevel
    ) -> None:
        assert self.store is not None
        now = time.time()
        state: str = result.outcome
        status, diagnostic = result.status, result.diagnostic
        next_attempt = now
        if state == "deferred":
            arrived = datetime.datetime.fromisoformat(envelope.received_at).timestamp()
            if now - arrived >= self.config.delivery.max_queue_lifetime:
                state, status = "expired", "4.4.7"
                diagnostic = f"delivery time expired; last error: {diagnostic}"
            else:
                schedule = self.config.delivery.retry_schedule
                wait = schedule[min(row.attempts, len(schedule) - 1)]
                next_attempt = now + wait * self._rng.uniform(0.9, 1.1)
        await self._db(
            self.store.record,
            row.queue_id,
            row.idx,
            state,
            status,
            diagnostic,
            evidence_dict(result.evidence),
            next_attempt,
            result.outcome,
            now,
        )
        self.metrics.delivery_attempts.labels(result.outcome).inc()
        ev = result.evidence
        log.info(
            Event.DELIVERY_ATTEMPT,
            queue_id=row.queue_id,
            rcpt=self.redact(row.address),
            outcome=state,
            status=status,
            level=level.label,
            mx=ev.mx_host if ev else None,
            ip=ev.ip if ev else None,
            tls_version=ev.tls_version if ev else None,
        )

    async def _maybe_finish(self, envelope: Envelope, data: bytes) -> None:
        # Attempts for several domains of one message end concurrently: they check in
        # turn, so the message is finished exactly once, by the last of them.
        lock = self._finishing.setdefault(envelope.queue_id, asyncio.Lock())
        try:
            async with lock:
                await self._finish(envelope, data)
        finally:
            if not lock.locked() and self._finishing.get(envelope.queue_id) is lock:
                del self._finishing[envelope.queue_id]

    async def _finish(self, envelope: Envelope, data: bytes) -> None:
        assert self.store is not None
        message = await self._db(self.store.message, envelope.queue_id)
        if message is None or message["done"]:
            return
        rows = await self._db(self.store.recipients, envelope.queue_id)
        if not rows or any(r.state not in FINAL_STATES for r in rows):
            return
        failed = [r for r in rows if r.state in ("bounced", "expired")]
        dsn_sent = False
        if failed and envelope.mail_from:
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
        await self._db(self.store.finish, envelope.queue_id, dsn_sent)
        await self._db(self.spool.remove, envelope.queue_id, envelope.size)
        log.info(
            Event.MESSAGE_DONE,
            queue_id=envelope.queue_id,
            delivered=sum(r.state == "delivered" for r in rows),
            failed=len(failed),
        )
