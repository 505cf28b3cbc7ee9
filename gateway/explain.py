"""``sealgate explain``: what the gateway would do with mail from A to B, and why.

It gathers the facts the daemon would (its configuration: resolvers, routes, port,
CA file, DANE and MTA-STS settings, the keys in its key directory - WKD is not
asked), runs the policy, and reports every rule
considered - matched or not, condition by condition - and the decision.  Nothing is
sent and nothing of the daemon's state is changed (probe connections end with QUIT
after EHLO/STARTTLS; the MTA-STS cache is not written).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from gateway.config import Config
from gateway.crypto.dkim import author_domain
from gateway.crypto.signers import dkim_keys
from gateway.delivery.router import Router
from gateway.policy.engine import Evaluation, decide
from gateway.policy.features import Features, message_features
from gateway.policy.language import Policy
from gateway.probe.dns import Resolver
from gateway.probe.facts import DomainFacts, MxFacts, RecipientFacts, level_of
from gateway.probe.keys import KeyStore, NoKeys
from gateway.probe.mta_sts import StsCache
from gateway.probe.prober import Prober, ProbeSettings


@dataclass(frozen=True)
class Explained:
    recipient: str
    facts: RecipientFacts
    evaluation: Evaluation


async def explain(
    config: Config,
    policy: Policy,
    sender: str,
    recipients: list[str],
    message: bytes | None,
    hostname: str,
    keys: KeyStore | None = None,
) -> tuple[Features, list[Explained]]:
    resolver = Resolver(config.dns.nameservers)
    dc = config.delivery
    router = Router(resolver, dc.port, config.routes, dc.smart_host, dc.max_mx_hosts)
    sts = StsCache(
        resolver,
        port=config.mta_sts.port,
        ca_file=config.tls.ca_file,
        timeout=config.mta_sts.fetch_timeout,
    )
    settings = ProbeSettings.from_config(config, hostname)
    prober = Prober(router, resolver, settings, sts, keys or NoKeys())
    data = message if message is not None else f"From: <{sender}>\r\n\r\n".encode()
    # in a thread: a message's documents can take the policy's scan_time to read,
    # and the daemon's event loop (the message API's explain) goes on meanwhile
    features = await asyncio.to_thread(message_features, policy, data)
    signing = dkim_keys(config).aligned(author_domain(data))
    features = dataclasses.replace(features, dkim_key=signing is not None)
    out = []
    for rcpt in recipients:
        facts = await prober.recipient(rcpt)
        evaluation = decide(policy, sender, rcpt, features, facts, time.time())
        out.append(Explained(rcpt, facts, evaluation))
    return features, out


def as_json(policy: Policy, features: Features, explained: list[Explained]) -> dict[str, Any]:
    return {
        "policy": {"file": policy.source, "stamp": policy.stamp},
        "message": {
            "subject_tags": [t for t in _tags(explained)],
            "content": {
                name: {"count": r.count, "threshold": r.threshold, "error": r.error}
                for name, r in features.content.items()
            },
        },
        "recipients": [
            {
                "recipient": e.recipient,
                "facts": e.facts.domain.to_dict(),
                "keys": e.facts.keys.to_dict(),
                "rules": [
                    {
                        "name": t.name,
                        "matched": t.matched,
                        "stopped": t.stopped,
                        "skipped": t.skipped,
                        "conditions": list(t.notes),
                    }
                    for t in e.evaluation.trace
                ],
                "decision": e.evaluation.decision.to_dict(),
            }
            for e in explained
        ],
    }


def _tags(explained: list[Explained]) -> list[str]:
    tags: dict[str, None] = {}
    for e in explained:
        tags.update(dict.fromkeys(e.evaluation.decision.strip_tags))
    return list(tags)


def as_text(policy: Policy, features: Features, explained: list[Explained]) -> str:
    lines = [f"policy     {policy.source} ({policy.stamp})"]
    for name, r in features.content.items():
        extra = f", error: {r.error} (counts as matching)" if r.error else ""
        lines.append(
            f"content    {name}: {r.count} match(es), threshold {r.threshold}"
            f" -> {'matches' if r.matched else 'no match'}{extra}"
        )
    tags = _tags(explained)
    if tags:
        lines.append(f"subject    tags {', '.join(tags)} (removed before delivery)")
    for e in explained:
        d = e.evaluation.decision
        lines.append("")
        lines.append(f"recipient  {e.recipient}")
        lines.extend(_facts_lines(e.facts.domain))
        keys = e.facts.keys
        smime = keys.smime.fingerprint[:16] if keys.smime else "none"
        pgp = keys.pgp.fingerprint[:16] if keys.pgp else "none"
        lines.append(
            f"keys       S/MIME {smime}, PGP {pgp}{'; ' + keys.error if keys.error else ''}"
        )
        for t in e.evaluation.trace:
            verdict = (
                "skipped (an earlier rule stopped)"
                if t.skipped
                else ("MATCHED" + (", stop" if t.stopped else "") if t.matched else "no match")
            )
            lines.append(f"rule       {t.name}: {verdict}")
            lines.extend(f"             {note}" for note in t.notes)
        lines.append(
            f"decision   {d.mode.value.upper()} at TLS level {d.tls_level.label} "
            f"({d.level_source}); fallback {d.fallback.value}; decided by {d.rule}"
        )
        lines.extend(f"  why      {reason}" for reason in d.reasons)
    return "\n".join(lines)


def _facts_lines(domain: DomainFacts) -> list[str]:
    if domain.via == "error":
        return [f"route      {domain.domain}: {domain.route_error}"]
    secure = "DNSSEC-signed" if domain.mx_secure else "not DNSSEC-signed"
    sts = domain.mta_sts
    if domain.mta_sts_id:
        sts += f" (id={domain.mta_sts_id}, {domain.mta_sts_source})"
    lines = [f"route      {domain.domain} via {domain.via} ({secure}); MTA-STS {sts}"]
    lines.extend(_mx_line(mx, domain) for mx in domain.mx)
    return lines


_PKIX_ERRORS = {
    "certificate_untrusted": "certificate not from a trusted CA",
    "certificate_expired": "certificate expired or not yet valid",
    "certificate_name_mismatch": "certificate does not name the host",
    "handshake_failed": "TLS handshake failed",
}


def _mx_line(mx: MxFacts, domain: DomainFacts) -> str:
    where = f"{mx.host}[{mx.ip}]:{mx.port}" if mx.ip else f"{mx.host}:{mx.port}"
    if not mx.reachable:
        return f"server     {where}: not reached ({mx.error})"
    if not mx.starttls:
        tls = "no STARTTLS"
    elif mx.tls_version is None:
        tls = f"STARTTLS offered, TLS failed ({mx.pkix_error})"
    else:
        cert = (
            "certificate valid (PKIX)"
            if mx.pkix_valid
            else _PKIX_ERRORS.get(mx.pkix_error, mx.pkix_error)
        )
        expires = f", expires {mx.cert_not_after[:10]}" if mx.cert_not_after else ""
        tls = f"{mx.tls_version} {mx.tls_cipher}, {cert}{expires}"
    dane = f"DANE {mx.tlsa.value}"
    if mx.dane_match is not None:
        dane += ", matches" if mx.dane_match else ", does NOT match"
    sts = (
        ""
        if mx.sts_match is None
        else (", in MTA-STS policy" if mx.sts_match else ", NOT in MTA-STS policy")
    )
    level = level_of(mx, domain)
    reach = level.label if level is not None else "unusable"
    return f"server     {where}: {tls}; {dane}{sts} -> reaches {reach}"
