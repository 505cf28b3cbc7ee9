"""The policy engine: facts and message features in, one Decision per recipient out.
Pure: no I/O, no clock (the caller passes ``now``), same inputs, same decision.

How rules combine (documented for admins in ``policies/README.md``):

1. Rules are read in file order; every rule whose conditions all hold *matches*.  A
   matching rule with ``stop: true`` ends the reading (that is how an exception, such
   as a partner allow-list, keeps later, broader rules from applying).
2. Every matching rule's requirements hold at once - the most secure wins: the
   allowed modes are those every matching rule allows, ``minimum`` and ``tls_level``
   are the highest any matching rule asks.  The preference order and the fallback are
   the first matching rule's that states them.  What no matching rule states comes
   from ``defaults``.
3. The mode is the first allowed mode, in preference order, that the recipient's
   facts support: ``tls`` when a server can be expected to reach the TLS level (after
   DANE and MTA-STS: DANE > MTA-STS > rule > defaults), ``smime`` / ``pgp`` when a key
   is known, ``portal`` always.  None: the fallback (``portal``, ``hold``, ``bounce``).
4. Transport facts raise the level, never lower it: a domain with MTA-STS ``enforce``
   gets at least ``mta-sts``; servers with usable TLSA records get ``dane``.
5. An error anywhere in the evaluation gives ``hold`` (nothing leaves; an admin
   sees it); a classifier that fails counts as matching.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.delivery.tls_policy import TlsLevel
from gateway.model import strongest_auth
from gateway.policy.features import Features, has_tag
from gateway.policy.language import Condition, Policy, Rule
from gateway.policy.model import STRENGTH, Action, Decision, Mode
from gateway.probe.facts import RecipientFacts, TlsaState, level_of

L = TypeVar("L", bound=enum.IntEnum)


@dataclass(frozen=True)
class RuleTrace:
    """Why a rule matched or not, condition by condition (for ``sealgate explain``)."""

    name: str
    matched: bool
    notes: tuple[str, ...]
    stopped: bool = False  # it matched and has ``stop: true``
    skipped: bool = False  # an earlier rule stopped the reading


@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    trace: tuple[RuleTrace, ...] = field(default=())


@dataclass(frozen=True)
class _Context:
    sender: str
    recipient: str
    features: Features
    facts: RecipientFacts
    policy: Policy


def tls_required_no(features: Features) -> bool:
    """The message says "TLS-Required: No" (RFC 8689 5)."""
    return any(v.strip().lower() == "no" for v in features.headers.get("tls-required", ()))


def decide(
    policy: Policy,
    sender: str,
    recipient: str,
    features: Features,
    facts: RecipientFacts,
    now: float,
    excluded: tuple[Mode, ...] = (),
) -> Evaluation:
    """The decision for one recipient.  ``excluded``: modes that already failed at
    delivery for this recipient (the decision moves on to the next one)."""
    ctx = _Context(sender.lower(), recipient.lower(), features, facts, policy)
    try:
        return _decide(ctx, now, excluded)
    except Exception as e:  # noqa: BLE001 - a bug must not let mail out: hold it
        reason = f"policy evaluation failed ({type(e).__name__}: {str(e)[:200]}): held"
        return Evaluation(
            Decision(
                Mode.HOLD,
                policy.defaults.tls_level or TlsLevel.VERIFY,
                Mode.HOLD,
                "error",
                reasons=(reason,),
                decided_at=now,
                policy=policy.stamp,
            )
        )


def _decide(ctx: _Context, now: float, excluded: tuple[Mode, ...]) -> Evaluation:  # noqa: C901, PLR0915 - the decision procedure of policies/README.md, step by step
    policy = ctx.policy
    matched: list[Rule] = []
    trace: list[RuleTrace] = []
    stopped = False
    for rule in policy.rules:
        if stopped:
            trace.append(RuleTrace(rule.name, False, (), skipped=True))
            continue
        ok, notes = _matches(rule, ctx)
        stopped = ok and rule.stop
        trace.append(RuleTrace(rule.name, ok, tuple(notes), stopped))
        if ok:
            matched.append(rule)

    reasons: list[str] = []
    d = policy.defaults
    pref_rule = _first(matched, lambda a: a.modes)
    preference = pref_rule.then.modes if pref_rule and pref_rule.then.modes else d.modes
    pref_source = f"rule {pref_rule.name}" if pref_rule else "defaults"
    assert preference is not None and d.minimum is not None and d.tls_level is not None
    restricting = [r for r in matched if r.then.modes is not None]
    minimum, min_source = _highest(matched, lambda a: a.minimum, d.minimum)
    level, level_source = _highest(matched, lambda a: a.tls_level, d.tls_level)
    fb_rule = _first(matched, lambda a: a.fallback)
    fallback = fb_rule.then.fallback if fb_rule and fb_rule.then.fallback else d.fallback
    assert fallback is not None
    # the shortest stay in the portal any matching rule asks, else the defaults'
    stays = [r.then.portal_expiry for r in matched if r.then.portal_expiry is not None]
    portal_expiry = min(stays) if stays else d.portal_expiry
    # the strongest sign-in any matching rule (or the defaults) asks
    auths = [a for a in (d.portal_auth, *(r.then.portal_auth for r in matched)) if a]
    portal_auth = strongest_auth(*auths) if auths else None

    decisive = ""
    candidates: list[Mode] = []
    for mode in preference:
        refusing = next((r for r in restricting if mode not in (r.then.modes or ())), None)
        if refusing is not None:
            reasons.append(f"{mode}: not allowed by rule {refusing.name}")
            decisive = decisive or f"rule {refusing.name}"
        elif STRENGTH[mode] < minimum:
            reasons.append(f"{mode}: below minimum {minimum.label} ({min_source})")
            decisive = decisive or min_source
        else:
            candidates.append(mode)

    chosen: Mode | None = None
    floor, floor_source = _transport_floor(ctx.facts)
    if policy.allow_tls_required_no and tls_required_no(ctx.features):
        # RFC 8689 5: the sender asks that TLS policies be ignored; allowed here
        level = floor = TlsLevel.MAY
        level_source = floor_source = "TLS-Required: No (allow_tls_required_no)"
    for mode in candidates:
        if mode in excluded:
            reasons.append(f"{mode}: failed at delivery")
            continue
        usable, why = _available(mode, ctx.facts, level, level_source, policy.discovered_keys)
        reasons.append(f"{mode}: {why}")
        if usable:
            chosen = mode
            break
        decisive = decisive or (level_source if mode is Mode.TLS else pref_source)
    if chosen is None:
        chosen = fallback
        reasons.append(f"no allowed mode can be used: fallback {fallback}")
        decisive = f"rule {fb_rule.name}" if fb_rule else decisive or "defaults"

    if chosen is Mode.TLS:
        tls_level = level
        if floor > level:
            tls_level, level_source = floor, floor_source
    else:
        # An end-to-end copy or a portal notice: TLS when offered, and what the
        # domain itself requires (DANE, MTA-STS).
        tls_level = max(TlsLevel.MAY, floor)
        level_source = floor_source if floor > TlsLevel.MAY else "opportunistic"
    tags = tuple(t for t in policy.subject_tags if has_tag(ctx.features.subject, t))
    facts = ctx.facts.domain.to_dict()
    facts["keys"] = ctx.facts.keys.to_dict()
    if ctx.features.content:
        facts["content"] = {
            name: {"count": r.count, "threshold": r.threshold, "error": r.error}
            for name, r in ctx.features.content.items()
        }
    decision = Decision(
        mode=chosen,
        tls_level=tls_level,
        fallback=fallback,
        rule=(decisive or pref_source).removeprefix("rule "),
        rules=tuple(r.name for r in matched),
        reasons=tuple(reasons),
        level_source=level_source,
        candidates=tuple(candidates),
        excluded=excluded,
        strip_tags=tags,
        facts=facts,
        decided_at=now,
        policy=policy.stamp,
        portal_expiry=portal_expiry,
        portal_auth=portal_auth,
    )
    return Evaluation(decision, tuple(trace))


def _first(rules: list[Rule], get: Callable[[Action], object]) -> Rule | None:
    return next((r for r in rules if get(r.then) is not None), None)


def _highest(rules: list[Rule], get: Callable[[Action], L | None], default: L) -> tuple[L, str]:
    """The highest value the matching rules state, and which rule stated it; the
    default when none does."""
    best, source, stated = default, "defaults", False
    for rule in rules:
        value = get(rule.then)
        if value is not None and (not stated or value > best):
            best, source, stated = value, f"rule {rule.name}", True
    return best, source


def _transport_floor(facts: RecipientFacts) -> tuple[TlsLevel, str]:
    """What the domain itself requires of every copy (RFC 7672, RFC 8461)."""
    domain = facts.domain
    reached = [m for m in domain.mx if m.reachable and level_of(m, domain) is not None]
    if reached and all(m.tlsa is TlsaState.USABLE for m in reached):
        return TlsLevel.DANE, "dane"
    if domain.sts_enforced:
        return TlsLevel.MTA_STS, "mta-sts"
    return TlsLevel.NONE, ""


def _available(
    mode: Mode, facts: RecipientFacts, level: TlsLevel, level_source: str, discovered: bool
) -> tuple[bool, str]:
    if mode is Mode.SMIME:
        key = facts.keys.smime
        if key is None:
            return False, "no S/MIME certificate known" + _key_error(facts)
        return True, f"S/MIME certificate {key.fingerprint[:16]} ({key.source})"
    if mode is Mode.PGP:
        key = facts.keys.pgp
        if key is None:
            return False, "no PGP key known" + _key_error(facts)
        if key.source == "wkd" and not discovered:
            return False, (
                f"PGP key {key.fingerprint[:16]} was found by WKD; the policy does not "
                "use discovered keys (discovered_keys: false)"
            )
        return True, f"PGP key {key.fingerprint[:16]} ({key.source})"
    if mode is Mode.PORTAL:
        return True, "always available"
    return _tls_available(facts, level, level_source)


def _key_error(facts: RecipientFacts) -> str:
    return f" (key lookup failed: {facts.keys.error})" if facts.keys.error else ""


def _tls_available(facts: RecipientFacts, level: TlsLevel, source: str) -> tuple[bool, str]:
    domain = facts.domain
    need = f"level {level.label} ({source})"
    if domain.via == "error":
        return True, f"{need}: routing failed ({domain.route_error}); delivery will enforce it"
    best: TlsLevel | None = None
    usable = domain.mx
    if domain.sts_enforced:
        usable = tuple(m for m in domain.mx if m.sts_match is not False)
        if not usable:
            why = f"no MX host matches the MTA-STS policy (id={domain.mta_sts_id})"
            return False, f"{need}: {why}"
    for mx in usable:
        if not mx.reachable:
            continue
        reach = level_of(mx, domain)
        if reach is not None and reach >= level:
            return True, f"{need}: {mx.host} reaches {reach.label}{_how(mx.tls_version)}"
        if reach is not None and (best is None or reach > best):
            best = reach
    if not any(m.reachable for m in usable):
        return True, f"{need}: no server was reached by the probe; delivery will enforce it"
    best_text = best.label if best is not None else "no usable server"
    if any(not mx.reachable for mx in usable):
        return True, (
            f"{need}: the servers reached fall short (best: {best_text}), "
            "others were not reached; delivery will enforce it"
        )
    return False, f"{need} not reached by any server (best: {best_text})"


def _how(version: str | None) -> str:
    return f" ({version})" if version else ""


# -- conditions ---------------------------------------------------------------------------


def _matches(rule: Rule, ctx: _Context) -> tuple[bool, list[str]]:
    notes = []
    ok = True
    for cond in rule.when:
        try:
            hit, note = _condition(cond, ctx)
        except Exception as e:  # noqa: BLE001 - see decide(): never weaker on error
            hit = not rule.stop
            note = (
                f"{cond.kind}: error {type(e).__name__}; counted as {'' if hit else 'not '}matching"
            )
        notes.append(("yes " if hit else "no  ") + note)
        ok = ok and hit
    if not rule.when:
        notes.append("yes (no conditions: every recipient)")
    return ok, notes


def domain_matches(domain: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def _in_list(address: str, entries: tuple[str, ...]) -> bool:
    domain = address.rpartition("@")[2]
    return any(address == e if "@" in e else domain_matches(domain, e) for e in entries)


def _condition(cond: Condition, ctx: _Context) -> tuple[bool, str]:  # noqa: C901 - one branch per condition of the policy language
    kind, values = cond.kind, cond.values
    if kind in ("sender", "recipient"):
        address = ctx.sender if kind == "sender" else ctx.recipient
        return address in values, f"{kind} is one of {len(values)} address(es)"
    if kind in ("sender_domain", "recipient_domain"):
        address = ctx.sender if kind == "sender_domain" else ctx.recipient
        domain = address.rpartition("@")[2]
        hit = any(domain_matches(domain, p) for p in values)
        return hit, f"{kind} {domain} in {', '.join(values)}"
    if kind in ("sender_list", "recipient_list"):
        address = ctx.sender if kind == "sender_list" else ctx.recipient
        hit = any(_in_list(address, ctx.policy.lists[name]) for name in values)
        return hit, f"{kind.split('_')[0]} in list {', '.join(values)}"
    if kind == "header":
        for name, patterns in values:
            found = ctx.features.headers.get(name, ())
            if not any(p.search(v) for p in patterns for v in found):
                return False, f"header {name}: {'no match' if found else 'absent'}"
        return True, "header " + ", ".join(name for name, _ in values) + " matches"
    if kind == "subject_tag":
        hit = any(has_tag(ctx.features.subject, t) for t in values)
        return hit, f"subject tag {' or '.join(values)}"
    if kind == "content":
        parts = []
        hit = False
        for name in values:
            result = ctx.features.content.get(name)
            if result is None:  # not computed: assume the worst
                hit = True
                parts.append(f"{name}: not scanned, counted as matching")
                continue
            hit = hit or result.matched
            extra = f", error {result.error}: counted as matching" if result.error else ""
            parts.append(f"{name}: {result.count} match(es), threshold {result.threshold}{extra}")
        return hit, "content " + "; ".join(parts)
    # facts
    notes = []
    for name, expected in values:
        actual = _fact(name, ctx)
        if actual != expected:
            return False, f"fact {name} is {actual}, not {expected}"
        notes.append(f"{name}={actual}")
    return True, "facts " + ", ".join(notes)


def _fact(name: str, ctx: _Context) -> object:
    facts, domain = ctx.facts, ctx.facts.domain
    if name == "dkim_key":
        return ctx.features.dkim_key
    if name == "dane":
        return any(m.tlsa is TlsaState.USABLE and bool(m.dane_match) for m in domain.mx)
    if name == "mta_sts":
        return domain.mta_sts
    if name == "starttls":
        return any(bool(m.starttls) for m in domain.mx)
    if name == "pkix":
        return any(bool(m.pkix_valid) for m in domain.mx)
    if name == "smime_key":
        return facts.keys.smime is not None
    if name == "pgp_key":
        return facts.keys.pgp is not None
    raise KeyError(name)
