"""dispatcher - posts the outbox's events to their endpoints (in the main process,
or with ``smtp.workers`` above 1 in a process of its own at a lower priority than
mail - `gateway.smtp.workers` ``--webhooks-only`` - which the main process wakes
over the control socket when it wrote events).

Each round takes the due events (`Outbox.due`: a message's oldest pending one per
endpoint, 500 at most) - on PostgreSQL leasing them to this node (`Outbox.take`:
nodes side by side), on SQLite only reading them (one node, whose one dispatcher
runs a round at a time: a write transaction fewer beside the queue's each round) -
and posts them: the endpoints side by side, each endpoint's events spread over up
to 16 kept-alive connections (`gateway.webhooks.http`), at first one request at a
time on each, then, while the endpoint takes all it is sent, twice as many back to
back each time, up to 16 (one again after a refusal; names resolved through
``dns.nameservers``, certificates verified against the system's CAs and
``tls.ca_file``) - and settles them: a 2xx answer deletes the event, anything else
(or no answer within 15 s) sets its next try from ``webhooks.retry_schedule`` (the
last wait repeats), until
``webhooks.max_age`` has passed: then it is dropped, logged (``webhook.dropped``)
and counted.  An endpoint that does not answer at all (no connection, TLS refused,
silence, garbage) or says it takes nothing now (429, 503) is not sent the rest of
its events in that round: they wait for the same next try (longer if its
Retry-After asks, up to an hour), their tries not counted - so a round lasts at
most about one timeout, an endpoint that is down does not hold up the others'
events, and one that is overloaded is not pressed further (what was already sent
behind the refused request is answered, and counted as tried).  A round that posted
something is followed 50 ms later by the next (a message's next event is due now),
250 ms later when it carried 50 events or more (under load: fewer, larger rounds);
otherwise the dispatcher waits for the queue to write events, or a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

from gateway.config import Config
from gateway.events import Event
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.probe.dns import Resolver
from gateway.storage.database import StorageError
from gateway.tls import client_context
from gateway.webhooks import ROUND_GAP, http
from gateway.webhooks.events import Endpoint, Events, endpoints_of, signature
from gateway.webhooks.outbox import Outbox, Pending

log = get_logger("gateway.webhooks")
T = TypeVar("T")

POST_TIMEOUT = 15.0
LEASE = 120.0  # an event taken by a node is its own this long (then any node's)
TAKE = 500  # events a round, at most
CONCURRENCY = 16  # connections per endpoint
DEPTH = 16  # requests sent back to back on one, at most
IDLE_WAIT = 1.0
# a round of this many events or more (under load) is followed by the next after
# BUSY_ROUND_GAP, not ROUND_GAP: fewer, larger rounds (a round's transactions and
# connections' writes cost about as much for 10 events as for 200)
BUSY_ROUND = 50
BUSY_ROUND_GAP = 0.25
GAUGE_INTERVAL = 15.0
# answers about the endpoint, not the event: the round's other events wait too - as
# long as its Retry-After says, if longer than the retry schedule's wait (to a limit)
ENDPOINT_BUSY = frozenset({429, 503})
RETRY_AFTER_MOST = 3600.0


class _Posted(NamedTuple):
    """What came of posting one event."""

    text: str  # "posted", or why not
    taking: bool = True  # False: the endpoint did not answer, or said it takes nothing
    retry_after: float | None = None  # the wait it asked for


class Dispatcher:
    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        node: str,
        metrics: Metrics,
        resolver: Callable[[], Resolver],
        clock: Callable[[], float] = time.time,
    ):
        self.outbox, self.node, self.metrics = outbox, node, metrics
        self.resolver, self.clock = resolver, clock
        self.apply(config)
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()  # the event loop's
        self._task: asyncio.Task[None] | None = None
        self._gauged = 0.0
        self._taken = 0  # events in the last round
        self._known: set[str] = set()
        # set when an SMTP worker process posts the events (smtp.workers > 1): this
        # one then only writes the portal's events and passes wake-ups on
        self.remote_wake: Callable[[], None] | None = None
        # one thread for the outbox's connection: the dispatcher's and emit's calls -
        # made now, with the priority of the thread making the dispatcher (the webhook
        # process lowers its event loop's after: `gateway.smtp.workers._post_webhooks`)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="webhooks")
        self._thread.submit(lambda: None).result()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._thread, fn, *args)

    async def emit(self, queue_id: str, kind: str, data: dict[str, Any]) -> None:
        """An event from outside the queue (the portal's), written on its own."""
        rows = Events(tuple(self.endpoints.values())).rows(queue_id, kind, data)
        if rows:
            await self._db(self.outbox.add, rows, self.clock())
            self.wake()

    def apply(self, config: Config, endpoints: Sequence[Endpoint] | None = None) -> None:
        """The endpoints, their secrets and the retry settings (start, SIGHUP;
        ``endpoints``: read from ``config`` already).  ConfigError before anything
        changes when a secret cannot be read."""
        found = endpoints_of(config) if endpoints is None else endpoints
        self.config, self.endpoints = config, {e.name: e for e in found}
        self.schedule = config.webhooks.retry_schedule
        self.max_age = config.webhooks.max_age
        self._ctx = client_context(config.tls.ca_file)
        old: dict[str, http.Endpoint] = getattr(self, "_pools", {})
        self._pools: dict[str, http.Endpoint] = {}
        for pool in old.values():  # made under the old settings (CA file, resolvers)
            pool.close_soon()
        self._depth: dict[str, int] = {}  # per endpoint: requests back to back now
        self._one_at_a_time: set[str] = set()  # endpoints whose server takes no more

    def wake(self) -> None:
        """Events were written (from any thread; from the event loop's own, without
        a write to its self-pipe)."""
        wake = self._wake.set if self.remote_wake is None else self.remote_wake
        if threading.get_ident() == self._thread_id:
            wake()
        else:
            self._loop.call_soon_threadsafe(wake)

    def start(self) -> None:
        self._task = self._loop.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in self._pools.values():
            await pool.close()
        await self._db(self.outbox.close)
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            # cleared before the round: events written while it reads the outbox (and
            # finds nothing) wake the next one - cleared after, they waited IDLE_WAIT
            self._wake.clear()
            try:
                busy = await self.round()
            except StorageError as e:  # the events wait in the store
                log.warning(Event.WEBHOOK_ERROR, error=str(e)[:300])
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_WAIT)
            # the events of the next few milliseconds go in one round: fewer, larger
            # transactions beside the queue's own in the same database - under load
            # (a round of BUSY_ROUND events or more) a quarter of a second's
            await asyncio.sleep(BUSY_ROUND_GAP if self._taken >= BUSY_ROUND else ROUND_GAP)

    async def round(self) -> bool:
        """Post what is due; whether anything was."""
        now = self.clock()
        if now - self._gauged >= GAUGE_INTERVAL:
            await self._gauge(now)
        if self.outbox.shared:  # nodes side by side: each leases what it posts
            mine = await self._db(self.outbox.take, self.node, now, now + LEASE, TAKE)
        else:  # the only dispatcher of its database, a round at a time: nothing to lease
            mine = await self._db(self.outbox.due, now, TAKE)
        self._taken = len(mine)
        if not mine:
            return False
        results: list[_Posted | None] = [None] * len(mine)  # None: not tried
        by_endpoint: dict[str, list[int]] = {}
        for i, event in enumerate(mine):
            by_endpoint.setdefault(event.endpoint, []).append(i)
        await asyncio.gather(*(self._post_all(mine, at, results) for at in by_endpoint.values()))
        await self._settle(mine, results)
        return bool(mine)

    async def _post_all(
        self, events: list[Pending], at: list[int], results: list[_Posted | None]
    ) -> None:
        """One endpoint's events of a round, spread over up to CONCURRENCY
        connections in groups sent back to back (as many as the endpoint is taking
        now, at most DEPTH: `_post`), each poster taking the next group when its
        last is answered - none more once the endpoint is not taking events (the
        rest stay None)."""
        name = events[at[0]].endpoint
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            for i in at:
                results[i] = _Posted(f"endpoint {name!r} is no longer configured")
            return
        pool = self._pools.get(name)
        if pool is None or pool.url != endpoint.url:
            pool = self._pools[name] = http.Endpoint(endpoint.url, self._ctx, self.resolver())
        size = max(1, min(self._depth.get(name, 1), -(-len(at) // CONCURRENCY)))
        groups = [at[k : k + size] for k in range(0, len(at), size)]
        order = iter(groups)
        refusing = False

        async def poster() -> None:
            nonlocal refusing
            for group in order:
                if refusing:
                    return
                posted = await self._post(endpoint, pool, [events[i] for i in group])
                for i, result in zip(group, posted, strict=True):
                    results[i] = result
                    refusing = refusing or (result is not None and not result.taking)

        await asyncio.gather(*(poster() for _ in range(min(CONCURRENCY, len(groups)))))

    async def _settle(self, events: list[Pending], results: list[_Posted | None]) -> None:
        now = self.clock()
        posted, retry, dropped = [], [], []
        outcomes: Counter[tuple[str, str]] = Counter()
        # why an endpoint stopped taking events: its events not tried wait as long
        # as the one it refused, and carry its error
        refusals = {
            e.endpoint: (r, e.tries)
            for e, r in zip(events, results, strict=True)
            if r is not None and not r.taking
        }
        for event, found in zip(events, results, strict=True):
            tried = found is not None
            if found is not None and found.text == "posted":
                posted.append(event.id)
                outcome = "posted"
            else:
                tries = event.tries
                if found is None:
                    refused, tries = refusals[event.endpoint]
                    found = refused._replace(text=f"not tried: {refused.text}")
                result = found.text
                wait = float(self.schedule[min(tries, len(self.schedule) - 1)])
                if found.retry_after is not None:  # the endpoint asked for a pause
                    wait = max(wait, min(found.retry_after, RETRY_AFTER_MOST))
                if (
                    now + wait > event.created + self.max_age
                    or event.endpoint not in self.endpoints
                ):
                    dropped.append((event.id, result[:300]))
                    outcome = "dropped"
                    log.warning(
                        Event.WEBHOOK_DROPPED,
                        endpoint=event.endpoint,
                        event_id=event.event_id,
                        queue_id=event.queue_id,
                        type=event.type,
                        tries=event.tries + 1,
                        error=result[:300],
                    )
                else:
                    retry.append((event.id, now + wait, result[:300], tried))
                    outcome = "failed" if tried else "not-tried"
            outcomes[event.endpoint, outcome] += 1
        for labels, count in outcomes.items():
            self.metrics.webhook_posts.labels(*labels).inc(count)
        await self._db(self.outbox.settle, posted, retry, dropped)

    async def _post(
        self, endpoint: Endpoint, pool: http.Endpoint, events: list[Pending]
    ) -> list[_Posted | None]:
        """POST ``events`` back to back: what came of each - "posted", or why not;
        after one the endpoint did not answer, None (not tried)."""
        stamp = int(self.clock())
        requests = []
        for event in events:
            body = event.payload.encode()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "sealgate",
                "webhook-id": event.event_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": signature(endpoint.mac, event.event_id, stamp, body),
            }
            requests.append(pool.request(body, headers))
        answers, error = await pool.post_all(requests, POST_TIMEOUT)
        if not pool.pipelining and endpoint.name not in self._one_at_a_time:
            self._one_at_a_time.add(endpoint.name)  # said once
            log.warning(Event.WEBHOOK_PIPELINING_OFF, endpoint=endpoint.name)
        found: list[_Posted | None] = []
        for answer in answers:
            if 200 <= answer.status < 300:
                found.append(_Posted("posted"))
            else:
                busy = answer.status in ENDPOINT_BUSY
                found.append(
                    _Posted(f"HTTP {answer.status}", not busy, answer.retry_after if busy else None)
                )
        if error is not None:
            if isinstance(error, TimeoutError):
                found.append(_Posted(f"no answer within {POST_TIMEOUT:g} s", taking=False))
            else:
                found.append(_Posted(str(error)[:300], taking=False))
            found += [None] * (len(events) - len(found))
        # more back to back while all are taken (to DEPTH), one again after a refusal
        if all(f is not None and f.text == "posted" for f in found):
            self._depth[endpoint.name] = min(
                2 * self._depth.get(endpoint.name, 1), DEPTH if pool.pipelining else 1
            )
        else:
            self._depth[endpoint.name] = 1
        return found

    async def _gauge(self, now: float) -> None:
        self._gauged = now
        await self._db(self.outbox.release_stranded)
        backlog = await self._db(self.outbox.backlog)
        for name in self._known | set(backlog) | set(self.endpoints):
            pending, oldest = backlog.get(name, (0, None))
            self.metrics.webhook_backlog.labels(name).set(pending)
            age = max(0.0, now - oldest) if oldest is not None else 0.0
            self.metrics.webhook_oldest.labels(name).set(age)
        self._known |= set(backlog) | set(self.endpoints)
