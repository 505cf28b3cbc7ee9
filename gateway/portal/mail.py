"""The messages the portal sends: the notification (a link, the organisation, the
expiry - never the original subject or body), the one-time code, and a recipient's
reply to the original sender."""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import html
from email.message import EmailMessage

from gateway.config import PortalConfig

POLICY = email.policy.SMTP  # CRLF line ends, as sent


def _base(config: PortalConfig, sender: str, to: str, subject: str, domain: str) -> EmailMessage:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = email.utils.formataddr((config.organization, sender))
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
    return msg


def notification(
    config: PortalConfig, sender: str, recipient: str, link: str, expires: float, domain: str
) -> bytes:
    until = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%d %B %Y")
    org = config.organization
    msg = _base(config, sender, recipient, config.notification_subject, domain)
    msg.set_content(
        f"{org} has sent you a secure message.\n\n"
        f"Open it here:\n{link}\n\n"
        "To open it you will be asked for a one-time code, which we send to this "
        "address.\n"
        f"The message can be opened until {until}.\n\n"
        "If you were not expecting a message from us, you can ignore this one.\n"
    )
    e = html.escape
    msg.add_alternative(
        f'<!doctype html><html><body style="font-family:sans-serif">'
        f"<p>{e(org)} has sent you a secure message.</p>"
        f'<p><a href="{e(link)}">Open the secure message</a></p>'
        f"<p>To open it you will be asked for a one-time code, which we send to this "
        f"address. The message can be opened until {e(until)}.</p>"
        f"<p>If you were not expecting a message from us, you can ignore this one.</p>"
        f"</body></html>",
        subtype="html",
    )
    return msg.as_bytes()


def code_message(
    config: PortalConfig, sender: str, recipient: str, code: str, domain: str
) -> bytes:
    minutes = max(1, round(config.code_ttl / 60))
    msg = _base(config, sender, recipient, config.code_subject, domain)
    msg.set_content(
        f"Your one-time code for the secure message from {config.organization} is:\n\n"
        f"    {code}\n\n"
        f"It is valid for {minutes} minutes. If you did not ask for it, ignore this "
        "message: nobody can open your message without it.\n"
    )
    return msg.as_bytes()


def reply(
    config: PortalConfig,
    sender: str,
    recipient: str,
    original_sender: str,
    subject: str,
    in_reply_to: str | None,
    text: str,
    attachments: list[tuple[str, str, bytes]],
    domain: str,
) -> bytes:
    """From the portal's address on the recipient's behalf (their own domain's SPF and
    DMARC would fail from here), Reply-To the recipient, to the original sender."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = email.utils.formataddr(
        (f"{recipient} via {config.organization} secure portal", sender)
    )
    msg["Reply-To"] = recipient
    msg["To"] = original_sender
    msg["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(text or "")
    for filename, ctype, data in attachments:
        maintype, _, subtype = ctype.partition("/")
        if not subtype or maintype in ("multipart", "message"):
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()
