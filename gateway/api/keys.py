"""keys - the message API's keys (``api.keys``): only each key's SHA-256 is
configured; a key has scopes and may expire.

=================  ==========================================================
scope              may
=================  ==========================================================
send               submit messages; revoke the portal items of messages it sent
read-status        read a message's state and evidence; explain the policy
admin              all of the above for any message; queue actions; the key
                   directory
archive:read       the archive API as its auditor role (``archive:*``: all
archive:content    three) - as its investigator role
archive:manage     - as its admin role
=================  ==========================================================
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import ApiKeyConfig

PREFIX = "sgk_"


def new_key() -> tuple[str, str]:
    """A new key and its SHA-256 (hex), for ``api.keys``."""
    key = PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        if "admin" in self.scopes and not scope.startswith("archive:"):
            return True
        if scope.startswith("archive:") and "archive:*" in self.scopes:
            return True
        return scope in self.scopes

    @property
    def archive_role(self) -> str | None:
        """The archive API role its archive scopes amount to (content before
        management: the archive's admin role sees no content)."""
        if self.may("archive:content"):
            return "investigator"
        if self.may("archive:manage"):
            return "admin"
        if self.may("archive:read"):
            return "auditor"
        return None


def caller_of(
    authorization: str, keys: Sequence[ApiKeyConfig], today: datetime.date | None = None
) -> Caller | None:
    """Who a ``Bearer`` header names: a configured key that has not expired."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    digest = hashlib.sha256(key.strip().encode()).hexdigest()
    today = today or datetime.datetime.now(datetime.UTC).date()
    for k in keys:
        if hmac.compare_digest(digest, k.key_sha256):
            if k.expires is not None and datetime.date.fromisoformat(k.expires) < today:
                return None
            return Caller(k.name, frozenset(k.scopes))
    return None
