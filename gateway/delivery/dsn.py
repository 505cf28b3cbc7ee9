"""dsn - delivery status notifications (RFC 3464) that carry no message content.

When recipients fail for good, the envelope sender gets one ``multipart/report``
listing each failed recipient with its status, the remote server and its diagnostic;
when a message has waited ``delivery.delay_warning``, one saying which recipients
are still being tried and until when (``Action: delayed``); and, for recipients
whose sender asked (``NOTIFY=SUCCESS``, RFC 3461), one when they were delivered.
The sender's ``ENVID`` and each recipient's ``ORCPT`` come back in them.
It never contains the original subject or any body text (subjects and bodies can
carry PHI): the only thing taken from the original message is its Message-ID, in a
``text/rfc822-headers`` part holding that single header, so that mail clients can
thread the report.

A message from the null sender never gets a DSN (no bounce for a bounce); the caller
checks that.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import secrets
from dataclasses import dataclass

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.I | re.M)


@dataclass(frozen=True)
class ReportedRecipient:
    """One recipient in a report.  ``action`` (RFC 3464 2.3.3): failed, delayed,
    delivered (into the portal: Sealgate was the last stop) or relayed (handed to
    a server that was not asked to report: the DSN extension was not passed on);
    ``original``: the ORCPT the sender gave (RFC 3461), as ``type;address``."""

    address: str
    status: str
    diagnostic: str
    remote_mta: str | None = None
    last_attempt: datetime.datetime | None = None
    action: str = "failed"
    original: str | None = None


def original_message_id(message: bytes) -> str | None:
    """The Message-ID of a message, read from its header section only."""
    head = message.split(b"\r\n\r\n", 1)[0]
    head = re.sub(rb"\r\n[ \t]+", b" ", head)  # unfold
    m = _MESSAGE_ID.search(head)
    if not m:
        return None
    value = m.group(1).decode("ascii", "replace").strip()
    return value if re.fullmatch(r"<[^<>\s]{1,900}>", value) else None


def _line(text: str) -> str:
    """One printable line: remote replies go into headers and the report."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:900]


def build_dsn(
    *,
    sender: str,
    failed: list[ReportedRecipient],
    reporting_mta: str,
    queue_id: str,
    arrival: str,
    original: bytes,
    now: datetime.datetime | None = None,
    retry_until: datetime.datetime | None = None,
    envid: str | None = None,
) -> bytes:
    """The report for these recipients (all of one kind): failed for good, delayed
    (with ``retry_until``: still tried until then), or delivered / relayed (the
    sender asked to hear of success).  ``envid``: the sender's ENVID, returned as
    it was given."""
    now = now or datetime.datetime.now(datetime.UTC)
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    message_id = original_message_id(original)
    date = email.utils.format_datetime(now)
    success = all(f.action in ("delivered", "relayed") for f in failed)
    if success:
        subject = "Successful Mail Delivery Report"
        said = [
            "Your message was delivered to the recipients below, as you asked to be told",
            '("relayed": handed to their mail server, which was not asked to report).',
        ]
    elif retry_until is None:
        subject = "Undelivered Mail Returned to Sender"
        said = ["Your message could not be delivered to one or more recipients."]
    else:
        subject = "Delayed Mail (still being retried)"
        until = email.utils.format_datetime(retry_until)
        said = [
            "Your message could not be delivered to one or more recipients yet.",
            f"It will be tried again until {until}; you do not need to send it again.",
            "You will be told if it cannot be delivered by then.",
        ]
    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        *said,
        "For privacy, its subject and content are not repeated in this report.",
        "",
        f"Original message: {message_id or '(no Message-ID)'}, queue id {queue_id}",
        "",
    ]
    status_fields = [f"Original-Envelope-Id: {envid}"] if envid else []
    status_fields += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Sealgate-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(datetime.datetime.fromisoformat(arrival))}",
    ]
    for f in failed:
        diagnostic = _line(f.diagnostic)
        human.append(f"<{f.address}>: {f.status} {diagnostic}")
        status_fields.append("")
        if f.original:
            kind, _, given = f.original.partition(";")
            status_fields.append(f"Original-Recipient: {kind}; {_line(given)}")
        status_fields += [
            f"Final-Recipient: {'utf-8' if not f.address.isascii() else 'rfc822'}; {f.address}",
            f"Action: {f.action}",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            status_fields.append(f"Remote-MTA: dns; {_line(f.remote_mta)}")
        if diagnostic:
            kind = "smtp" if diagnostic[:3].isdigit() else "x-sealgate"
            status_fields.append(f"Diagnostic-Code: {kind}; {diagnostic}")
        if f.last_attempt is not None:
            status_fields.append(
                f"Last-Attempt-Date: {email.utils.format_datetime(f.last_attempt)}"
            )
        if retry_until is not None:
            status_fields.append(f"Will-Retry-Until: {email.utils.format_datetime(retry_until)}")
    # a field holding UTF-8 (an address of type utf-8, a remote reply) makes the
    # report a message/global-delivery-status (RFC 6533 6.2), and so the
    # multipart/report's report-type (RFC 6522)
    report = (
        "delivery-status" if all(f.isascii() for f in status_fields) else "global-delivery-status"
    )
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report};",
        f'\tboundary="{boundary}"',
    ]
    if message_id:
        headers.append(f"In-Reply-To: {message_id}")
    parts = [
        "\r\n".join(headers),
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "\r\n".join(human),
        f"--{boundary}",
        f"Content-Type: message/{report}",
        "",
        "\r\n".join(status_fields),
        "",
    ]
    if message_id:
        parts += [
            f"--{boundary}",
            "Content-Type: text/rfc822-headers",
            "",
            f"Message-ID: {message_id}",
            "",
        ]
    parts.append(f"--{boundary}--")
    return ("\r\n".join(parts) + "\r\n").encode("utf-8")


def build_notice(
    *,
    sender: str,
    reporting_mta: str,
    queue_id: str,
    original: bytes,
    subject: str,
    lines: list[str],
    now: datetime.datetime | None = None,
) -> bytes:
    """A short plain-text notice to a sender about its message (``notify.sender_on``):
    these lines, the message named by its Message-ID and queue id only."""
    now = now or datetime.datetime.now(datetime.UTC)
    message_id = original_message_id(original)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}.notice@{reporting_mta}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    if message_id:
        headers.append(f"In-Reply-To: {message_id}")
    body = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        *(_line(line) for line in lines),
        "",
        f"Your message: {message_id or '(no Message-ID)'}, queue id {queue_id}.",
        "For privacy, its subject and content are not repeated in this notice.",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode("utf-8")
