"""service - TLS-RPT in the running gateway (``tlsrpt.enabled``).

Counting: delivery asks `observe` what to count a destination's sessions under
and counts each new session into a tally in memory (no I/O on the mail path);
every minute the tally is added to the shared counts (`TlsRptStore`), and at stop.

Reporting: five minutes after midnight UTC (every node has flushed the day's last
counts by then), each domain with counts for a past day gets its report, sent by
whichever node claims it first: the ``rua`` URIs of its ``_smtp._tls`` record
(RFC 8460 3: exactly one ``v=TLSRPTv1`` record, else the domain does not ask).
``mailto:`` reports are queued like any message the gateway writes (journaled,
delivered over TLS when offered but held to no TLS policy: RFC 8460 5.3);
``https:`` ones are POSTed (``application/tlsrpt+gzip``), archived as sent with
each POST's result, and retried for a day.  A domain whose record cannot be looked
up now is tried again at the next round; one without a record is recorded as such.
Domains are reported `SEND_AT_ONCE` at a time: one whose DNS is slow or whose
receiver hangs (up to `POST_TIMEOUT`) does not hold up the others.  The report
store is used from one thread of its own, one call after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.config import Config
from gateway.events import Event
from gateway.model import ClientInfo, Envelope, Purpose
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.probe.dns import LookupStatus, Resolver
from gateway.probe.mta_sts import StsMode, StsResult
from gateway.spool.store import new_queue_id
from gateway.storage.database import StorageError
from gateway.storage.stores import Storage
from gateway.tls import client_context
from gateway.tlsrpt.model import (
    REPORT_MEDIA_TYPE,
    Failure,
    Observation,
    Reporter,
    ReportPolicy,
    ResultType,
    Tally,
    gzipped,
    new_report_id,
    parse_record,
    report_json,
    report_mail,
    sts_policy,
)
from gateway.tlsrpt.store import KEEP_DAYS, TlsRptStore
from gateway.webhooks import http

T = TypeVar("T")
log = get_logger("gateway.tlsrpt")

FLUSH_INTERVAL = 60.0
SEND_AFTER = 300.0  # seconds into the UTC day: every node has flushed the last one
HTTPS_RETRIES = (300.0, 1800.0, 7200.0, 21600.0, 43200.0)  # then given up (a day)
POST_TIMEOUT = 60.0
SEND_AT_ONCE = 8  # domains whose reports are sent side by side


class Queue(Protocol):
    async def submit(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        purpose: Purpose,
        extra: dict[str, Any] | None = None,
    ) -> str: ...


class Journal(Protocol):
    def journal(self, envelope: Envelope, data: bytes | None) -> None: ...

    def attempt(self, queue_id: str, recipients: list[dict[str, Any]]) -> None: ...


def reporter_of(config: Config, hostname: str) -> Reporter:
    return Reporter(
        config.tlsrpt.organization or config.portal.organization,
        config.tlsrpt.contact or f"postmaster@{hostname}",
    )


def day_of(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


def _day_start(day: str) -> float:
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return start.timestamp()


@dataclass(frozen=True)
class Sent:
    """What became of one domain's report."""

    domain: str
    day: str
    state: str  # sent, no-rua, retry, failed
    detail: dict[str, Any]


