"""The values the policy engine works with: modes, actions and the Decision.

Modes, weakest first as far as the content's exposure goes: ``tls`` (the copy goes
over TLS at the decided level), ``smime`` and ``pgp`` (end to end), ``portal`` (the
content never leaves the gateway; the recipient fetches it).  ``hold`` and ``bounce``
are outcomes, not ways to deliver: they come only as a fallback.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gateway.delivery.tls_policy import TlsLevel
from gateway.model import PortalAuth


class Mode(enum.StrEnum):
    TLS = "tls"
    SMIME = "smime"
    PGP = "pgp"
    PORTAL = "portal"
    HOLD = "hold"
    BOUNCE = "bounce"


DELIVERY_MODES = (Mode.TLS, Mode.SMIME, Mode.PGP, Mode.PORTAL)
FALLBACKS = (Mode.PORTAL, Mode.HOLD, Mode.BOUNCE)


class Minimum(enum.IntEnum):
    """The weakest protection a rule accepts: ``minimum: end-to-end`` rules out TLS."""

    TLS = 1
    END_TO_END = 2
    PORTAL = 3

    @classmethod
    def parse(cls, text: str) -> Minimum:
        try:
            return cls[text.strip().upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"{text!r} is not a minimum (tls, end-to-end, portal)") from None

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


STRENGTH = {Mode.TLS: Minimum.TLS, Mode.SMIME: Minimum.END_TO_END, Mode.PGP: Minimum.END_TO_END}
STRENGTH[Mode.PORTAL] = Minimum.PORTAL


@dataclass(frozen=True)
class Action:
    """What a rule (or the defaults) requires; None: the rule does not say."""

    modes: tuple[Mode, ...] | None = None  # allowed modes, in order of preference
    minimum: Minimum | None = None
    tls_level: TlsLevel | None = None  # the least TLS level the ``tls`` mode accepts
    fallback: Mode | None = None  # portal, hold or bounce: when no mode can be used
    portal_expiry: float | None = None  # seconds a portal message can be picked up
    portal_auth: PortalAuth | None = None  # how its recipient signs in (at least)


@dataclass(frozen=True)
class Decision:
    """How one recipient's copy is to be protected, and why."""

    mode: Mode
    tls_level: TlsLevel  # the level delivery must reach (for every mode that sends)
    fallback: Mode
    rule: str  # the rule that decided: its constraint or its preference settled it
    rules: tuple[str, ...] = ()  # every rule that matched, in order
    reasons: tuple[str, ...] = ()
    level_source: str = ""  # what set tls_level: "dane", "mta-sts", "rule <name>", "defaults"
    candidates: tuple[Mode, ...] = ()  # the allowed modes in order of preference
    excluded: tuple[Mode, ...] = ()  # modes that failed at delivery for this recipient
    strip_tags: tuple[str, ...] = ()  # subject tags removed before delivery
    facts: dict[str, Any] = field(default_factory=dict)
    decided_at: float = 0.0
    policy: str = ""  # the policy file's version stamp (file name and digest)
    portal_expiry: float | None = None  # None: portal.expiry from the configuration
    portal_auth: PortalAuth | None = None  # None: portal.auth from the configuration

    @property
    def sends(self) -> bool:
        return self.mode in DELIVERY_MODES

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "tls_level": self.tls_level.label,
            "fallback": self.fallback.value,
            "rule": self.rule,
            "rules": list(self.rules),
            "reasons": list(self.reasons),
            "level_source": self.level_source,
            "candidates": [m.value for m in self.candidates],
            "excluded": [m.value for m in self.excluded],
            "strip_tags": list(self.strip_tags),
            "facts": self.facts,
            "decided_at": self.decided_at,
            "policy": self.policy,
            "portal_expiry": self.portal_expiry,
            "portal_auth": self.portal_auth.value if self.portal_auth else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(
            mode=Mode(d["mode"]),
            tls_level=TlsLevel.parse(d["tls_level"]),
            fallback=Mode(d["fallback"]),
            rule=str(d["rule"]),
            rules=tuple(d.get("rules", ())),
            reasons=tuple(d.get("reasons", ())),
            level_source=str(d.get("level_source", "")),
            candidates=tuple(Mode(m) for m in d.get("candidates", ())),
            excluded=tuple(Mode(m) for m in d.get("excluded", ())),
            strip_tags=tuple(d.get("strip_tags", ())),
            facts=dict(d.get("facts", {})),
            decided_at=float(d.get("decided_at", 0.0)),
            policy=str(d.get("policy", "")),
            portal_expiry=d.get("portal_expiry"),
            portal_auth=PortalAuth(d["portal_auth"]) if d.get("portal_auth") else None,
        )
