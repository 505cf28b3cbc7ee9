"""The policy language: load and check a policy file (YAML), with file and line in
every error.  The language itself is documented in ``policies/README.md``.

Loading is strict, like the configuration's: an unknown key (with a "did you mean"
hint), a duplicated key or rule name, a list or classifier that is not defined, a
regular expression that does not compile, a mode, level or fallback that does not
exist, a rule whose modes can never meet its own minimum - each is a `PolicyError`
naming the file, the line and the key, and nothing of the file is used.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gateway.config import Config, parse_duration, parse_size
from gateway.delivery.tls_policy import TlsLevel
from gateway.errors import ConfigError
from gateway.model import PortalAuth
from gateway.policy.classifiers import (
    DEFAULT_SCAN_TIME,
    DETECTORS,
    IGNORE,
    SENSITIVE,
    Classifier,
)
from gateway.policy.model import DELIVERY_MODES, FALLBACKS, STRENGTH, Action, Minimum, Mode

T = TypeVar("T")

BUILTIN_DEFAULTS = Action(
    modes=(Mode.TLS, Mode.SMIME, Mode.PGP, Mode.PORTAL),
    minimum=Minimum.TLS,
    tls_level=TlsLevel.VERIFY,
    fallback=Mode.PORTAL,
)
DEFAULT_SCAN_LIMIT = 10 * 1024 * 1024
FACTS = {
    "dane": bool,  # some server is authenticated by DANE
    "mta_sts": ("enforce", "testing", "none"),  # the domain's MTA-STS mode
    "starttls": bool,  # some server offers STARTTLS
    "pkix": bool,  # some server has a certificate valid for its name
    "smime_key": bool,
    "pgp_key": bool,
    "dkim_key": bool,  # the gateway holds a DKIM key of the message's From domain
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DOMAIN = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)


class PolicyError(ConfigError):
    """A policy file is wrong: file, line, key and what is wrong."""


@dataclass(frozen=True)
class Condition:
    kind: str  # the key under ``when``
    values: tuple[Any, ...]
    line: int


@dataclass(frozen=True)
class Rule:
    name: str
    when: tuple[Condition, ...]
    then: Action
    stop: bool = False
    description: str = ""
    line: int = 0


@dataclass(frozen=True)
class Policy:
    source: str
    stamp: str  # file name and the first digits of its SHA-256: which policy decided
    defaults: Action
    rules: tuple[Rule, ...]
    lists: dict[str, tuple[str, ...]]
    classifiers: dict[str, Classifier]
    scan_limit: int = DEFAULT_SCAN_LIMIT
    scan_time: float = DEFAULT_SCAN_TIME  # seconds to read a message's documents
    unreadable: str = SENSITIVE  # what a document that cannot be read counts as
    discovered_keys: bool = False  # keys found by WKD may be used
    # a message's "TLS-Required: No" (RFC 8689 5) lowers its TLS to opportunistic
    allow_tls_required_no: bool = False

    @functools.cached_property
    def reads_content(self) -> bool:
        return any(c.kind == "content" for r in self.rules for c in r.when)

    @functools.cached_property
    def subject_tags(self) -> tuple[str, ...]:
        """Every subject tag a rule names: removed from the subject before delivery."""
        tags = (v for r in self.rules for c in r.when if c.kind == "subject_tag" for v in c.values)
        return tuple(dict.fromkeys(tags))


# -- reading YAML nodes with their lines ---------------------------------------------


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def error(self, node: yaml.Node | None, key: str, problem: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(key, problem, self.source, line)

    def mapping(
        self, node: yaml.Node, key: str, allowed: tuple[str, ...] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, "expected a mapping of keys")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            sub = f"{key}.{name}" if key else name
            if name in out:
                raise self.error(key_node, sub, "key appears twice")
            if allowed is not None and name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise self.error(key_node, sub, f"unknown key{suffix}")
            out[name] = (key_node, value_node)
        return out

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, "expected a single value")
        return yaml.safe_load(yaml.serialize(node))

    def text(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(node, key, f"{value!r} is not a non-empty string")
        return value

    def flag(self, node: yaml.Node, key: str) -> bool:
        value = self.scalar(node, key)
        if not isinstance(value, bool):
            raise self.error(node, key, f"{value!r} is not true or false")
        return value

    def texts(self, node: yaml.Node, key: str) -> list[tuple[str, yaml.Node]]:
        """One string or a list of them (each with its node, for its line)."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if isinstance(node, yaml.SequenceNode) and not items:
            raise self.error(node, key, "the list is empty")
        return [(self.text(n, f"{key}[{i}]"), n) for i, n in enumerate(items)]

    def parsed(self, node: yaml.Node, key: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(self.text(node, key))
        except ValueError as e:
            raise self.error(node, key, str(e)) from None


# -- the document ----------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError("", f"cannot read the policy file: {e.strerror}", str(path)) from None
    except UnicodeDecodeError:
        raise PolicyError("", "the policy file is not UTF-8", str(path)) from None
    return load_policy_text(text, str(path))


def load_policy_for(config: Config) -> Policy:
    """The policy ``config`` names (``policy.file``), or the embedded default."""
    return load_policy(config.policy.file or default_policy_path())


def default_policy_path() -> Path:
    """The embedded default policy (``policies/default.yaml``, shipped in the package)."""
    return Path(__file__).with_name("default.yaml").resolve()


def load_policy_text(text: str, source: str = "<policy>") -> Policy:  # noqa: C901 - one branch per top-level key of the language
    r = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = mark.line + 1 if mark is not None else None
        raise PolicyError("", f"not valid YAML: {problem}", source, line) from None
    if root is None:
        raise PolicyError("", "the policy file is empty (it needs at least 'version: 1')", source)
    top = r.mapping(
        root,
        "",
        (
            "version",
            "description",
            "defaults",
            "lists",
            "classifiers",
            "rules",
            "scan_limit",
            "scan_time",
            "unreadable",
            "discovered_keys",
            "allow_tls_required_no",
        ),
    )
    if "version" not in top:
        raise r.error(root, "version", "missing: write 'version: 1' at the top")
    version_node = top["version"][1]
    if r.scalar(version_node, "version") != 1:
        raise r.error(version_node, "version", "this Sealgate reads policy version 1")
    if "description" in top:
        r.text(top["description"][1], "description")
    scan_limit, scan_time, unreadable = _scan(r, top)
    discovered = _parsed(r, top, "discovered_keys", None, False)
    relaxed = _parsed(r, top, "allow_tls_required_no", None, False)
    defaults = BUILTIN_DEFAULTS
    if "defaults" in top:
        given = _action(r, top["defaults"][1], "defaults")
        defaults = Action(
            given.modes or defaults.modes,
            given.minimum or defaults.minimum,
            given.tls_level if given.tls_level is not None else defaults.tls_level,
            given.fallback or defaults.fallback,
            given.portal_expiry or defaults.portal_expiry,
            given.portal_auth or defaults.portal_auth,
        )
        _check_action(r, top["defaults"][1], "defaults", defaults)
    lists = _lists(r, top["lists"][1]) if "lists" in top else {}
    classifiers = _classifiers(r, top["classifiers"][1]) if "classifiers" in top else {}
    rules: list[Rule] = []
    if "rules" in top:
        node = top["rules"][1]
        if not isinstance(node, yaml.SequenceNode):
            raise r.error(node, "rules", "expected a list of rules")
        names: set[str] = set()
        for i, item in enumerate(node.value):
            rule = _rule(r, item, f"rules[{i}]", lists, classifiers)
            if rule.name in names:
                raise r.error(item, f"rules[{i}].name", f"a second rule named {rule.name!r}")
            names.add(rule.name)
            rules.append(rule)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Policy(
        source=source,
        stamp=f"{Path(source).name}@{digest}",
        defaults=defaults,
        rules=tuple(rules),
        lists=lists,
        classifiers=classifiers,
        scan_limit=scan_limit,
        scan_time=scan_time,
        unreadable=unreadable,
        discovered_keys=discovered,
        allow_tls_required_no=relaxed,
    )


def _action(r: _Reader, node: yaml.Node, key: str) -> Action:
    keys = r.mapping(
        node, key, ("modes", "minimum", "tls_level", "fallback", "portal_expiry", "portal_auth")
    )
    modes = minimum = level = fallback = None
    expiry = None
    auth = None
    if "portal_auth" in keys:
        auth_node = keys["portal_auth"][1]
        value = r.text(auth_node, f"{key}.portal_auth").strip().lower()
        if value not in set(PortalAuth):
            choices = ", ".join(PortalAuth)
            raise r.error(auth_node, f"{key}.portal_auth", f"{value!r} is not one of: {choices}")
        auth = PortalAuth(value)
    if "portal_expiry" in keys:
        expiry = float(r.parsed(keys["portal_expiry"][1], f"{key}.portal_expiry", parse_duration))
    if "modes" in keys:
        modes_node = keys["modes"][1]
        found: list[Mode] = []
        for value, item in r.texts(modes_node, f"{key}.modes"):
            mode = _choice(r, item, f"{key}.modes", value, DELIVERY_MODES)
            if mode in found:
                raise r.error(item, f"{key}.modes", f"{value!r} is listed twice")
            found.append(mode)
        modes = tuple(found)
    if "minimum" in keys:
        minimum = r.parsed(keys["minimum"][1], f"{key}.minimum", Minimum.parse)
    if "tls_level" in keys:
        level = r.parsed(keys["tls_level"][1], f"{key}.tls_level", TlsLevel.parse)
    if "fallback" in keys:
        fb = keys["fallback"][1]
        fallback = _choice(r, fb, f"{key}.fallback", r.text(fb, f"{key}.fallback"), FALLBACKS)
    action = Action(modes, minimum, level, fallback, expiry, auth)
    _check_action(r, node, key, action)
    return action


def _check_action(r: _Reader, node: yaml.Node, key: str, action: Action) -> None:
    if action.modes and action.minimum and all(STRENGTH[m] < action.minimum for m in action.modes):
        raise r.error(
            node,
            key,
            f"no mode in 'modes' meets 'minimum: {action.minimum.label}': "
            "every recipient would get the fallback",
        )


def _choice(r: _Reader, node: yaml.Node, key: str, value: str, choices: tuple[Mode, ...]) -> Mode:
    for mode in choices:
        if mode.value == value.strip().lower():
            return mode
    names = ", ".join(m.value for m in choices)
    raise r.error(node, key, f"{value!r} is not one of: {names}")


def _entry(r: _Reader, node: yaml.Node, key: str, value: str, addresses: bool = True) -> str:
    """An address (``user@domain``) or a domain pattern (``domain``, ``*.domain``)."""
    value = value.strip().lower().rstrip(".")
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if addresses and local and _DOMAIN.fullmatch(domain):
            return value
        raise r.error(node, key, f"{value!r} is not a mail address")
    bare = value[2:] if value.startswith("*.") else value
    if not _DOMAIN.fullmatch(bare):
        raise r.error(node, key, f"{value!r} is not a domain or *.domain pattern")
    return value


def _lists(r: _Reader, node: yaml.Node) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, (key_node, value_node) in r.mapping(node, "lists").items():
        if not _NAME.fullmatch(name):
            raise r.error(key_node, f"lists.{name}", "a list name is letters, digits, - _ .")
        key = f"lists.{name}"
        out[name] = tuple(_entry(r, n, key, v) for v, n in r.texts(value_node, key))
    return out


def _scan(r: _Reader, top: dict[str, tuple[yaml.Node, yaml.Node]]) -> tuple[int, float, str]:
    """How the classifiers read a message: ``scan_limit``, ``scan_time`` (seconds)
    and what an unreadable document counts as (``unreadable``)."""
    scan_limit = int(_parsed(r, top, "scan_limit", parse_size, DEFAULT_SCAN_LIMIT))
    scan_time = float(_parsed(r, top, "scan_time", parse_duration, DEFAULT_SCAN_TIME))
    if scan_time > 300:
        node = top["scan_time"][1]
        raise r.error(node, "scan_time", "at most 5m (a message's documents are read in one go)")
    unreadable = SENSITIVE
    if "unreadable" in top:
        node = top["unreadable"][1]
        unreadable = r.scalar(node, "unreadable")
        if unreadable not in (SENSITIVE, IGNORE):
            raise r.error(node, "unreadable", f"must be '{SENSITIVE}' (fail closed) or '{IGNORE}'")
    return scan_limit, scan_time, unreadable


def _parsed(
    r: _Reader,
    top: dict[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    parse: Callable[[Any], Any] | None,
    default: Any,
) -> Any:
    """The top-level ``key`` read with ``parse`` (a size, a duration; None: a true or
    false flag), else ``default``."""
    if key not in top:
        return default
    node = top[key][1]
    if parse is None:
        return r.flag(node, key)
    try:
        return parse(r.scalar(node, key))
    except ValueError as e:
        raise r.error(node, key, str(e)) from None


def _classifiers(r: _Reader, node: yaml.Node) -> dict[str, Classifier]:
    out = {}
    for name, (key_node, value_node) in r.mapping(node, "classifiers").items():
        key = f"classifiers.{name}"
        if not _NAME.fullmatch(name):
            raise r.error(key_node, key, "a classifier name is letters, digits, - _ .")
        keys = r.mapping(value_node, key, ("detectors", "patterns", "threshold"))
        detectors: list[str] = []
        if "detectors" in keys:
            for value, item in r.texts(keys["detectors"][1], f"{key}.detectors"):
                if value not in DETECTORS:
                    names = ", ".join(DETECTORS)
                    raise r.error(
                        item, f"{key}.detectors", f"{value!r} is not a detector ({names})"
                    )
                detectors.append(value)
        patterns = []
        if "patterns" in keys:
            for value, item in r.texts(keys["patterns"][1], f"{key}.patterns"):
                patterns.append(_regex(r, item, f"{key}.patterns", value))
        if not detectors and not patterns:
            raise r.error(value_node, key, "a classifier needs 'detectors' or 'patterns'")
        threshold = 1
        if "threshold" in keys:
            t_node = keys["threshold"][1]
            threshold = r.scalar(t_node, f"{key}.threshold")
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
                raise r.error(t_node, f"{key}.threshold", "must be a whole number, at least 1")
        out[name] = Classifier(name, tuple(detectors), tuple(patterns), threshold)
    return out


def _regex(r: _Reader, node: yaml.Node, key: str, value: str) -> re.Pattern[str]:
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as e:
        raise r.error(node, key, f"not a valid regular expression: {e}") from None


_CONDITIONS = (
    "sender",
    "sender_domain",
    "sender_list",
    "recipient",
    "recipient_domain",
    "recipient_list",
    "header",
    "subject_tag",
    "content",
    "facts",
)


def _rule(
    r: _Reader,
    node: yaml.Node,
    key: str,
    lists: dict[str, tuple[str, ...]],
    classifiers: dict[str, Classifier],
) -> Rule:
    keys = r.mapping(node, key, ("name", "description", "when", "then", "stop"))
    if "name" not in keys:
        raise r.error(node, f"{key}.name", "missing: every rule needs a name")
    name_node = keys["name"][1]
    name = r.text(name_node, f"{key}.name")
    if not _NAME.fullmatch(name):
        raise r.error(name_node, f"{key}.name", "a rule name is letters, digits, - _ . (max 64)")
    key = f"rules[{name}]"
    if "then" not in keys:
        raise r.error(node, f"{key}.then", "missing: what the rule requires")
    then = _action(r, keys["then"][1], f"{key}.then")
    if then == Action():
        raise r.error(keys["then"][1], f"{key}.then", "says nothing (modes, minimum, ...)")
    when: list[Condition] = []
    if "when" in keys:
        for kind, (kn, vn) in r.mapping(keys["when"][1], f"{key}.when", _CONDITIONS).items():
            cond = _condition(r, kind, vn, f"{key}.when.{kind}", lists, classifiers)
            when.append(Condition(kind, cond.values, kn.start_mark.line + 1))
    description = (
        r.text(keys["description"][1], f"{key}.description") if "description" in keys else ""
    )
    stop = r.flag(keys["stop"][1], f"{key}.stop") if "stop" in keys else False
    return Rule(name, tuple(when), then, stop, description, node.start_mark.line + 1)


def _condition(  # noqa: C901 - one branch per condition of the policy language
    r: _Reader,
    kind: str,
    node: yaml.Node,
    key: str,
    lists: dict[str, tuple[str, ...]],
    classifiers: dict[str, Classifier],
) -> Condition:
    line = node.start_mark.line + 1
    if kind in ("sender", "recipient"):
        values: tuple[Any, ...] = tuple(_address(r, n, key, v) for v, n in r.texts(node, key))
    elif kind in ("sender_domain", "recipient_domain"):
        values = tuple(_entry(r, n, key, v, addresses=False) for v, n in r.texts(node, key))
    elif kind in ("sender_list", "recipient_list"):
        values = tuple(_defined(r, n, key, v, lists, "list") for v, n in r.texts(node, key))
    elif kind == "content":
        values = tuple(
            _defined(r, n, key, v, classifiers, "classifier") for v, n in r.texts(node, key)
        )
    elif kind == "subject_tag":
        values = tuple(v.strip() for v, _ in r.texts(node, key))
    elif kind == "header":
        headers = []
        for name, (_, vn) in r.mapping(node, key).items():
            patterns = tuple(
                _regex(r, n, f"{key}.{name}", v) for v, n in r.texts(vn, f"{key}.{name}")
            )
            headers.append((name.lower(), patterns))
        if not headers:
            raise r.error(node, key, "name at least one header")
        values = tuple(headers)
    else:  # facts
        facts = []
        for name, (_, vn) in r.mapping(node, key, tuple(FACTS)).items():
            expected = FACTS[name]
            value = r.scalar(vn, f"{key}.{name}")
            if expected is bool and not isinstance(value, bool):
                raise r.error(vn, f"{key}.{name}", f"{value!r} is not true or false")
            if isinstance(expected, tuple) and value not in expected:
                raise r.error(
                    vn, f"{key}.{name}", f"{value!r} is not one of: {', '.join(expected)}"
                )
            facts.append((name, value))
        if not facts:
            raise r.error(node, key, "name at least one fact")
        values = tuple(facts)
    return Condition(kind, values, line)


def _address(r: _Reader, node: yaml.Node, key: str, value: str) -> str:
    entry = _entry(r, node, key, value)
    if "@" not in entry:
        raise r.error(node, key, f"{value!r} is not a mail address (use *_domain for domains)")
    return entry


def _defined(
    r: _Reader, node: yaml.Node, key: str, value: str, known: dict[str, Any], what: str
) -> str:
    if value not in known:
        hint = difflib.get_close_matches(value, known, n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise r.error(node, key, f"no {what} named {value!r} is defined{suffix}")
    return value
