"""attempt - the delivery agent: one attempt for the recipients of one message at
one domain, from decision to the remote server's reply.

The queue (`gateway.queue.manager`) leases recipients and hands them here, as
Postfix's qmgr hands work to its smtp agent; what comes back is one `Attempted` per
recipient, which the queue records and schedules.  For each recipient: learn the
domain's facts (`gateway.probe.prober`, cached) and the recipient's keys, let the
policy decide (`gateway.policy.engine`), then act on the decision:

- ``tls``: route the domain (`gateway.delivery.router`), apply its MTA-STS policy
  (`gateway.probe.mta_sts.enforce`), deliver at the decided level
  (`gateway.delivery.client`, DANE per MX, idle sessions reused from `SessionCache`);
  when the level cannot be met on the connection, probe again, decide again without
  ``tls`` and take the next mode - never a lower level, never plaintext;
- ``smime`` / ``pgp``: the recipient's own copy, made by the transform step
  (`gateway.crypto.transform`), delivered the same way; a key that cannot be used
  moves the recipient to its next mode;
- ``portal``: the message is kept by the portal (`Depositor`) and a notification
  sent; without a portal, and for ``hold``, the recipient is ``held``;
- ``bounce``: the recipient fails (5.7.10).

Messages that carry no content (a portal notification or code: `Purpose`) are sent
as they are, over TLS when offered, without the policy.  Changed copies are DKIM
signed anew and kept by the archive as sent (`CopyJournal`).  Nothing here writes
the queue's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections import defaultdict
from collections.abc import Awaitable
from typing import Protocol

from gateway.background import Background
from gateway.config import Config
from gateway.crypto.transform import CopyMaker, EncryptFailed, KeyUnusable
from gateway.delivery.budget import ByteBudget, copy_cost
from gateway.delivery.client import ClientSettings, deliver
from gateway.delivery.results import Attempted, Deposited, Encrypted, Outcome, RecipientResult
from gateway.delivery.router import Routed, RouteFailure, Router
from gateway.delivery.sessions import ReuseLimits, SessionCache
from gateway.delivery.tls_policy import TlsLevel
from gateway.events import EncryptionFailure, Event
from gateway.model import Envelope, PortalAuth, Purpose
from gateway.observability.logging import AddressRedactor, get_logger
from gateway.observability.metrics import Metrics
from gateway.policy.engine import decide, tls_required_no
from gateway.policy.features import Features, message_features, strip_subject_tags
from gateway.policy.language import Policy, load_policy_for
from gateway.policy.model import DELIVERY_MODES, Decision, Mode
from gateway.probe.dns import Resolver
from gateway.probe.facts import RecipientFacts
from gateway.probe.keys import KeyStore, NoKeys
from gateway.probe.mta_sts import SqlStsStore, StsCache, StsResult, enforce
from gateway.probe.prober import Prober, ProbeSettings
from gateway.smtp import parameters
from gateway.storage.stores import Storage
from gateway.tlsrpt.model import Failure, Observation, ResultType

log = get_logger("gateway.delivery")

FEATURES_MAX = 10_000  # messages whose features are kept between their recipients' attempts
THREAD_FEATURES_ABOVE = 32 * 1024  # classifying larger messages runs in a thread, not the loop


class Addressee(Protocol):
    """A recipient to attempt: its index in the envelope and its address."""

    @property
    def idx(self) -> int: ...

    @property
    def address(self) -> str: ...


class Depositor(Protocol):
    """Where a recipient decided ``portal`` gets its message (`gateway.portal`)."""

    async def deposit(
        self,
        envelope: Envelope,
        data: bytes,
        address: str,
        expiry: float | None,
        auth: PortalAuth | None,
    ) -> tuple[RecipientResult, Deposited | None]: ...


class TlsRptCounter(Protocol):
    """Where sessions are counted for TLS-RPT (`gateway.tlsrpt.service`)."""

    def observe(self, domain: str, sts: StsResult | None) -> Observation | None: ...


# an archived copy at least this large stays counted in delivery.copy_memory until
# the archive has written it (`DeliveryAgent._keep_copy`)
COUNTED_UNTIL_ARCHIVED = 1024 * 1024


class CopyJournal(Protocol):
    """Keeps every copy the gateway changed, as sent (`gateway.archive.service`)."""

    def copy(self, queue_id: str, data: bytes, digest: str) -> Awaitable[object]:
        """Done when the copy is written (or has failed, to be written later);
        ``digest``: its SHA-256, in hex."""


CONTENT_FREE_DECISION = Decision(
    mode=Mode.TLS,
    tls_level=TlsLevel.MAY,
    fallback=Mode.HOLD,
    rule="portal-message",
    reasons=("a portal notification or code carries no message content: sent as it is",),
    level_source="portal",
    candidates=(Mode.TLS,),
)
TLS_REPORT_DECISION = dataclasses.replace(
    CONTENT_FREE_DECISION,
    rule="tls-report",
    reasons=(
        "a TLS report (RFC 8460) holds counts of TLS sessions, nothing of any message: "
        "sent as it is, held to no TLS policy of the domain (RFC 8460 5.3)",
    ),
)


class DeliveryAgent:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        redact: AddressRedactor,
        hostname: str,
        policy: Policy | None = None,
        keys: KeyStore | None = None,
        copies: CopyJournal | None = None,
    ):
        self.metrics, self.redact, self.hostname = metrics, redact, hostname
        self.copies = copies
        self.portal: Depositor | None = None  # set by the app when the portal runs
        self.keys: KeyStore = keys or NoKeys()
        self.sessions: SessionCache | None = None
        self.sts: StsCache | None = None  # outlives reloads: cached policies stay
        self.tlsrpt: TlsRptCounter | None = None  # set by the app when tlsrpt.enabled
        self.transform = CopyMaker(config.state_dir, metrics)
        self.copy_budget = ByteBudget(config.delivery.copy_memory)
        metrics.copy_memory.set_function(lambda: self.copy_budget.held)
        metrics.copies_waiting.set_function(lambda: self.copy_budget.waiting)
        self._retired = Background()  # session caches replaced by a reload, closing
        self._features: dict[str, tuple[str, Features]] = {}
        self.apply(config, policy)

    def apply(self, config: Config, policy: Policy | None = None) -> None:
        """Take the policy, signing keys, routes, resolvers and timeouts from ``config``
        (start, SIGHUP); ``policy`` when the caller loaded it already.  A policy or a
        signing key that does not load raises `ConfigError` before anything changes.

        Attempts in progress finish with the settings (and the policy) they started
        with; every attempt that starts afterwards uses the new ones.  Idle sessions
        and probe facts were made under the old settings: they are dropped.
        """
        new_policy = policy or load_policy_for(config)
        self.transform.configure(config)  # raises before anything changes
        self.policy, self.config = new_policy, config
        self.copy_budget.resize(config.delivery.copy_memory)
        self._features.clear()  # they say whether a DKIM key signs: the keys may be new
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
            storage = Storage(config)
            if storage.shared:  # every node knows every domain's policy
                self.sts = StsCache(self.resolver, store=SqlStsStore(storage.open("mta_sts")))
            else:
                self.sts = StsCache(self.resolver, path=storage.path("mta_sts"))
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
            self._retired.run(old.close())

    async def start(self) -> None:
        assert self.sts is not None
        await asyncio.to_thread(self.sts.load)

    async def close(self) -> None:
        if self.sessions is not None:
            await self.sessions.close()
        await self._retired.settle(5)
        self.transform.close()
        if self.sts is not None and self.sts.store is not None:
            self.sts.store.close()

    def forget(self, queue_id: str) -> None:
        """The message is done or waits minutes for its next attempt."""
        self._features.pop(queue_id, None)

    # -- one attempt ------------------------------------------------------------------

    async def attempt(
        self, envelope: Envelope, data: bytes, domain: str, rows: list[Addressee]
    ) -> list[Attempted]:
        """Decide, make the copies and send for ``rows`` (recipients of ``envelope`` at
        ``domain``); one `Attempted` per row, in order."""
        policy, prober = self.policy, self.prober  # one policy for the whole attempt
        features = await self._features_of(envelope.queue_id, policy, data)
        now = time.time()
        decisions = {}
        facts_of: dict[int, RecipientFacts] = {}
        for row in rows:
            if envelope.purpose.content_free:  # a portal notification or code, a report
                decisions[row.idx] = (
                    TLS_REPORT_DECISION
                    if envelope.purpose is Purpose.TLS_REPORT
                    else CONTENT_FREE_DECISION
                )
                continue
            facts_of[row.idx], decisions[row.idx] = await self._decide(
                policy, envelope, row.address, features, now
            )
        results: dict[int, RecipientResult] = {}
        made: dict[int, Encrypted | Deposited] = {}
        causes: dict[int, RecipientResult] = {}
        pending = rows
        for _ in range(len(DELIVERY_MODES) + 1):  # each round rules out one more mode
            failed = await self._round(
                envelope, data, domain, pending, decisions, facts_of, causes, results, made
            )
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
        return [
            Attempted(row.idx, results[row.idx], decisions[row.idx], made.get(row.idx))
            for row in rows
        ]

    async def _decide(
        self, policy: Policy, envelope: Envelope, address: str, features: Features, now: float
    ) -> tuple[RecipientFacts, Decision]:
        facts = await self.prober.recipient(address)
        evaluation = decide(policy, envelope.mail_from, address, features, facts, now)
        if _could_use_discovered_key(policy.discovered_keys, evaluation.decision, facts):
            keys = await self.prober.keys.discover(address)
            if keys.pgp is not None:
                facts = dataclasses.replace(facts, keys=keys)
                evaluation = decide(policy, envelope.mail_from, address, features, facts, now)
        return facts, evaluation.decision

    async def _round(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        pending: list[Addressee],
        decisions: dict[int, Decision],
        facts_of: dict[int, RecipientFacts],
        causes: dict[int, RecipientResult],
        results: dict[int, RecipientResult],
        made: dict[int, Encrypted | Deposited],
    ) -> list[tuple[Addressee, RecipientResult]]:
        """Carry out each pending recipient's decision; the ones whose mode failed."""
        failed: list[tuple[Addressee, RecipientResult]] = []
        tls: dict[tuple[TlsLevel, tuple[str, ...]], list[Addressee]] = defaultdict(list)
        portal: list[Addressee] = []
        for row in pending:
            decision = decisions[row.idx]
            if decision.mode is Mode.TLS:
                tls[(decision.tls_level, decision.strip_tags)].append(row)
            elif decision.mode in (Mode.SMIME, Mode.PGP):
                sent = await self._send_encrypted(envelope, data, domain, row, decision, facts_of)
                if isinstance(sent, RecipientResult):
                    failed.append((row, sent))
                else:
                    results[row.idx], made[row.idx] = sent
            elif decision.mode is Mode.PORTAL and self.portal is not None:
                portal.append(row)
            else:
                results[row.idx] = _not_sent(row.address, decision, causes.get(row.idx))
        if portal:
            await self._deposit(envelope, data, portal, decisions, results, made)
        for (level, tags), group in tls.items():
            sent_tls = await self._send(envelope, data, domain, group, level, tags)
            for row, result in zip(group, sent_tls, strict=True):
                if result.tls_failure is not None:
                    failed.append((row, result))
                else:
                    results[row.idx] = result
        return failed

    async def _deposit(
        self,
        envelope: Envelope,
        data: bytes,
        rows: list[Addressee],
        decisions: dict[int, Decision],
        results: dict[int, RecipientResult],
        made: dict[int, Encrypted | Deposited],
    ) -> None:
        """Keep the message in the portal for ``rows``, all at once (their deposits
        share one commit); a deposit that fails defers its recipient alone (4.3.0,
        tried again on the schedule) - the others' results stand, so they are not
        kept and notified twice."""
        assert self.portal is not None
        outcomes = await asyncio.gather(
            *(
                self.portal.deposit(
                    envelope,
                    data,
                    row.address,
                    decisions[row.idx].portal_expiry,
                    decisions[row.idx].portal_auth,
                )
                for row in rows
            ),
            return_exceptions=True,
        )
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error(
                    Event.DELIVERY_ERROR,
                    queue_id=envelope.queue_id,
                    error_type=type(outcome).__name__,
                    error=str(outcome)[:300],
                )
                results[row.idx] = RecipientResult(
                    row.address,
                    "deferred",
                    "4.3.0",
                    f"the secure portal could not keep the message ({type(outcome).__name__})",
                )
                continue
            if isinstance(outcome, BaseException):
                raise outcome  # cancelled: the attempt is
            results[row.idx], deposited = outcome
            if deposited is not None:
                made[row.idx] = deposited

    async def _send_encrypted(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        row: Addressee,
        decision: Decision,
        facts_of: dict[int, RecipientFacts],
    ) -> tuple[RecipientResult, Encrypted] | RecipientResult:
        """Encrypt ``row``'s own copy to its key (S/MIME or PGP, as decided) and deliver
        it; the result and the evidence of the encryption, or (a `RecipientResult`
        alone) why it could not be encrypted - then nothing was sent.  The copy is
        counted in ``delivery.copy_memory`` from before it is made until it is sent
        (waiting its turn when the others hold too much)."""
        mode = decision.mode
        keys = facts_of[row.idx].keys
        info = keys.smime if mode is Mode.SMIME else keys.pgp
        async with self.copy_budget.hold(copy_cost(len(data))) as archived:
            plain = strip_subject_tags(data, decision.strip_tags) if decision.strip_tags else data
            sealed, reason, detail = None, EncryptionFailure.KEY_MISSING, "no key"
            material = await self.prober.keys.material(info) if info is not None else None
            if info is not None and material is not None:
                try:
                    if mode is Mode.SMIME:
                        sealed = await self.transform.encrypt_smime(plain, material)
                    else:
                        sealed = await self.transform.encrypt_pgp(plain, info, material)
                except KeyUnusable as e:
                    reason, detail = EncryptionFailure.KEY_INVALID, str(e)
                except EncryptFailed as e:
                    reason, detail = EncryptionFailure.ENCRYPT_FAILED, str(e)
            if sealed is None or info is None:
                self.metrics.encryption_errors.labels(mode.value, reason.value).inc()
                log.warning(
                    Event.ENCRYPTION_FAILED,
                    queue_id=envelope.queue_id,
                    rcpt=self.redact(row.address),
                    mode=mode.value,
                    reason=reason.value,
                    error=detail[:300],
                )
                name = "S/MIME" if mode is Mode.SMIME else "PGP"
                why = f"{name}: {reason.value.replace('_', ' ')}: {detail[:200]}"
                return RecipientResult(row.address, "deferred", "4.7.10", why)
            (result,) = await self._send(
                envelope,
                sealed,
                domain,
                [row],
                decision.tls_level,
                (),
                changed=True,
                archived=archived,
            )
            if result.outcome == "delivered":
                self.metrics.messages_encrypted.labels(mode.value).inc()
            return result, Encrypted(
                mode.value,
                info.fingerprint,
                info.source,
                self.transform.signs(mode is Mode.SMIME),
                hashlib.sha256(sealed).hexdigest(),
                len(sealed),
            )

    async def _features_of(self, queue_id: str, policy: Policy, data: bytes) -> Features:
        """What the policy reads from the message, once per message and policy."""
        known = self._features.get(queue_id)
        if known is not None and known[0] == policy.stamp:
            return known[1]
        if policy.reads_content and (len(data) > THREAD_FEATURES_ABOVE or b"application/" in data):
            # large, or with attachments (a PDF's text takes milliseconds and more)
            features = await asyncio.to_thread(message_features, policy, data)
        else:
            features = message_features(policy, data)
        features = dataclasses.replace(features, dkim_key=self.transform.has_aligned_key(data))
        if len(self._features) >= FEATURES_MAX:
            self._features.clear()
        self._features[queue_id] = (policy.stamp, features)
        return features

    async def _send(
        self,
        envelope: Envelope,
        data: bytes,
        domain: str,
        rows: list[Addressee],
        level: TlsLevel,
        strip_tags: tuple[str, ...],
        changed: bool = False,
        archived: list[Awaitable[object]] | None = None,
    ) -> list[RecipientResult]:
        """Deliver one copy to ``rows`` over TLS at ``level`` (at least); ``changed``:
        the copy is not the message as received (it is signed anew)."""
        routed = await self.router.route(domain)
        note = ""
        requiretls = parameters.REQUIRETLS in envelope.mail_options
        policy = self.policy
        # RFC 8689 5, allowed by the policy (a TLS report always: RFC 8460 5.3): no
        # MTA-STS, no DANE
        relaxed = envelope.purpose is Purpose.TLS_REPORT or (
            not requiretls
            and policy.allow_tls_required_no
            and tls_required_no(await self._features_of(envelope.queue_id, policy, data))
        )
        observed = None
        if isinstance(routed, Routed):
            if relaxed:
                level = min(level, TlsLevel.MAY)
            else:
                routed, level, note, observed = await self._apply_mta_sts(domain, routed, level)
        addresses = [r.address for r in rows]
        if isinstance(routed, Routed) and requiretls:
            level = max(level, TlsLevel.VERIFY)  # RFC 8689 4.2.1: a verified certificate
            if not _authenticated_route(routed, level):
                why = (
                    f"Sender requested REQUIRETLS, but the MX hosts of {domain} are "
                    "authenticated by neither DNSSEC nor MTA-STS"
                )
                routed = RouteFailure(True, "5.7.30", why)
        if isinstance(routed, RouteFailure):
            outcome: Outcome = "bounced" if routed.permanent else "deferred"
            results = [RecipientResult(a, outcome, routed.status, routed.reason) for a in addresses]
        else:
            body = strip_subject_tags(data, strip_tags) if strip_tags else data
            body = await self.transform.signed(body, changed or bool(strip_tags))
            # sent before the message, not joined to a copy of it (of 20 MB, for each
            # of 20 destinations)
            trace = envelope.trace_headers.encode("utf-8", "surrogateescape")
            kept = None
            if (changed or body is not data) and self.copies is not None:
                # not the message as received: the archive keeps the copy as sent
                kept = self._keep_copy(self.copies, envelope.queue_id, trace + body, archived)
            results = await deliver(
                routed,
                level,
                envelope.mail_from,
                addresses,
                body,
                self.settings,
                self.resolver,
                smtputf8="SMTPUTF8" in envelope.mail_options,
                eightbit="BODY=8BITMIME" in envelope.mail_options,
                requiretls=requiretls,
                dsn_mail=_dsn_options(envelope.mail_options, parameters.MAIL_DSN_KEYS),
                dsn_rcpt={
                    r.address: options
                    for r in rows
                    if r.idx < len(envelope.recipients)
                    and (
                        options := _dsn_options(
                            envelope.recipients[r.idx].options, parameters.RCPT_KEYS
                        )
                    )
                },
                head=trace,
                sessions=self.sessions,
                metrics=self.metrics,
                relaxed=relaxed,
                observed=observed,
                # the message as received, whose lines the SMTP listener checked
                data_is_wire=envelope.data_is_wire and not changed and body is data,
            )
            if requiretls:  # no other mode, no second chance at a lower level: it fails
                results = [_requiretls_failed(r) for r in results]
            if relaxed:
                results = [_relaxed(r) for r in results]
            if kept is not None:
                results = [dataclasses.replace(r, copy_sha256=kept) for r in results]
            for result in results:
                ev = result.evidence
                tls_version = Metrics.tls_label(ev.tls_version if ev else None)
                self.metrics.delivery_attempts.labels(
                    result.outcome, level.label, tls_version
                ).inc()
        if note:
            results = [_with_mta_sts(r, note) for r in results]
        return results

    @staticmethod
    def _keep_copy(
        copies: CopyJournal,
        queue_id: str,
        sent: bytes,
        archived: list[Awaitable[object]] | None,
    ) -> str:
        """Hand a changed copy to the archive; its digest.  ``archived``: where to put
        what a large copy's memory stays counted until (the archive has it written:
        a hundred copies queued for the archive's thread hold as much memory as a
        hundred being sent)."""
        digest = hashlib.sha256(sent).hexdigest()
        written = copies.copy(queue_id, sent, digest)
        if archived is not None and len(sent) >= COUNTED_UNTIL_ARCHIVED:
            archived.append(written)
        return digest

    async def _apply_mta_sts(
        self, domain: str, routed: Routed, level: TlsLevel
    ) -> tuple[Routed | RouteFailure, TlsLevel, str, Observation | None]:
        """MTA-STS for mail routed by MX records (`gateway.probe.mta_sts.enforce`);
        routes and the smart host are the administrator's choice: no policy lookup
        (DANE still applies).  With TLS-RPT, what the sessions are counted under."""
        tlsrpt = self.tlsrpt
        if not self.config.mta_sts.enabled or routed.hops[0].via not in ("mx", "implicit-mx"):
            observed = tlsrpt.observe(domain, None) if tlsrpt else None
            return routed, level, "", observed
        assert self.sts is not None
        sts = await self.sts.policy(domain)
        self.metrics.mta_sts_lookups.labels(sts.source.value).inc()
        result, level, note = enforce(domain, sts, routed, level)
        observed = tlsrpt.observe(domain, sts) if tlsrpt else None
        if observed is not None and observed.sts is not None and isinstance(result, RouteFailure):
            for hop in routed.hops:  # none is in the policy: no session with any
                failure = Failure(ResultType.VALIDATION_FAILURE, hop.host, "", "mx-not-in-policy")
                observed.count(observed.sts, failure)
        return result, level, note, observed


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


