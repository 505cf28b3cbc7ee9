"""addresses - what an envelope may hold: mailboxes, HELO names, ESMTP parameters.

Every way into the queue checks the envelope here before anything is acknowledged,
so that nothing that cannot be stored, archived, logged or delivered is ever
answered 250.  The SMTP listener turns a `Problem` into its reply (a sender:
501 5.1.7; a recipient: 553 5.1.3; a non-ASCII address without SMTPUTF8:
553 5.6.7; a HELO name: 501 5.5.2).

What is accepted (RFC 5321 4.1.2 and 4.5.3.1, RFC 6531 3.3 for SMTPUTF8):
- a mailbox is ``local@domain``; the local part a dot-string of atext (consecutive
  or leading dots tolerated, as real mailboxes have them) or a quoted string of
  printable characters, at most 64 octets; the domain a host name of letter-digit-
  hyphen labels (each 1-63 octets, no leading or trailing hyphen), at most 253
  octets in A-label form; the whole mailbox at most 254 octets;
- non-ASCII (UTF-8) only under SMTPUTF8, and only where RFC 6531 allows it: in the
  local part, and in domain labels that have an IDNA A-label form;
- never a byte that is not UTF-8, a control character (C0, DEL, C1), or an address
  literal (``[192.0.2.1]``: a relay for an organisation's outbound mail has no route
  for one).
A HELO/EHLO name is printable ASCII (RFC 5321 4.1.1.1: a domain or an address
literal), at most 255 octets; ESMTP parameters are printable ASCII.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace

import dns.name

from gateway.model import Envelope, Recipient

MAX_LOCAL = 64
MAX_DOMAIN = 253
MAX_MAILBOX = 254
MAX_HELO = 255

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
# Above ASCII: UTF-8 text (RFC 6531 atext / qtextSMTP), never a control character.
_ATEXT_UTF8 = re.compile(r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]|[^\x00-\x9f])+")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|[^\x00-\x9f])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


class Kind(enum.Enum):
    SYNTAX = "syntax"  # not a mailbox / name we can represent
    NEEDS_SMTPUTF8 = "needs-smtputf8"  # valid UTF-8, but SMTPUTF8 was not given


@dataclass(frozen=True)
class Problem:
    kind: Kind
    detail: str  # for the reply: says what is wrong, never repeats the input


def _text_problem(text: str) -> str | None:
    """Bytes that are not UTF-8 (surrogate escapes) or control characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if _CONTROL.search(text):
        return "contains a control character"
    return None


def check_mailbox(address: str, utf8: bool) -> Problem | None:
    """None when ``address`` (``local@domain``, as parsed from a path) is acceptable;
    ``utf8``: the transaction was started with the SMTPUTF8 parameter."""
    bad = _text_problem(address)
    if bad is not None:
        return Problem(Kind.SYNTAX, bad)
    if not address.isascii() and not utf8:
        return Problem(Kind.NEEDS_SMTPUTF8, "non-ASCII address without SMTPUTF8")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return Problem(Kind.SYNTAX, "not local@domain")
    if len(address.encode()) > MAX_MAILBOX:
        return Problem(Kind.SYNTAX, f"longer than {MAX_MAILBOX} octets")
    if len(local.encode()) > MAX_LOCAL:
        return Problem(Kind.SYNTAX, f"local part longer than {MAX_LOCAL} octets")
    atext, quoted = (_ATEXT_UTF8, _QUOTED_UTF8) if utf8 else (_ATEXT, _QUOTED)
    if not (atext.fullmatch(local) or quoted.fullmatch(local)) or local == ".":
        return Problem(Kind.SYNTAX, "invalid local part")
    bad = domain_problem(domain)
    return None if bad is None else Problem(Kind.SYNTAX, bad)


