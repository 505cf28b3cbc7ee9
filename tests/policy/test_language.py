"""Policy files: what loads, and the exact error (file, line, key) for what does not."""

from __future__ import annotations

import pytest

from gateway.delivery.tls_policy import TlsLevel
from gateway.policy.language import BUILTIN_DEFAULTS, PolicyError, load_policy, load_policy_text
from gateway.policy.model import Minimum, Mode

GOOD = """\
version: 1
defaults:
  tls_level: mta-sts
lists:
  partners: [lab.test, "*.net.test", a@b.test]
classifiers:
  phi: {detectors: [ssn, dob], patterns: ['\\bACCT-\\d+'], threshold: 2}
rules:
  - name: partners
    when: {recipient_list: partners, header: {Sensitivity: private}}
    then: {modes: [tls], fallback: hold}
    stop: true
  - name: phi
    when: {content: phi}
    then: {minimum: end-to-end}
"""


def test_a_good_policy_loads_with_defaults_filled_in():
    p = load_policy_text(GOOD, "good.yaml")
    assert p.defaults.tls_level is TlsLevel.MTA_STS
    assert p.defaults.modes == BUILTIN_DEFAULTS.modes and p.defaults.fallback is Mode.PORTAL
    assert p.lists["partners"] == ("lab.test", "*.net.test", "a@b.test")
    assert p.classifiers["phi"].threshold == 2
    assert [r.name for r in p.rules] == ["partners", "phi"]
    assert p.rules[0].stop and p.rules[0].line == 9
    assert p.rules[1].then.minimum is Minimum.END_TO_END
    assert p.reads_content and p.stamp.startswith("good.yaml@")


BAD = [
    ("version: 2\n", 1, "version", "this Sealgate reads policy version 1"),
    ("rules: []\n", 1, "version", "missing"),
    (
        "version: 1\ndefaults:\n  modez: [tls]\n",
        3,
        "defaults.modez",
        "unknown key (did you mean 'modes'?)",
    ),
    (
        "version: 1\ndefaults:\n  modes: [tls, email]\n",
        3,
        "defaults.modes",
        "'email' is not one of: tls, smime, pgp, portal",
    ),
    (
        "version: 1\ndefaults:\n  fallback: tls\n",
        3,
        "defaults.fallback",
        "'tls' is not one of: portal, hold, bounce",
    ),
    (
        "version: 1\ndefaults:\n  tls_level: strong\n",
        3,
        "defaults.tls_level",
        "'strong' is not a TLS level",
    ),
    (
        "version: 1\nrules:\n  - name: a\n    then: {minimum: portal, modes: [tls, smime]}\n",
        4,
        "rules[a].then",
        "no mode in 'modes' meets 'minimum: portal'",
    ),
    (
        "version: 1\nrules:\n  - name: a\n    then: {minimum: tls}\n  - name: a\n    then: {minimum: tls}\n",
        5,
        "rules[1].name",
        "a second rule named 'a'",
    ),
    ("version: 1\nrules:\n  - then: {minimum: tls}\n", 3, "rules[0].name", "missing"),
    ("version: 1\nrules:\n  - name: a\n", 3, "rules[a].then", "missing"),
    (
        "version: 1\nrules:\n  - name: a\n    when:\n      recipient_list: partners\n    then: {minimum: tls}\n",
        5,
        "rules[a].when.recipient_list",
        "no list named 'partners' is defined",
    ),
    (
        "version: 1\nclassifiers:\n  phi: {detectors: [ssn]}\nrules:\n  - name: a\n    when: {content: phj}\n"
        "    then: {minimum: tls}\n",
        6,
        "rules[a].when.content",
        "no classifier named 'phj' is defined (did you mean 'phi'?)",
    ),
    (
        "version: 1\nclassifiers:\n  c:\n    patterns:\n      - ok\n      - '(unclosed'\n",
        6,
        "classifiers.c.patterns",
        "not a valid regular expression",
    ),
    (
        "version: 1\nclassifiers:\n  c: {detectors: [passport]}\n",
        3,
        "classifiers.c.detectors",
        "'passport' is not a detector",
    ),
    (
        "version: 1\nclassifiers:\n  c: {detectors: [ssn], threshold: 0}\n",
        3,
        "classifiers.c.threshold",
        "at least 1",
    ),
    ("version: 1\nlists:\n  l: [not a domain]\n", 3, "lists.l", "is not a domain"),
    (
        "version: 1\nrules:\n  - name: a\n    when:\n      sender: example.com\n    then: {minimum: tls}\n",
        5,
        "rules[a].when.sender",
        "is not a mail address (use *_domain for domains)",
    ),
    (
        "version: 1\nrules:\n  - name: a\n    when:\n      facts: {dane: yes-please}\n    then: {minimum: tls}\n",
        5,
        "rules[a].when.facts.dane",
        "is not true or false",
    ),
    (
        "version: 1\nrules:\n  - name: a\n    when:\n      recipeint: x@y.test\n    then: {minimum: tls}\n",
        5,
        "rules[a].when.recipeint",
        "unknown key (did you mean 'recipient'?)",
    ),
    ("version: 1\nrules:\n  - name: a\n    then: {}\n", 4, "rules[a].then", "says nothing"),
    ("version: 1\nversion: 1\n", 2, "version", "key appears twice"),
    ("version: 1\nrules: [\n", 3, "", "not valid YAML"),
    ("", None, "", "the policy file is empty"),
]


