"""The engine, table-driven: facts and a message in, a decision out."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.delivery.tls_policy import TlsLevel
from gateway.policy.classifiers import ClassifierResult
from gateway.policy.engine import decide
from gateway.policy.features import Features, message_features
from gateway.policy.language import load_policy, load_policy_text
from gateway.policy.model import Mode
from tests.policy.facts import (
    DANE_BAD,
    DANE_OK,
    PKIX,
    PLAIN,
    SELF_SIGNED,
    T0,
    TLSA_SERVFAIL,
    UNREACHED,
    facts,
)

POLICIES = Path(__file__).parents[2] / "policies"
DEFAULT = load_policy(POLICIES / "default.yaml")
STRICT = load_policy(POLICIES / "examples" / "hipaa-strict.yaml")
PARTNERS = load_policy(POLICIES / "examples" / "partner-allow-list.yaml")


def message(
    subject: str = "Lab results", body: str = "See you Tuesday.", headers: str = ""
) -> bytes:
    return (
        f"From: dr@clinic.test\r\nTo: bob@d.test\r\nSubject: {subject}\r\n{headers}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def run(policy, rcpt_facts, data=None, sender="dr@clinic.test", excluded=()):
    features = message_features(policy, data or message())
    return decide(policy, sender, rcpt_facts.address, features, rcpt_facts, T0, excluded).decision


ADAPTIVE = [
    # (case, facts, mode, tls level, what set the level)
    ("pkix-valid certificate", facts(PKIX), Mode.TLS, TlsLevel.VERIFY, "defaults"),
    ("self-signed, no key", facts(SELF_SIGNED), Mode.PORTAL, TlsLevel.MAY, "opportunistic"),
    (
        "self-signed, S/MIME cert",
        facts(SELF_SIGNED, smime=True),
        Mode.SMIME,
        TlsLevel.MAY,
        "opportunistic",
    ),
    ("self-signed, PGP key", facts(SELF_SIGNED, pgp=True), Mode.PGP, TlsLevel.MAY, "opportunistic"),
    (
        "plaintext, both keys",
        facts(PLAIN, smime=True, pgp=True),
        Mode.SMIME,
        TlsLevel.MAY,
        "opportunistic",
    ),
    ("DANE match", facts(DANE_OK), Mode.TLS, TlsLevel.DANE, "dane"),
    ("DANE mismatch", facts(DANE_BAD), Mode.PORTAL, TlsLevel.MAY, "opportunistic"),
    ("TLSA SERVFAIL", facts(TLSA_SERVFAIL), Mode.PORTAL, TlsLevel.MAY, "opportunistic"),
    (
        "MTA-STS enforce, MX matches",
        facts(PKIX, sts="enforce", sts_match=True),
        Mode.TLS,
        TlsLevel.MTA_STS,
        "mta-sts",
    ),
    (
        "MTA-STS enforce, MX not in policy",
        facts(PKIX, sts="enforce", sts_match=False),
        Mode.PORTAL,
        TlsLevel.MTA_STS,
        "mta-sts",
    ),
    (
        "MTA-STS testing",
        facts(PKIX, sts="testing", sts_match=False),
        Mode.TLS,
        TlsLevel.VERIFY,
        "defaults",
    ),
    (
        "MTA-STS enforce, self-signed",
        facts(SELF_SIGNED, sts="enforce", sts_match=True),
        Mode.PORTAL,
        TlsLevel.MTA_STS,
        "mta-sts",
    ),
    (
        "server not reached: delivery enforces",
        facts(UNREACHED),
        Mode.TLS,
        TlsLevel.VERIFY,
        "defaults",
    ),
    ("one good one plaintext server", facts(PLAIN, PKIX), Mode.TLS, TlsLevel.VERIFY, "defaults"),
]


@pytest.mark.parametrize(
    ("case", "rcpt", "mode", "level", "source"), ADAPTIVE, ids=[c[0] for c in ADAPTIVE]
)
def test_the_default_policy_is_adaptive(case, rcpt, mode, level, source):
    d = run(DEFAULT, rcpt)
    assert (d.mode, d.tls_level, d.level_source) == (mode, level, source), d.reasons
    assert d.policy == DEFAULT.stamp and d.decided_at == T0
    assert d.facts["domain"] == "d.test"


def test_a_decision_says_why_for_every_mode_it_passed_over():
    d = run(DEFAULT, facts(SELF_SIGNED))
    assert d.rule == "defaults" and d.fallback is Mode.PORTAL
    assert d.reasons[0].startswith(
        "tls: level verify (defaults) not reached by any server (best: encrypt)"
    )
    assert d.reasons[1] == "smime: no S/MIME certificate known"
    assert d.reasons[2] == "pgp: no PGP key known"
    assert d.reasons[3] == "portal: always available"


def test_a_subject_tag_requires_end_to_end_and_is_to_be_removed():
    data = message(subject="[SECURE] Lab results")
    d = run(DEFAULT, facts(PKIX), data)
    assert d.mode is Mode.PORTAL and d.rule == "secure-tag"
    assert d.rules == ("secure-tag",) and d.strip_tags == ("[secure]",)
    assert "tls: below minimum end-to-end (rule secure-tag)" in d.reasons
    assert run(DEFAULT, facts(PKIX, pgp=True), data).mode is Mode.PGP


def test_sensitivity_header_requires_end_to_end():
    d = run(
        DEFAULT, facts(PKIX, smime=True), message(headers="Sensitivity: Company-Confidential\r\n")
    )
    assert (d.mode, d.rule) == (Mode.SMIME, "sensitivity")
    assert run(DEFAULT, facts(PKIX), message(headers="Sensitivity: Normal\r\n")).mode is Mode.TLS


SSN_BODY = "Patient SSN 123-45-6789, please file."
STRICT_CASES = [
    ("PKIX alone is not proof", facts(PKIX), message(), Mode.PORTAL, "defaults"),
    (
        "MTA-STS enforce is",
        facts(PKIX, sts="enforce", sts_match=True),
        message(),
        Mode.TLS,
        "defaults",
    ),
    ("DANE is", facts(DANE_OK), message(), Mode.TLS, "defaults"),
    (
        "PHI goes end to end",
        facts(DANE_OK, smime=True),
        message(body=SSN_BODY),
        Mode.SMIME,
        "phi-content",
    ),
    (
        "PHI without a key: portal",
        facts(DANE_OK),
        message(body=SSN_BODY),
        Mode.PORTAL,
        "phi-content",
    ),
    ("[encrypt] tag", facts(DANE_OK), message(subject="[encrypt] x"), Mode.PORTAL, "secure-tag"),
    (
        "consumer mailbox",
        facts(DANE_OK, address="pat@gmail.com"),
        message(),
        Mode.PORTAL,
        "consumer-mailboxes",
    ),
    (
        "consumer mailbox with a PGP key",
        facts(DANE_OK, pgp=True, address="pat@gmail.com"),
        message(),
        Mode.PGP,
        "consumer-mailboxes",
    ),
    (
        "2 account numbers: under the threshold",
        facts(DANE_OK),
        message(body="ACCT-0012345 and ACCT-0012346"),
        Mode.TLS,
        "defaults",
    ),
    (
        "3 account numbers: at the threshold",
        facts(DANE_OK),
        message(body="ACCT-0012345, ACCT-0012346, ACCT-0012347"),
        Mode.PORTAL,
        "phi-content",
    ),
]


@pytest.mark.parametrize(
    ("case", "rcpt", "data", "mode", "rule"), STRICT_CASES, ids=[c[0] for c in STRICT_CASES]
)
def test_hipaa_strict(case, rcpt, data, mode, rule):
    d = run(STRICT, rcpt, data)
    assert (d.mode, d.rule) == (mode, rule), d.reasons


def test_hipaa_strict_billing_robot_never_tls_alone():
    d = run(STRICT, facts(DANE_OK), sender="Billing-NoReply@hospital.example")
    assert (d.mode, d.rule) == (Mode.PORTAL, "billing-robot")


PARTNER_CASES = [
    (
        "partner with PHI: TLS, the PHI rule is not read",
        "x@lab.partner.example",
        facts(PKIX),
        SSN_BODY,
        Mode.TLS,
    ),
    (
        "partner without verified TLS: held",
        "x@lab.partner.example",
        facts(SELF_SIGNED),
        "",
        Mode.HOLD,
    ),
    ("subdomain wildcard", "x@icu.hospital-network.example", facts(PKIX), SSN_BODY, Mode.TLS),
    (
        "the wildcard does not cover the parent",
        "x@hospital-network.example",
        facts(PKIX),
        SSN_BODY,
        Mode.PORTAL,
    ),
    ("listed address", "claims@payer.example", facts(PKIX), SSN_BODY, Mode.TLS),
    ("another address of that domain", "other@payer.example", facts(PKIX), SSN_BODY, Mode.PORTAL),
    ("anyone else, no PHI", "x@else.test", facts(PKIX), "", Mode.TLS),
]


@pytest.mark.parametrize(
    ("case", "rcpt", "rcpt_facts", "body", "mode"), PARTNER_CASES, ids=[c[0] for c in PARTNER_CASES]
)
def test_partner_allow_list(case, rcpt, rcpt_facts, body, mode):
    rcpt_facts = facts(*rcpt_facts.domain.mx, address=rcpt)
    d = run(PARTNERS, rcpt_facts, message(body=body or "hello"))
    assert d.mode is mode, d.reasons


COMBINE = """
version: 1
defaults: {modes: [tls, smime, pgp, portal], tls_level: verify, fallback: portal}
rules:
  - name: legacy
    when: {recipient_domain: d.test}
    then: {tls_level: may, modes: [tls, portal], fallback: hold}
  - name: careful
    when: {recipient_domain: "*.test"}
    then: {tls_level: encrypt, modes: [portal, smime, tls], fallback: bounce}
  - name: stopper
    when: {recipient: bob@d.test}
    then: {minimum: portal}
    stop: true
  - name: never-read
    when: {recipient: bob@d.test}
    then: {fallback: bounce}
