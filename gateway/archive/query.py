"""Searching the archive: `Query` (the fields a compliance officer searches by, as
SQL over the index) and what the index reads from a message's header (Message-ID,
and the subject when subjects are indexed)."""

from __future__ import annotations

import email.header
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.headers import header_section


@dataclass(frozen=True)
class Query:
    """What to look for.  ``sender`` and ``recipient``: an address, or ``@domain``;
    ``since``/``until``: Unix times (received); recipient conditions (``recipient``,
    ``mode``, ``status``, ``rule``) must hold for the same recipient."""

    sender: str | None = None
    recipient: str | None = None
    since: float | None = None
    until: float | None = None
    message_id: str | None = None
    queue_id: str | None = None
    mode: str | None = None
    status: str | None = None
    rule: str | None = None
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Query:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown search field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def recipient_sql(self) -> tuple[str, list[Any]] | None:
        """The condition on one recipient ``r`` (its address or domain, mode, state,
        rule) and its arguments; None when the query names none of them."""
        inner: list[str] = []
        args: list[Any] = []
        if self.recipient:
            _address_or_domain(self.recipient, "r.address", "r.domain", inner, args)
        for column, value in (("mode", self.mode), ("state", self.status), ("rule", self.rule)):
            if value:
                inner.append(f"r.{column} = ?")
                args.append(value)
        return (" AND ".join(inner), args) if inner else None

    def sql(  # noqa: C901 - one clause per search field, in one place
        self,
        subject_match: Callable[[str], tuple[str, list[Any]]] | None,
        few_recipients: bool = False,
    ) -> tuple[str, list[Any]]:
        """A condition on ``messages m`` and its arguments.  ``subject_match``: the
        index's condition for a subject (None: subjects are not indexed).
        ``few_recipients``: the recipient condition matches few rows - the messages
        are then found from them (``IN``) rather than checked one by one as they come
        in time order (``EXISTS``, the better plan when matches are many)."""
        where: list[str] = ["TRUE"]
        args: list[Any] = []
        if self.sender:
            _address_or_domain(self.sender, "m.mail_from", "m.sender_domain", where, args)
        if self.since is not None:
            where.append("m.received >= ?")
            args.append(self.since)
        if self.until is not None:
            where.append("m.received < ?")
            args.append(self.until)
        if self.message_id:
            mid = self.message_id.strip()
            where.append("m.message_id = ?")
            args.append(mid if mid.startswith("<") else f"<{mid}>")
        if self.queue_id:
            where.append("m.queue_id = ?")
            args.append(self.queue_id)
        if self.subject:
            if subject_match is None:
                raise ValueError("subjects are not indexed (archive.index_subjects: false)")
            condition, condition_args = subject_match(self.subject)
            where.append(condition)
            args.extend(condition_args)
        recipient = self.recipient_sql()
        if recipient is not None:
            inner, inner_args = recipient
            if few_recipients:
                where.append(f"m.queue_id IN (SELECT r.queue_id FROM recipients r WHERE {inner})")
            else:
                where.append(
                    f"EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND {inner})"
                )
            args.extend(inner_args)
        return " AND ".join(where), args


def _address_or_domain(
    value: str, address: str, domain: str, where: list[str], args: list[Any]
) -> None:
    """The condition for an address, or for ``@domain``, case folded."""
    value = value.lower()
    if value.startswith("@"):
        where.append(f"{domain} = ?")
        args.append(value[1:])
    else:
        where.append(f"{address} = ?")
        args.append(value)


HEADER_LIMIT = 256 * 1024  # a header section longer than this is read this far
# (not NUL, which PostgreSQL's text cannot hold: such a Message-ID is no Message-ID)
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n\0]{1,900}>)", re.I | re.M)
_SUBJECT = re.compile(rb"^subject:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def message_id_of(data: bytes) -> str | None:
    m = _MESSAGE_ID.search(header_section(data, HEADER_LIMIT))
    return m.group(1).decode("utf-8", "replace") if m else None


def subject_of(data: bytes) -> str:
    m = _SUBJECT.search(header_section(data, HEADER_LIMIT))
    if not m:
        return ""
    raw = re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).strip().decode("utf-8", "replace")
    try:
        subject = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError):
        subject = raw
    # NUL, which PostgreSQL's text cannot hold: as a byte that is not UTF-8 is
    return subject.replace("\x00", "\ufffd")
