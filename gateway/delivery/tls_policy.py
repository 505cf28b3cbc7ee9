"""TLS security levels for outbound delivery, weakest first (after Postfix's
smtp_tls_security_level, RFC 7672 and RFC 8461).

The levels are ordered so that "at least this secure" is a comparison, and each level
answers the questions delivery asks through small predicates rather than scattered
booleans.  ``mta-sts`` and ``dane`` authenticate the MX name through a channel an
attacker on the path cannot forge; ``verify`` checks the certificate against the MX
name learned from (unauthenticated) DNS.

Failures at connect time (Postfix's codes): STARTTLS not offered where required →
4.7.4; handshake or certificate failure → 4.7.5.  Neither ever falls back to
plaintext at a level that requires TLS.
"""

from __future__ import annotations

import enum


class TlsLevel(enum.IntEnum):
    NONE = 0  # never STARTTLS (only for routes the admin trusts otherwise)
    MAY = 10  # STARTTLS if offered, certificate not checked; plaintext allowed
    ENCRYPT = 20  # STARTTLS required (TLS >= 1.2), certificate not checked
    VERIFY = 30  # + certificate chains to a trusted CA and names the MX host
    MTA_STS = 40  # + the MX host matches the domain's MTA-STS policy (RFC 8461)
    DANE = 50  # + the certificate matches DNSSEC-signed TLSA records (RFC 7672)

    @classmethod
    def parse(cls, text: str) -> TlsLevel:
        try:
            return cls[text.strip().upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(level.label for level in cls)
            raise ValueError(f"{text!r} is not a TLS level ({names})") from None

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def attempts_tls(self) -> bool:
        return self >= TlsLevel.MAY

    @property
    def requires_tls(self) -> bool:
        return self >= TlsLevel.ENCRYPT

    @property
    def verifies_certificate(self) -> bool:
        return self >= TlsLevel.VERIFY

    @property
    def uses_dane(self) -> bool:
        """The certificate is checked against TLSA records instead of the CAs."""
        return self is TlsLevel.DANE

    @property
    def allows_plaintext(self) -> bool:
        return not self.requires_tls


# each level's name as configs, logs and evidence write it ("mta-sts"), made once
_LABELS = {level: level.name.lower().replace("_", "-") for level in TlsLevel}
