"""The messages the portal sends: the notification (a link, the organisation, the
expiry - never the original subject or body), the one-time code, and a recipient's
reply to the original sender."""

from __future__ import annotations

import binascii
import datetime
import email.policy
import email.utils
import functools
import html
import secrets
from email.headerregistry import Address
from email.message import EmailMessage

from gateway.config import PortalConfig

POLICY = email.policy.SMTP  # CRLF line ends, as sent
# for a message to or from an address that is not ASCII: such an address goes into
# the headers as UTF-8 (RFC 6532) - an encoded word may not stand in an address
# (RFC 2047 5) - and the message is sent with SMTPUTF8 (`mail_options_for`)
POLICY_UTF8 = email.policy.SMTPUTF8


def _policy(*addresses: str) -> email.policy.EmailPolicy[EmailMessage]:
    return POLICY if all(a.isascii() for a in addresses) else POLICY_UTF8


def _base(config: PortalConfig, sender: str, to: str, subject: str, domain: str) -> EmailMessage:
    msg = EmailMessage(policy=_policy(sender, to))
    # an Address, not formataddr's string: a name with specials that is not ASCII
    # came out of that as an encoded word the header registry decoded and then
    # folded unquoted ("... <Nachsorge>" took the place of the sender's address)
    msg["From"] = Address(config.organization, addr_spec=sender)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
    return msg


def notification(
    config: PortalConfig, sender: str, recipient: str, link: str, expires: float, domain: str
) -> bytes:
    """The notification, composed here rather than through `EmailMessage` (which
    took 1.1 ms of the event loop's time for each one - in a burst of portal
    mail, as much as a delivery): the same headers, a multipart/alternative of a
    text and an HTML part, each quoted-printable (`_qp`)."""
    until = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%d %B %Y")
    org = config.organization
    text = (
        f"{org} has sent you a secure message.\n\n"
        f"Open it here:\n{link}\n\n"
        "To open it you will be asked for a one-time code, which we send to this "
        "address.\n"
        f"The message can be opened until {until}.\n\n"
        "If you were not expecting a message from us, you can ignore this one.\n"
    )
    e = html.escape
    page = (
        f'<!doctype html><html><body style="font-family:sans-serif">'
        f"<p>{e(org)} has sent you a secure message.</p>"
        f'<p><a href="{e(link)}">Open the secure message</a></p>'
        f"<p>To open it you will be asked for a one-time code, which we send to this "
        f"address. The message can be opened until {e(until)}.</p>"
        f"<p>If you were not expecting a message from us, you can ignore this one.</p>"
        f"</body></html>\n"
    )
    # "=_" cannot occur in a quoted-printable body: the boundary never does
    boundary = f"=_sealgate_{secrets.token_hex(16)}"
    head = (
        _from(org, sender)
        + _header("To", recipient, _policy(recipient))
        + _subject(config.notification_subject)
        + f"Date: {email.utils.format_datetime(datetime.datetime.now(datetime.UTC))}\r\n"
        + f"Message-ID: {email.utils.make_msgid(domain=domain)}\r\n"
        + "Auto-Submitted: auto-generated\r\n"  # RFC 3834: no auto-replies to it
        + "MIME-Version: 1.0\r\n"
        + f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'
    )
    part = 'Content-Type: text/{}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable'
    return b"".join(
        (
            head.encode(),  # (ASCII but for an address that is not: RFC 6532)
            f"--{boundary}\r\n{part.format('plain')}\r\n\r\n".encode(),
            _qp(text),
            f"\r\n--{boundary}\r\n{part.format('html')}\r\n\r\n".encode(),
            _qp(page),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )


def _header(
    name: str, value: str | Address, policy: email.policy.EmailPolicy[EmailMessage] = POLICY
) -> str:
    """``name: value`` and its line end, encoded (RFC 2047; under `POLICY_UTF8` an
    address that is not ASCII stays UTF-8) and folded as `EmailMessage` does when it
    needs to be."""
    if isinstance(value, str) and value.isascii() and value.isprintable() and len(value) <= 70:
        return f"{name}: {value}\r\n"  # as it is: nothing to encode or fold
    return str(policy.header_factory(name, value).fold(policy=policy))


@functools.lru_cache(maxsize=64)
def _from(organization: str, sender: str) -> str:  # the same each time: folded once
    return _header("From", Address(organization, addr_spec=sender))


@functools.lru_cache(maxsize=64)
def _subject(subject: str) -> str:
    return _header("Subject", subject)


def _qp(text: str) -> bytes:
    """Quoted-printable (RFC 2045 6.7) with CRLF line ends, lines of 76 at most."""
    return binascii.b2a_qp(text.encode(), istext=True).replace(b"\n", b"\r\n")


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
    msg = EmailMessage(policy=_policy(sender, recipient, original_sender))
    msg["From"] = Address(f"{recipient} via {config.organization} secure portal", addr_spec=sender)
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