"""


def test_every_matching_rule_holds_and_the_most_secure_wins():
    policy = load_policy_text(COMBINE)
    d = run(policy, facts(PLAIN, address="eve@d.test"))
    # allowed: tls and portal (both rules allow them), in the first rule's order;
    # level: the higher of may and encrypt; fallback: the first rule's.
    assert d.candidates == (Mode.TLS, Mode.PORTAL)
    assert d.rules == ("legacy", "careful")
    assert d.mode is Mode.PORTAL and d.fallback is Mode.HOLD
    assert "tls: level encrypt (rule careful) not reached by any server (best: may)" in d.reasons
    assert d.rule == "careful"
    d = run(policy, facts(SELF_SIGNED, address="eve@d.test"))
    assert (d.mode, d.tls_level, d.level_source) == (Mode.TLS, TlsLevel.ENCRYPT, "rule careful")


def test_stop_ends_the_reading():
    policy = load_policy_text(COMBINE)
    evaluation = decide(
        policy, "a@b.test", "bob@d.test", message_features(policy, message()), facts(PKIX), T0
    )
    d = evaluation.decision
    assert d.rules == ("legacy", "careful", "stopper") and d.mode is Mode.PORTAL
    assert d.fallback is Mode.HOLD  # never-read's bounce was not read
    assert [t.skipped for t in evaluation.trace] == [False, False, False, True]
    assert evaluation.trace[2].stopped


@pytest.mark.parametrize(
    ("level", "rcpt", "expected", "source"),
    [
        ("none", facts(DANE_OK), TlsLevel.DANE, "dane"),
        ("may", facts(PKIX, sts="enforce", sts_match=True), TlsLevel.MTA_STS, "mta-sts"),
        ("dane", facts(PKIX, sts="enforce", sts_match=True), None, ""),
        ("verify", facts(PKIX), TlsLevel.VERIFY, "rule r"),
        ("may", facts(PLAIN), TlsLevel.MAY, "rule r"),
    ],
)
def test_transport_precedence_dane_over_mta_sts_over_the_rule(level, rcpt, expected, source):
    policy = load_policy_text(
        f"version: 1\nrules:\n  - name: r\n    then: {{modes: [tls], tls_level: {level}, fallback: bounce}}\n"
    )
    d = run(policy, rcpt)
    if expected is None:  # the rule asks for DANE; MTA-STS does not satisfy it
        assert d.mode is Mode.BOUNCE
    else:
        assert (d.mode, d.tls_level, d.level_source) == (Mode.TLS, expected, source)


def test_a_mode_that_failed_at_delivery_is_passed_over():
    d = run(DEFAULT, facts(PKIX, pgp=True), excluded=(Mode.TLS,))
    assert d.mode is Mode.PGP and d.excluded == (Mode.TLS,)
    assert "tls: failed at delivery" in d.reasons


def test_a_classifier_error_counts_as_phi():
    features = Features(subject="x", content={"phi": ClassifierResult(0, 1, "ValueError: too big")})
    d = decide(STRICT, "a@b.test", "bob@d.test", features, facts(DANE_OK), T0).decision
    assert (d.mode, d.rule) == (Mode.PORTAL, "phi-content")


def test_an_error_in_the_evaluation_holds_the_recipient():
    d = decide(DEFAULT, "a@b.test", "bob@d.test", Features(), None, T0).decision  # type: ignore[arg-type]
    assert d.mode is Mode.HOLD and d.rule == "error"
    assert d.reasons[0].startswith("policy evaluation failed (AttributeError")


def test_fact_conditions():
    policy = load_policy_text(
        """
version: 1
rules:
  - name: dane-partners-any-content
    when: {facts: {dane: true}}
    then: {modes: [tls]}
  - name: no-starttls
    when: {facts: {starttls: false, pgp_key: true}}
    then: {modes: [pgp], fallback: bounce}
"""
    )
    assert run(policy, facts(DANE_OK)).rules == ("dane-partners-any-content",)
    assert run(policy, facts(PLAIN, pgp=True)).mode is Mode.PGP
    assert run(policy, facts(PLAIN)).rules == ()


def test_a_key_found_by_wkd_counts_only_where_the_policy_allows_it():
    from dataclasses import replace

    from gateway.probe.facts import KeyInfo, KnownKeys

    found = facts(SELF_SIGNED)
    found = replace(found, keys=KnownKeys(pgp=KeyInfo("pgp", "ef" * 20, "wkd")))
    d = run(DEFAULT, found)
    assert d.mode is Mode.PORTAL
    assert "discovered_keys: false" in " ".join(d.reasons)
    allowing = load_policy_text("version: 1\ndiscovered_keys: true\n")
    assert run(allowing, found).mode is Mode.PGP