def _dsn_options(options: tuple[str, ...], keys: tuple[str, ...]) -> tuple[str, ...]:
    """The DSN parameters among these options (passed on as the client gave them)."""
    return tuple(o for o in options if o.split("=", 1)[0].upper() in keys)


def _authenticated_route(routed: Routed, level: TlsLevel) -> bool:
    """RFC 8689 4.2.1: the next hops come from a DNSSEC-validated MX answer, from the
    domain's MTA-STS policy (or DANE), or from this gateway's own configuration."""
    configured = all(hop.via in ("route", "smart-host") for hop in routed.hops)
    return configured or routed.mx_secure or level >= TlsLevel.MTA_STS


def _requiretls_failed(result: RecipientResult) -> RecipientResult:
    """A REQUIRETLS message that could not be sent at its TLS level fails (5.7.10)
    instead of moving on to another mode."""
    if result.tls_failure is None:
        return result
    return dataclasses.replace(
        result,
        outcome="bounced",
        status="5.7.10",
        diagnostic=f"Sender requested REQUIRETLS: {result.diagnostic}",
        tls_failure=None,
    )


def _relaxed(result: RecipientResult) -> RecipientResult:
    if result.evidence is None:
        return result
    return dataclasses.replace(
        result, evidence=dataclasses.replace(result.evidence, tls_required_no=True)
    )


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