def domain_problem(domain: str) -> str | None:
    """Why ``domain`` is not a host name mail can be routed to (None: it is)."""
    if domain.startswith("["):
        return "address literals are not accepted"
    labels = domain.split(".")
    ascii_labels = []
    for label in labels:
        if not label.isascii():
            try:  # the codec the resolver routes with (dnspython's IDNA 2008)
                label = dns.name.IDNA_DEFAULT.encode(label).decode("ascii")
            except (dns.name.IDNAException, UnicodeError):
                return "domain label has no IDNA form"
        if not _LABEL.fullmatch(label):
            return "invalid domain name"
        ascii_labels.append(label)
    if len(".".join(ascii_labels)) > MAX_DOMAIN:
        return f"domain longer than {MAX_DOMAIN} octets"
    return None


def check_helo(name: str) -> Problem | None:
    """A HELO/EHLO argument: printable ASCII, at most 255 octets."""
    bad = _text_problem(name)
    if bad is not None:
        return Problem(Kind.SYNTAX, bad)
    if not _PRINTABLE_ASCII.fullmatch(name):
        return Problem(Kind.SYNTAX, "must be a domain or address literal in printable ASCII")
    if len(name) > MAX_HELO:
        return Problem(Kind.SYNTAX, f"longer than {MAX_HELO} octets")
    return None


def check_parameter(option: str) -> bool:
    """An ESMTP parameter (``KEYWORD[=value]``) is printable ASCII."""
    return bool(_PRINTABLE_ASCII.fullmatch(option))


def printable(text: str) -> str:
    """``text`` with every byte that is not UTF-8 and every control character written
    as ``\\xNN``: for a record of input that could not be accepted as it is."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", raw)


@dataclass(frozen=True)
class EnvelopeProblems:
    """What `check_envelope` found: the sender's problem, each bad recipient's (by
    index), and anything else (HELO, parameters, trace fields)."""

    sender: str | None = None
    recipients: dict[int, str] = field(default_factory=dict)
    other: str | None = None

    @property
    def ok(self) -> bool:
        return self.sender is None and not self.recipients and self.other is None

    def summary(self) -> str:
        parts = [f"sender: {self.sender}"] if self.sender else []
        parts += [f"recipient {i + 1}: {p}" for i, p in sorted(self.recipients.items())]
        if self.other:
            parts.append(self.other)
        return "; ".join(parts)


def check_envelope(envelope: Envelope) -> EnvelopeProblems:
    """The checks of the SMTP listener, for an envelope that is already spooled (written
    by an earlier version, or by a way in that missed one): the queue quarantines a
    message with problems instead of failing on it."""
    utf8 = "SMTPUTF8" in envelope.mail_options
    sender = None
    if envelope.mail_from:
        found = check_mailbox(envelope.mail_from, utf8)
        sender = found.detail if found else None
    recipients = {}
    for i, rcpt in enumerate(envelope.recipients):
        found = check_mailbox(rcpt.address, utf8)
        if found is not None:
            recipients[i] = found.detail
    other = None
    client = envelope.client
    texts = [client.helo, envelope.trace_headers, *envelope.mail_options]
    texts += [v for v in (client.auth_user, client.client_cert_subject) if v]
    if any(_text_problem(t.replace("\r\n", "").replace("\t", "")) for t in texts):
        other = "client or trace fields: not valid UTF-8 or control characters"
    return EnvelopeProblems(sender, recipients, other)


def printable_envelope(envelope: Envelope) -> Envelope:
    """``envelope`` with every text field `printable`: what can be stored, archived
    and shown of an envelope that failed `check_envelope`."""
    client = envelope.client
    return replace(
        envelope,
        mail_from=printable(envelope.mail_from),
        mail_options=tuple(printable(o) for o in envelope.mail_options),
        recipients=tuple(
            Recipient(printable(r.address), tuple(printable(o) for o in r.options))
            for r in envelope.recipients
        ),
        client=replace(
            client,
            helo=printable(client.helo),
            auth_user=printable(client.auth_user) if client.auth_user else client.auth_user,
            client_cert_subject=(
                printable(client.client_cert_subject)
                if client.client_cert_subject
                else client.client_cert_subject
            ),
        ),
        trace_headers=envelope.trace_headers.encode("utf-8", "surrogateescape").decode(
            "utf-8", "replace"
        ),
    )