@pytest.mark.parametrize(("text", "line", "key", "problem"), BAD, ids=[b[3][:40] for b in BAD])
def test_errors_name_the_file_the_line_and_the_key(text, line, key, problem):
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "p.yaml")
    e = err.value
    assert (e.source, e.line, e.key) == ("p.yaml", line, key), str(e)
    assert problem in e.problem
    assert str(e).startswith(f"p.yaml:{line}: " if line else "p.yaml: ")


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file: No such file"):
        load_policy(tmp_path / "nope.yaml")


def test_the_example_in_the_policy_readme_loads_as_documented():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "policies" / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    p = load_policy_text(example, "README.md")
    assert [r.name for r in p.rules] == ["partners"] and p.rules[0].stop
    assert p.scan_limit == 10_000_000 and p.classifiers["phi"].threshold == 1
    assert p.defaults == BUILTIN_DEFAULTS  # the defaults shown are the built-in ones


def test_the_embedded_default_is_the_documented_default_policy():
    from pathlib import Path

    from gateway.policy.language import default_policy_path

    shipped = Path(__file__).parents[2] / "policies" / "default.yaml"
    assert default_policy_path().read_bytes() == shipped.read_bytes()
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"policy/default.yaml"' in pyproject  # in the wheel too


def test_portal_expiry_the_shortest_of_the_matching_rules_else_the_defaults():
    from gateway.policy.engine import decide
    from gateway.policy.features import Features
    from tests.policy.facts import UNREACHED, facts

    policy = load_policy_text(
        "version: 1\ndefaults: {portal_expiry: 14d}\nrules:\n"
        "  - {name: lab, when: {sender_domain: lab.test}, then: {portal_expiry: 7d}}\n"
        "  - {name: any, when: {}, then: {portal_expiry: 10d}}\n"
        "  - {name: bad, when: {sender_domain: never.test}, then: {portal_expiry: 1h}}\n",
        "p.yaml",
    )
    known = facts(UNREACHED, address="r@d.test")

    def stay(sender: str) -> float | None:
        return decide(policy, sender, "r@d.test", Features(), known, 0.0).decision.portal_expiry

    assert stay("a@lab.test") == 7 * 86400
    assert stay("a@clinic.test") == 10 * 86400
    with pytest.raises(
        PolicyError, match=r"p.yaml:3: rules\[x\].then.portal_expiry: .soon. is not"
    ):
        load_policy_text(
            "version: 1\nrules:\n  - {name: x, when: {}, then: {portal_expiry: soon}}\n", "p.yaml"
        )


def test_portal_auth_the_strongest_of_the_matching_rules_and_the_defaults():
    from gateway.model import PortalAuth
    from gateway.policy.engine import decide
    from gateway.policy.features import Features
    from tests.policy.facts import UNREACHED, facts

    policy = load_policy_text(
        "version: 1\ndefaults: {portal_auth: password}\nrules:\n"
        "  - {name: lab, when: {sender_domain: lab.test}, then: {portal_auth: passphrase}}\n"
        "  - {name: weak, when: {}, then: {portal_auth: code}}\n"
        "  - {name: idp, when: {sender_domain: never.test}, then: {portal_auth: oidc}}\n",
        "p.yaml",
    )
    known = facts(UNREACHED, address="r@d.test")

    def auth(sender: str) -> PortalAuth | None:
        return decide(policy, sender, "r@d.test", Features(), known, 0.0).decision.portal_auth

    assert auth("a@lab.test") is PortalAuth.PASSPHRASE
    assert auth("a@clinic.test") is PortalAuth.PASSWORD  # 'code' cannot lower the defaults
    with pytest.raises(PolicyError, match=r"p.yaml:3: rules\[x\].then.portal_auth: 'sms' is not"):
        load_policy_text(
            "version: 1\nrules:\n  - {name: x, when: {}, then: {portal_auth: sms}}\n", "p.yaml"
        )
