"""Prometheus metrics, all named ``sealgate_*``.

Every label value comes from a closed enum (`gateway.events.RejectReason`, TLS
versions from the ssl module); never from addresses, hosts or message data.  Each
`Metrics` owns its registry, so several gateways (tests) can live in one process.
"""

from __future__ import annotations

import json
import platform
import re
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.samples import Sample

from gateway import __version__
from gateway.events import EncryptionFailure, RejectReason, TlsFailure

# "_created" series double the exposition for no use on our counters.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
_SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
_TLS_VERSIONS = ("none", "TLSv1.2", "TLSv1.3")
_TLS_LEVELS = ("none", "may", "encrypt", "verify", "mta-sts", "dane")
_OUTCOMES = ("delivered", "deferred", "bounced")
_QUEUE_STATES = ("pending", "deferred", "active", "hold", "held")
_MODES = ("tls", "smime", "pgp", "portal", "hold", "bounce")
_PROBE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time in queue: from seconds (straight through) to the 5-day lifetime.
_QUEUE_TIME_BUCKETS = (1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 2 * 86400, 5 * 86400)


class Metrics:
    def __init__(self) -> None:  # noqa: C901, PLR0915 - declarations of every metric
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "sealgate_smtp_connections", "SMTP connections opened", ["result"], registry=r
        )
        self.connections_active = Gauge(
            "sealgate_smtp_connections_active", "SMTP connections open now", registry=r
        )
        self.messages_accepted = Counter(
            "sealgate_messages_accepted",
            "Messages accepted into the spool",
            ["tls_version"],
            registry=r,
        )
        self.messages_rejected = Counter(
            "sealgate_messages_rejected",
            "Commands or messages refused, by reason",
            ["reason"],
            registry=r,
        )
        self.accepted_bytes = Counter(
            "sealgate_accepted_bytes", "Bytes of message data accepted", registry=r
        )
        self.message_size = Histogram(
            "sealgate_message_size_bytes",
            "Size of accepted messages",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.acceptance_latency = Histogram(
            "sealgate_acceptance_latency_seconds",
            "End of DATA to the 250 reply (spool write and fsync included)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth = Counter("sealgate_smtp_auth", "SMTP AUTH attempts", ["result"], registry=r)
        self.delivery_attempts = Counter(
            "sealgate_delivery_attempts",
            "Recipient delivery attempts by outcome, required TLS level and TLS version used",
            ["outcome", "tls_level", "tls_version"],
            registry=r,
        )
        self.queue_time = Histogram(
            "sealgate_queue_time_seconds",
            "Arrival to final state, per recipient (delivered, bounced or expired)",
            ["outcome"],
            buckets=_QUEUE_TIME_BUCKETS,
            registry=r,
        )
        self.delivery_stalled = Gauge(
            "sealgate_delivery_attempts_stalled",
            "Delivery attempts that have waited on a server for a minute (a tarpit, a "
            "server that stopped answering): they hold none of the delivery places",
            registry=r,
        )
        self.copy_memory = Gauge(
            "sealgate_delivery_copy_memory_bytes",
            "Bytes counted for recipients' own copies (S/MIME, PGP) being made and sent "
            "(delivery.copy_memory bounds them)",
            registry=r,
        )
        self.copies_waiting = Gauge(
            "sealgate_delivery_copies_waiting",
            "Attempts waiting for memory to make a recipient's own copy",
            registry=r,
        )
        self.destinations_suspended = Gauge(
            "sealgate_delivery_destinations_suspended",
            "Recipient domains none of whose hosts could be reached: their mail waits "
            "without an attempt each until the next try",
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "sealgate_queue_oldest_message_age_seconds",
            "Age of the oldest message not yet finished (0: the queue is empty)",
            registry=r,
        )
        self.cluster_unshared = Gauge(
            "sealgate_cluster_unshared_messages",
            "Messages this node acknowledged whose content is not yet in the shared store "
            "(cluster.ack: local): lost if this node and its disk are lost now",
            registry=r,
        )
        self.cluster_possible_duplicates = Counter(
            "sealgate_cluster_possible_duplicates_total",
            "Recipients taken over from a node that stopped renewing its leases while an "
            "attempt of its own may have been under way (the remote server may get a second copy)",
            registry=r,
        )
        self.cluster_takeovers = Counter(
            "sealgate_cluster_takeovers_total",
            "Leases of silent nodes released by this node for any node to deliver",
            registry=r,
        )
        self.cluster_nodes = Gauge(
            "sealgate_cluster_nodes",
            "Nodes of the cluster by state: alive (a heartbeat within cluster.lease_timeout) "
            "or silent (none since, for up to 7 days; sealgate cluster status lists every one)",
            ["state"],
            registry=r,
        )
        self.storage_errors = Counter(
            "sealgate_storage_errors_total",
            "Operations on the shared store that failed because it could not be reached "
            "(retried; deliveries pause meanwhile)",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "sealgate_certificate_expiry_timestamp_seconds",
            "When a certificate the gateway presents expires (Unix time), by use: smtp "
            "(the STARTTLS listener), portal, api, smime_signing",
            ["use"],
            registry=r,
        )
        self.build_info = Gauge(
            "sealgate_build_info",
            "Always 1; the labels say which Sealgate and Python run",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.queue_recipients = Gauge(
            "sealgate_queue_recipients",
            "Recipients not yet final, by state (active: an attempt is under way)",
            ["state"],
            registry=r,
        )
        self.delivery_connections = Counter(
            "sealgate_delivery_connections",
            "Outbound SMTP sessions used: newly opened, or reused from the cache",
            ["kind"],
            registry=r,
        )
        self.mta_sts_lookups = Counter(
            "sealgate_mta_sts_lookups",
            "MTA-STS policy lookups by where the policy came from (none: no policy)",
            ["source"],
            registry=r,
        )
        self.delivery_tls_failures = Counter(
            "sealgate_delivery_tls_failures",
            "Outbound TLS failures (the host was skipped), by reason",
            ["reason"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "sealgate_policy_decisions",
            "Per-recipient policy decisions, by mode and by the rule that decided",
            ["mode", "rule"],
            registry=r,
        )
        self.dkim_copies = Counter(
            "sealgate_dkim_copies",
            "Copies the gateway DKIM-signs or would sign, by result: aligned (the From "
            "domain's key, dkim.keys), fallback (dkim.domain's key, not aligned with From), "
            "no_key (no key for the From domain: unsigned), error (no From: unsigned)",
            ["result"],
            registry=r,
        )
        self.policy_fallbacks = Counter(
            "sealgate_policy_fallbacks",
            "Recipients moved to another mode because the decided one failed at delivery, "
            "by the mode they moved to",
            ["mode"],
            registry=r,
        )
        self.probe_seconds = Histogram(
            "sealgate_probe_seconds",
            "Time to probe a recipient domain (cache misses only)",
            buckets=_PROBE_BUCKETS,
            registry=r,
        )
        self.probe_cache = Counter(
            "sealgate_probe_cache",
            "Domain facts asked for: hit (cached), miss (probed), shared (another probe's)",
            ["result"],
            registry=r,
        )
        self.probe_mta_sts = Counter(
            "sealgate_probe_mta_sts",
            "MTA-STS mode found when probing a domain routed by MX (none: no policy)",
            ["mode"],
            registry=r,
        )
        self.probe_dane = Counter(
            "sealgate_probe_dane",
            "DANE outcome per probed server: n/a (no DNSSEC), none, unusable, error "
            "(TLSA lookup failed), match, mismatch",
            ["outcome"],
            registry=r,
        )
        self.messages_encrypted = Counter(
            "sealgate_messages_encrypted",
            "Recipient copies delivered encrypted end to end, by mode",
            ["mode"],
            registry=r,
        )
        self.encryption_errors = Counter(
            "sealgate_encryption_errors",
            "Recipient copies that could not be encrypted (the recipient moved to its "
            "next mode), by mode and reason",
            ["mode", "reason"],
            registry=r,
        )
        self.keys = Gauge(
            "sealgate_keys",
            "Keys in the key directory by kind (smime, pgp) and source (import, wkd)",
            ["kind", "source"],
            registry=r,
        )
        self.wkd_lookups = Counter(
            "sealgate_wkd_lookups",
            "Web Key Directory lookups by outcome: found, none (404), unusable, error",
            ["outcome"],
            registry=r,
        )
        self.quarantined = Counter(
            "sealgate_queue_quarantined",
            "Spooled messages set aside because they could not be processed (archived, "
            "bounced, kept under spool/quarantine)",
            registry=r,
        )
        self.worker_exits = Counter(
            "sealgate_smtp_worker_exits",
            "SMTP worker processes that exited unexpectedly (each is started again)",
            registry=r,
        )
        self.strays_adopted = Counter(
            "sealgate_queue_strays_adopted",
            "Messages an SMTP worker acknowledged but could not announce before it died, "
            "found in the spool and queued",
            registry=r,
        )
        self.queue_store_errors = Counter(
            "sealgate_queue_store_errors",
            "Failed writes of delivery results to the queue state (retried until written)",
            registry=r,
        )
        self.tlsrpt_sessions = Counter(
            "sealgate_tlsrpt_sessions",
            "Sessions with recipient servers counted for TLS-RPT (RFC 8460: domains with "
            "MTA-STS or DANE), by policy type (sts, tlsa) and result (success or the RFC's "
            "result type, e.g. certificate-expired)",
            ["policy_type", "result"],
            registry=r,
        )
        self.tlsrpt_reports = Counter(
            "sealgate_tlsrpt_reports",
            "Daily TLS-RPT reports, by transport (mailto, https) and outcome (queued, "
            "posted, failed; a mailed report's delivery is the queue's)",
            ["transport", "outcome"],
            registry=r,
        )
        self.api_requests = Counter(
            "sealgate_api_requests",
            "Calls of the message API (/api/v1), by operation and HTTP status",
            ["operation", "status"],
            registry=r,
        )
        self.webhook_posts = Counter(
            "sealgate_webhook_posts",
            "Webhook events posted, by endpoint and outcome: posted (a 2xx answer), "
            "failed (tried again later), not-tried (the endpoint did not answer another "
            "event of the round, or answered 429 or 503: tried again later), dropped "
            "(not taken within webhooks.max_age)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "sealgate_webhook_outbox_events",
            "Webhook events waiting in the outbox, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.webhook_oldest = Gauge(
            "sealgate_webhook_oldest_event_age_seconds",
            "Age of the oldest webhook event waiting for its endpoint (0: none)",
            ["endpoint"],
            registry=r,
        )
        self.dsn_sent = Counter(
            "sealgate_dsn_sent",
            "Delivery status notifications sent to senders, by action: failed (recipients "
            "failed for good), delayed (delivery.delay_warning), success (NOTIFY=SUCCESS), "
            "notice (notify.sender_on)",
            ["action"],
            registry=r,
        )
        self.spool_messages = Gauge("sealgate_spool_messages", "Messages in the spool", registry=r)
        self.portal_notifications = Counter(
            "sealgate_portal_notifications", "Portal notifications sent", registry=r
        )
        self.portal_pickups = Counter(
            "sealgate_portal_pickups", "Portal messages opened for the first time", registry=r
        )
        self.portal_time_to_pickup = Histogram(
            "sealgate_portal_time_to_first_pickup_seconds",
            "From deposit to the first opening of a portal message",
            buckets=(60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400),
            registry=r,
        )
        self.portal_failed_codes = Counter(
            "sealgate_portal_failed_codes", "Wrong one-time codes entered", registry=r
        )
        self.portal_lockouts = Counter(
            "sealgate_portal_lockouts", "Portal links locked after wrong codes", registry=r
        )
        self.portal_expired_unread = Counter(
            "sealgate_portal_expired_unread",
            "Portal messages that expired without being opened",
            registry=r,
        )
        self.portal_replies = Counter(
            "sealgate_portal_replies", "Secure replies sent from the portal", registry=r
        )
        self.console_signins = Counter(
            "sealgate_console_signins",
            "Sign-ins to the compliance console by method (local, oidc) and outcome (right, "
            "wrong, locked, refused)",
            ["method", "outcome"],
            registry=r,
        )
        self.portal_rate_limited = Counter(
            "sealgate_portal_rate_limited", "Portal requests refused by the rate limit", registry=r
        )
        self.portal_messages = Gauge(
            "sealgate_portal_messages", "Portal messages by state (waiting)", ["state"], registry=r
        )
        self.archive_journaled = Counter(
            "sealgate_archive_journaled_messages", "Messages journaled to the archive", registry=r
        )
        self.archive_journaled_bytes = Counter(
            "sealgate_archive_journaled_bytes", "Bytes of messages journaled", registry=r
        )
        self.archive_errors = Counter(
            "sealgate_archive_errors",
            "Archive writes that failed (a message's spool file stays until it is journaled)",
            registry=r,
        )
        self.archive_bytes = Gauge(
            "sealgate_archive_bytes", "Size of the archive (index and sealed records)", registry=r
        )
        self.archive_verify_time = Gauge(
            "sealgate_archive_last_verify_timestamp_seconds",
            "When the archive was last verified (sealgate archive verify)",
            registry=r,
        )
        self.archive_verify_ok = Gauge(
            "sealgate_archive_last_verify_ok",
            "1 if the last verification found no problem, 0 if it found some",
            registry=r,
        )
        self.archive_verify_seconds = Gauge(
            "sealgate_archive_last_verify_duration_seconds",
            "How long the last verification took",
            registry=r,
        )
        self.archive_searches = Gauge(
            "sealgate_archive_searches",
            "Searches in the archive's access record (command line and API)",
            registry=r,
        )
        self.archive_exports = Gauge(
            "sealgate_archive_exports",
            "Exports in the archive's access record (command line and API)",
            registry=r,
        )
        self.spool_bytes = Gauge(
            "sealgate_spool_bytes", "Bytes of message data in the spool", registry=r
        )
        # Pre-create every labelled series so that dashboards see zeros, not gaps.
        for reason in RejectReason:
            self.messages_rejected.labels(reason.value)
        for version in _TLS_VERSIONS:
            self.messages_accepted.labels(version)
        for result in ("accepted", "refused"):
            self.connections.labels(result)
        for result in ("success", "failure", "throttled"):
            self.auth.labels(result)
        for outcome in _OUTCOMES:
            for level in _TLS_LEVELS:
                for version in _TLS_VERSIONS:
                    self.delivery_attempts.labels(outcome, level, version)
        for outcome in ("delivered", "bounced", "expired"):
            self.queue_time.labels(outcome)
        for state in _QUEUE_STATES:
            self.queue_recipients.labels(state)
        for kind in ("new", "reused"):
            self.delivery_connections.labels(kind)
        for source in ("none", "fetched", "cached", "cached-fallback"):
            self.mta_sts_lookups.labels(source)
        for failure in TlsFailure:
            self.delivery_tls_failures.labels(failure.value)
        for mode in _MODES:
            self.policy_fallbacks.labels(mode)
        for mode in ("smime", "pgp"):
            self.messages_encrypted.labels(mode)
            for why in EncryptionFailure:
                self.encryption_errors.labels(mode, why.value)
        for outcome in ("found", "none", "unusable", "error"):
            self.wkd_lookups.labels(outcome)
        for result in ("hit", "miss", "shared"):
            self.probe_cache.labels(result)
        for sts_mode in ("enforce", "testing", "none"):
            self.probe_mta_sts.labels(sts_mode)
        for outcome in ("n/a", "none", "unusable", "error", "match", "mismatch"):
            self.probe_dane.labels(outcome)

    def reject(self, reason: RejectReason) -> None:
        self.messages_rejected.labels(reason.value).inc()

    @staticmethod
    def tls_label(version: str | None) -> str:
        return version if version in _TLS_VERSIONS else "none"

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``name{labels}`` -> value, to ship to another process
        (not ``sealgate_build_info``: every process has it, the sum would say N)."""
        return {
            _sample_key(s.name, s.labels): s.value
            for family in self.registry.collect()
            for s in family.samples
            if s.name != "sealgate_build_info"
        }

    def render(self, *others: dict[str, float]) -> bytes:
        """Exposition text, adding the samples of other processes' snapshots - those
        only another process has (a label value only a worker used) too."""
        if not others:
            return generate_latest(self.registry)
        # the others' samples summed once, by sample name: name -> key -> value
        totals: dict[str, dict[str, float]] = {}
        for other in others:
            for key, value in other.items():
                by_key = totals.setdefault(key.partition("{")[0], {})
                by_key[key] = by_key.get(key, 0.0) + value
        families = list(self.registry.collect())
        for family in families:
            samples = [
                s._replace(
                    value=s.value + totals.get(s.name, {}).pop(_sample_key(s.name, s.labels), 0.0)
                )
                for s in family.samples
            ]
            for suffix in _SUFFIXES.get(family.type, ("",)):  # what only the others have
                name = family.name + suffix
                for key, value in sorted(totals.pop(name, {}).items()):
                    samples.append(Sample(name, _parse_key(key)[1], value))
            family.samples = samples
        return generate_latest(_Families(families))


# the samples of each kind of metric (a counter's "_created" is a time: not summed in)
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
}
_LABEL = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*")')


def _sample_key(name: str, labels: dict[str, str]) -> str:
    """``name{k="v",...}``, the values JSON-quoted (a value may hold ',' or '=')."""
    return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def _parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    return name, {k: json.loads(v) for k, v in _LABEL.findall(rest)}


class _Families:
    def __init__(self, families: list[Any]):
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
