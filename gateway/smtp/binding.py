"""binding - relaying held to the organisation's own tenant and senders.

A client certificate ``CN=mail.protection.outlook.com``, or Microsoft's and Google's
address ranges, prove only "some Microsoft 365 (or Google Workspace) customer": every
tenant shares them.  What binds a message to *this* organisation:

- ``relay.sender_domains``: the envelope sender's domain (at MAIL);
- the senders of an SMTP AUTH user (``relay.users_file``, at MAIL);
- ``relay.dkim_domains``: a passing DKIM signature by one of the organisation's own
  domains, equal to the From domain (after DATA; the cryptographic anchor, as keys live
  only in the tenant);
- ``relay.m365_tenant_ids``: every ``X-MS-Exchange-CrossTenant-Id`` is the
  organisation's (after DATA; observed, not documented by Microsoft, so a second
  check beside DKIM).

The after-DATA checks apply to messages whose relaying was authorized by a client
certificate or by ``relay.networks``; an SMTP AUTH user is bound by the password and
its senders.  A refusal is 550 5.7.1 and nothing is kept; a DKIM key that DNS cannot
give now is 451 4.4.3 (the client tries again).  Refusals are logged without PHI (the
reason and the signing domains, never addresses, subjects or content) and counted by
reason in ``sealgate_messages_rejected_total``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import DomainPattern, RelayConfig
from gateway.crypto.dkim import author_domain_of, domain_a_label
from gateway.crypto.dkim_verify import (
    Fetch,
    KeyAnswer,
    KeyCache,
    KeyStatus,
    MessageDigest,
    Outcome,
    summary,
    verify,
)
from gateway.events import RejectReason
from gateway.probe.dns import LookupStatus, Resolver
from gateway.smtp import replies
from gateway.smtp.auth import User

TENANT_HEADER = b"x-ms-exchange-crosstenant-id"
AFTER_DATA = ("client-cert", "network")  # the authorizations the message checks bind


@dataclass(frozen=True)
class Refusal:
    reason: RejectReason
    reply: str
    signers: tuple[str, ...] = ()  # "domain:outcome" per DKIM signature, for the log


def dns_key_fetch(resolver: Resolver) -> Fetch:
    """A `KeyCache` fetch over the gateway's own resolvers."""

    async def fetch(name: str) -> KeyAnswer:
        lookup = await resolver.lookup(name, "TXT")
        if lookup.status is LookupStatus.ERROR:
            return KeyAnswer(KeyStatus.TEMPORARY)
        records = [r for r in lookup.texts if "p=" in r]
        if not records:
            return KeyAnswer(KeyStatus.NONE)
        return KeyAnswer(KeyStatus.FOUND, records[0], lookup.ttl)

    return fetch


class Binding:
    def __init__(self, relay: RelayConfig, keys: KeyCache | None):
        self.sender_domains = relay.sender_domains
        self.dkim_domains = relay.dkim_domains
        self.tenant_ids = frozenset(relay.m365_tenant_ids)
        self.keys = keys
        if self.dkim_domains and keys is None:
            raise ValueError("relay.dkim_domains needs a DKIM key cache")

    @property
    def checks_messages(self) -> bool:
        return bool(self.dkim_domains or self.tenant_ids)

    # -- at MAIL ----------------------------------------------------------------------

    def check_sender(self, mail_from: str, user: User | None) -> Refusal | None:
        """``mail_from`` as given ("<>" for the null sender); ``user`` when the
        session authenticated."""
        address = "" if mail_from == "<>" else mail_from
        if user is not None and not (address and user.may_send_as(address)):
            return Refusal(
                RejectReason.SENDER_NOT_OWNED,
                replies.SENDER_NOT_OWNED.format(address=address),
            )
        if not self.sender_domains:
            return None
        if not address:
            # no domain to check: only a DKIM binding can hold a bounce to the tenant
            if self.dkim_domains and user is None:
                return None
        elif _within(domain_a_label(address.rpartition("@")[2]), self.sender_domains):
            return None
        return Refusal(
            RejectReason.SENDER_DOMAIN, replies.SENDER_NOT_ALLOWED.format(address=address)
        )

    # -- after DATA ---------------------------------------------------------------------

    def digest_for(self, authorized_by: str | None) -> MessageDigest | None:
        """What to collect of a message while it arrives, when it is to be checked."""
        if self.checks_messages and authorized_by in AFTER_DATA:
            return MessageDigest()
        return None

    async def check_message(self, digest: MessageDigest) -> Refusal | None:
        digest.finish()
        if digest.too_big:
            return self._refused(RejectReason.DKIM_UNBOUND, "header section too large to check")
        if self.tenant_ids:
            refusal = self._check_tenant(digest)
            if refusal is not None:
                return refusal
        if self.dkim_domains:
            return await self._check_dkim(digest)
        return None

    def _check_tenant(self, digest: MessageDigest) -> Refusal | None:
        ids = [
            value.decode("ascii", "replace").strip(" \t\r\n").lower()
            for name, value in digest.fields()
            if name == TENANT_HEADER
        ]
        if not ids:
            return self._refused(RejectReason.TENANT_ID, "no Microsoft 365 tenant id")
        if any(i not in self.tenant_ids for i in ids):
            return self._refused(
                RejectReason.TENANT_ID, "not from an authorized Microsoft 365 tenant"
            )
        return None

    async def _check_dkim(self, digest: MessageDigest) -> Refusal | None:
        assert self.keys is not None
        from_domain = author_domain_of([v for name, v in digest.fields() if name == b"from"])
        if from_domain is None:
            return self._refused(RejectReason.DKIM_UNBOUND, "From must be exactly one address")
        results = await verify(digest, self.keys)
        signers = tuple(summary(results))
        candidates = [r for r in results if self._binds(r.domain, from_domain)]
        if any(r.outcome is Outcome.PASS for r in candidates):
            return None
        if any(r.outcome is Outcome.TEMPERROR for r in candidates):
            return Refusal(RejectReason.DKIM_TEMPFAIL, replies.BINDING_TEMPFAIL, signers)
        return self._refused(
            RejectReason.DKIM_UNBOUND,
            "no valid DKIM signature of this organisation's domains aligned with From",
            signers,
        )

    def _binds(self, d: str, from_domain: str) -> bool:
        """A signature by ``d`` binds a message from ``from_domain``: ``d`` is listed
        and is the From domain, or ``.d`` is listed and From is below it."""
        for pattern in self.dkim_domains:
            if pattern.startswith("."):
                if d == pattern[1:] and pattern.matches(from_domain):
                    return True
            elif d == pattern == from_domain:
                return True
        return False

    @staticmethod
    def _refused(reason: RejectReason, detail: str, signers: tuple[str, ...] = ()) -> Refusal:
        return Refusal(reason, replies.NOT_BOUND.format(detail=detail), signers)


def _within(domain: str, patterns: tuple[DomainPattern, ...]) -> bool:
    return any(p.matches(domain) for p in patterns)