class TlsRptService:
    def __init__(
        self,
        config: Config,
        hostname: str,
        metrics: Metrics,
        queue: Queue,
        journal: Journal | None,
        resolver: Callable[[], Resolver],
        clock: Callable[[], float] = time.time,
    ):
        self.config, self.hostname, self.metrics = config, hostname, metrics
        self.queue, self.journal, self.resolver, self.clock = queue, journal, resolver, clock
        self.reporter = reporter_of(config, hostname)
        self.storage = Storage(config)
        self.tally = Tally()
        self.store: TlsRptStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one round at a time
        # the store's connection is used by one thread, one call at a time
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tlsrpt")

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def apply(self, config: Config) -> None:
        """SIGHUP: the organization, contact and CA file of later reports."""
        self.config, self.reporter = config, reporter_of(config, self.hostname)

    # -- counting (the mail path) -----------------------------------------------------

    def observe(self, domain: str, sts: StsResult | None) -> Observation:
        """What delivery to ``domain`` counts its sessions under (`gateway.delivery`):
        its MTA-STS policy in enforce or testing mode (DANE is per MX host, found
        by delivery).  A policy that could not be fetched is counted here, once."""
        policy, testing = None, False
        if sts is not None and sts.policy is not None and sts.policy.mode is not StsMode.NONE:
            policy = sts_policy(domain, sts.policy)
            testing = sts.policy.mode is StsMode.TESTING
        if sts is not None and sts.failure and sts.policy is None:
            self.count(ReportPolicy(domain, "sts"), Failure(ResultType(sts.failure)))
        return Observation(domain, policy, testing, self.count)

    def count(self, policy: ReportPolicy, failure: Failure | None) -> None:
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        self.tally.add(policy, failure, now)
        result = failure.result.value if failure else "success"
        self.metrics.tlsrpt_sessions.labels(policy.kind, result).inc()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.store = await self._db(lambda: TlsRptStore(self.storage.open("queue")))
        self._task = asyncio.get_running_loop().create_task(self._periodic())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StorageError):
            await self.flush()
        if self.store is not None:
            await self._db(self.store.close)
        self._thread.shutdown(wait=True)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.run_once()
            except StorageError as e:  # the counts stay in memory; next round
                log.warning(Event.TLSRPT_ERROR, error=str(e)[:300])

    async def flush(self) -> None:
        """Add the counts kept in memory to the shared ones."""
        if not self.tally or self.store is None:
            return
        rows = self.tally.drain()
        try:
            await self._db(self.store.add, rows)
        except StorageError:
            self.tally.restore(rows)  # kept for the next flush
            raise

    async def run_once(self) -> list[Sent]:
        """Flush, then send the reports that are due and retry failed POSTs."""
        async with self._lock:
            await self.flush()
            assert self.store is not None
            now = self.clock()
            today = day_of(now)
            until = today if now - _day_start(today) >= SEND_AFTER else day_of(now - 86400)
            due = await self._db(self.store.due, until)
            sent = await _side_by_side([self._send(day, domain, now) for day, domain in due])
            sent += await self._retry(now)
            oldest = day_of(now - KEEP_DAYS * 86400)
            await self._db(self.store.prune, oldest)
            return [s for s in sent if s is not None]

    # -- sending ----------------------------------------------------------------------

    async def _rua(self, domain: str) -> list[str] | str | None:
        """The domain's rua URIs; a str: why it has none; None: ask again later."""
        lookup = await self.resolver().lookup(f"_smtp._tls.{domain}", "TXT")
        if lookup.status is LookupStatus.ERROR:
            return None
        records = [t for t in lookup.texts if t.replace(" ", "").startswith("v=TLSRPTv1;")]
        if len(records) != 1:
            return f"{len(records)} v=TLSRPTv1 records at _smtp._tls.{domain}"
        try:
            return parse_record(records[0])
        except ValueError as e:
            return f"_smtp._tls.{domain}: {e}"

    async def _send(self, day: str, domain: str, now: float) -> Sent | None:
        assert self.store is not None
        store = self.store
        rua = await self._rua(domain)
        if rua is None:
            return None  # the lookup failed: the next round asks again
        report_id = new_report_id(day, domain, self.reporter.submitter)
        node = self.storage.node_id
        if not await self._db(store.claim, day, domain, node, report_id, now):
            return None  # another node sends it
        if isinstance(rua, str):
            await self._db(store.settle, day, domain, "no-rua", {"why": rua})
            return Sent(domain, day, "no-rua", {"why": rua})
        counts = (await self._db(store.counts, day, domain)).get(domain, {})
        compressed = gzipped(report_json(self.reporter, day, report_id, counts))
        mailto = [_address_of(u) for u in rua if u.lower().startswith("mailto:")]
        posts = [u for u in rua if u.lower().startswith("https://")]
        detail: dict[str, Any] = {"report_id": report_id, "rua": rua}
        if mailto:
            data = report_mail(
                self.reporter, domain, day, report_id, compressed, mailto, self.hostname
            )
            extra = {"tlsrpt": {"domain": domain, "day": day, "report_id": report_id}}
            queue_id = await self.queue.submit(
                self.reporter.contact, mailto, data, Purpose.TLS_REPORT, extra
            )
            self.metrics.tlsrpt_reports.labels("mailto", "queued").inc()
            detail["queued"] = queue_id
        state = "sent"
        if posts:
            detail["archived"] = archived = self._archive(domain, day, report_id, compressed)
            detail["posts"] = posted = await self._post_all(posts, compressed, archived)
            detail["tries"] = 1
            if any(v != "posted" for v in posted.values()):
                state = "retry"
                detail["next_try"] = now + HTTPS_RETRIES[0]
        await self._db(store.settle, day, domain, state, detail)
        log.info(
            Event.TLSRPT_SENT,
            domain=domain,
            day=day,
            report_id=report_id,
            state=state,
            mailto=len(mailto),
            https=len(posts),
        )
        return Sent(domain, day, state, detail)

    async def _retry(self, now: float) -> list[Sent | None]:
        assert self.store is not None
        retrying = await self._db(self.store.retrying)
        return await _side_by_side(
            [
                self._post_again(day, domain, detail, now)
                for day, domain, detail in retrying
                if detail.get("next_try", 0) <= now
            ]
        )

    async def _post_again(
        self, day: str, domain: str, detail: dict[str, Any], now: float
    ) -> Sent | None:
        """A report whose POSTs failed: to the receivers that did not take it, again."""
        assert self.store is not None
        counts = (await self._db(self.store.counts, day, domain)).get(domain, {})
        report_id = detail["report_id"]
        compressed = gzipped(report_json(self.reporter, day, report_id, counts))
        failed = [u for u, v in detail["posts"].items() if v != "posted"]
        posted = await self._post_all(failed, compressed, detail.get("archived"))
        detail["posts"].update(posted)
        tries = detail["tries"] = int(detail.get("tries", 1)) + 1
        state = "sent"
        if any(v != "posted" for v in detail["posts"].values()):
            if tries > len(HTTPS_RETRIES):
                state = "failed"
            else:
                state = "retry"
                detail["next_try"] = now + HTTPS_RETRIES[tries - 1]
        await self._db(self.store.settle, day, domain, state, detail)
        if state == "failed":
            log.warning(Event.TLSRPT_FAILED, domain=domain, day=day, tries=tries)
        return Sent(domain, day, state, detail)

    async def _post_all(
        self, urls: list[str], compressed: bytes, archived: str | None
    ) -> dict[str, str]:
        results = {}
        for url in urls:
            results[url] = await self._post(url, compressed)
            outcome = "posted" if results[url] == "posted" else "failed"
            self.metrics.tlsrpt_reports.labels("https", outcome).inc()
        if archived is not None and self.journal is not None:
            self.journal.attempt(
                archived,
                [
                    {
                        "idx": i,
                        "address": url,
                        "state": "delivered" if result == "posted" else "deferred",
                        "status": "2.0.0" if result == "posted" else "4.0.0",
                        "diagnostic": result,
                        "evidence": None,
                    }
                    for i, (url, result) in enumerate(results.items())
                ],
            )
        return results

    async def _post(self, url: str, compressed: bytes) -> str:
        """POST the report (the webhooks' HTTP client, one connection); "posted", or
        why not."""
        try:
            endpoint = http.Endpoint(
                url, client_context(self.config.tls.ca_file), self.resolver(), size=0
            )
        except ValueError as e:
            return str(e)
        headers = {"Content-Type": REPORT_MEDIA_TYPE, "User-Agent": "sealgate"}
        try:
            status = (await endpoint.post(compressed, headers, POST_TIMEOUT)).status
        except TimeoutError:
            return f"no answer within {POST_TIMEOUT:g} s"
        except http.HttpError as e:
            return str(e)[:300]
        finally:
            await endpoint.close()
        return "posted" if 200 <= status < 300 else f"HTTP {status}"

    def _archive(self, domain: str, day: str, report_id: str, compressed: bytes) -> str | None:
        """Journal a report that goes by HTTPS (a mailed one is journaled by the
        queue): in its mail form, the POSTs' results as its attempts.  Its id."""
        if self.journal is None:
            return None
        data = report_mail(self.reporter, domain, day, report_id, compressed, [], self.hostname)
        now = datetime.datetime.now(datetime.UTC)
        queue_id = new_queue_id()
        self.journal.journal(
            Envelope(
                queue_id=queue_id,
                received_at=now.isoformat(timespec="microseconds"),
                mail_from=self.reporter.contact,
                mail_options=(),
                recipients=(),
                client=ClientInfo(ip="", port=0, helo=self.hostname, authorized_by="local"),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                purpose=Purpose.TLS_REPORT,
                extra={"tlsrpt": {"domain": domain, "day": day, "report_id": report_id}},
            ),
            data,
        )
        return queue_id


def _address_of(uri: str) -> str:
    """The address of a ``mailto:`` URI (RFC 6068: percent-encoded, headers after ?)."""
    return urllib.parse.unquote(uri[len("mailto:") :].split("?", 1)[0]).strip()


async def _side_by_side(sends: list[Awaitable[Sent | None]]) -> list[Sent | None]:
    """Run the sends `SEND_AT_ONCE` at a time; their results in order.  One that
    fails (the store went away) ends the others and its error is raised."""
    gate = asyncio.Semaphore(SEND_AT_ONCE)

    async def gated(send: Awaitable[Sent | None]) -> Sent | None:
        async with gate:
            return await send

    tasks = [asyncio.ensure_future(gated(s)) for s in sends]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
