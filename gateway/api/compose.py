"""compose - a message for the message API: from its JSON form, or raw RFC 5322;
with the envelope it is sent under.

JSON: ``from`` (an address, or ``{"address", "name"}``), ``to``/``cc``/``bcc``
(lists of the same), ``subject``, ``text`` and/or ``html``, ``attachments`` (each
``{"filename", "content_type", "content"}`` with the content in base64),
``headers`` (other header fields, name to value: never the ones composed here).
The envelope: the sender is ``from``, the recipients ``to`` + ``cc`` + ``bcc``
(Bcc is not written into the message).

Raw (``message/rfc822``): the envelope comes from the query (``from``, ``to``
repeated) or else from the message's From, To, Cc and Bcc (Bcc removed).  Line
endings become CRLF.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import email.headerregistry
import email.message
import email.policy
import email.utils
import re
import secrets
from dataclasses import dataclass
from typing import Any

from gateway.crypto.mime import base64_body
from gateway.errors import SealgateError

COMPOSED = {
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")


class Invalid(SealgateError, ValueError):
    """What is wrong with the request (the API's 422 detail)."""


def _one_line(text: str) -> bool:
    """No line break of any kind (U+2028 and U+0085 too) and no control character."""
    return (
        len(text.splitlines()) <= 1
        and not any(ord(c) < 32 and c != "\t" or c == "\x7f" for c in text)
        and not text.endswith(("\r", "\n"))
    )


@dataclass(frozen=True)
class Composed:
    sender: str
    recipients: list[str]
    data: bytes  # CRLF line endings


def _address(value: Any, where: str) -> tuple[str, str]:
    if isinstance(value, str):
        name, addr = "", value
    elif isinstance(value, dict) and isinstance(value.get("address"), str):
        name, addr = str(value.get("name") or ""), value["address"]
    else:
        raise Invalid(f"{where}: an address or {{address, name}}")
    if not addr or any(c in addr for c in "<>,") or "@" not in addr or not _one_line(addr):
        raise Invalid(f"{where}: {addr!r} is not a mail address")
    if not _one_line(name):
        raise Invalid(f"{where}: a name is one line of text")
    return name, addr


def _addresses(value: Any, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{where}: a list of addresses")
    return [_address(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise Invalid(f"{key}: a string")
    return value


def _mailbox(name: str, addr: str) -> str:
    return email.utils.formataddr((name, addr)) if name else addr


def from_json(body: Any, hostname: str) -> Composed:
    """The message and envelope of the JSON form (Invalid: what is wrong)."""
    try:
        return _from_json(body, hostname)
    except Invalid:
        raise
    except (ValueError, TypeError, UnicodeError) as e:  # what the checks missed: still 422
        raise Invalid(f"the message cannot be composed: {str(e)[:200]}") from None


def _from_json(body: Any, hostname: str) -> Composed:  # noqa: C901 - one check per field of the JSON form
    if not isinstance(body, dict):
        raise Invalid("the body is not a JSON object")
    unknown = set(body) - {"from", "to", "cc", "bcc", "subject", "text", "html"}
    unknown -= {"attachments", "headers"}
    if unknown:
        raise Invalid(f"unknown fields: {', '.join(sorted(unknown))}")
    if "from" not in body:
        raise Invalid("from: needed")
    sender = _address(body["from"], "from")
    to, cc, bcc = (_addresses(body.get(k), k) for k in ("to", "cc", "bcc"))
    if not (to or cc or bcc):
        raise Invalid("to, cc, bcc: at least one recipient")
    subject, text, html = _text(body, "subject"), _text(body, "text"), _text(body, "html")
    if subject is not None and not _one_line(subject):
        raise Invalid("subject: one line of text")
    headers = _checked_headers(body.get("headers") or {})
    attachments = body.get("attachments") or []
    recipients = [a[1] for a in to + cc + bcc]
    if not attachments and _plain(sender, to, cc, headers):
        data = _quick(hostname, sender, to, cc, subject or "", text, html, headers)
        return Composed(sender[1], recipients, data)
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = _mailbox(*sender)
    if to:
        message["To"] = ", ".join(_mailbox(*a) for a in to)
    if cc:
        message["Cc"] = ", ".join(_mailbox(*a) for a in cc)
    message["Subject"] = subject or ""
    message["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = email.utils.make_msgid(domain=hostname)
    for name, value in headers:
        message[name] = value
    if html is None:
        message.set_content(text or "")
    elif text is None:
        message.set_content(html, subtype="html")
    else:
        message.set_content(text)
        message.add_alternative(html, subtype="html")
    _add_attachments(message, attachments)
    return Composed(sender[1], recipients, message.as_bytes())


def _checked_headers(headers: Any) -> list[tuple[str, str]]:
    if not isinstance(headers, dict):
        raise Invalid("headers: an object of header names and values")
    for name, value in headers.items():
        if not isinstance(value, str) or not _HEADER_NAME.fullmatch(name):
            raise Invalid(f"headers: {name!r} is not a header field name with a text value")
        if name.lower() in COMPOSED:
            raise Invalid(f"headers: {name} is composed from the other fields")
        if not _one_line(value):
            raise Invalid(f"headers: {name}: one line of text")
    return list(headers.items())


# -- the common case by hand ------------------------------------------------------------
# No attachments, ASCII addresses and header values: the message is written directly
# (the email package's header objects cost about ten times as much - the API takes
# hundreds of these a second).  What needs more (attachments, non-ASCII addresses
# or header values, very long ones) goes through the email package.

_SHORT = 900  # a header value longer than this is folded by the email package


def _plain(
    sender: tuple[str, str],
    to: list[tuple[str, str]],
    cc: list[tuple[str, str]],
    headers: list[tuple[str, str]],
) -> bool:
    addresses = [sender, *to, *cc]
    return (
        all(a.isascii() for _, a in addresses)
        and all(v.isascii() and len(v) <= _SHORT for _, v in headers)
        and len(", ".join(_mailbox(*a) for a in to)) <= _SHORT
        and len(", ".join(_mailbox(*a) for a in cc)) <= _SHORT
    )


def _header(name: str, value: str) -> str:
    """A header field: as it is when ASCII and short, else RFC 2047 encoded words."""
    if value.isascii() and len(value) <= _SHORT:
        return f"{name}: {value}\r\n"
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n"


def _part(subtype: str, content: str) -> bytes:
    """A text part's header and body: 7bit when it can be, else base64 of UTF-8."""
    lines = content.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if content.isascii() and all(len(line) <= 998 for line in lines):
        body = "\r\n".join(lines).encode("ascii")
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        cte = "7bit"
    else:
        body = base64_body("\r\n".join(lines).encode("utf-8"))
        cte = "base64"
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    return head.encode("ascii") + b"\r\n" + body


def _quick(
    hostname: str,
    sender: tuple[str, str],
    to: list[tuple[str, str]],
    cc: list[tuple[str, str]],
    subject: str,
    text: str | None,
    html: str | None,
    headers: list[tuple[str, str]],
) -> bytes:
    head = [_header("From", _mailbox(*sender))]
    if to:
        head.append(_header("To", ", ".join(_mailbox(*a) for a in to)))
    if cc:
        head.append(_header("Cc", ", ".join(_mailbox(*a) for a in cc)))
    head.append(_header("Subject", subject))
    head.append(f"Date: {email.utils.formatdate(localtime=False, usegmt=True)}\r\n")
    head.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n")
    head += [_header(name, value) for name, value in headers]
    head.append("MIME-Version: 1.0\r\n")
    top = "".join(head).encode("ascii")
    if html is None:
        return top + _part("plain", text or "")
    if text is None:
        return top + _part("html", html)
    boundary = f"=_{secrets.token_hex(12)}"
    return (
        top
        + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode()
        + f"--{boundary}\r\n".encode()
        + _part("plain", text)
        + f"--{boundary}\r\n".encode()
        + _part("html", html)
        + f"--{boundary}--\r\n".encode()
    )


def _add_attachments(message: email.message.EmailMessage, attachments: Any) -> None:
    if not isinstance(attachments, list):
        raise Invalid("attachments: a list")
    for i, a in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(a, dict) or not isinstance(a.get("content"), str):
            raise Invalid(f"{where}: {{filename, content_type, content (base64)}}")
        try:
            content = base64.b64decode(a["content"], validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(f"{where}.content: not base64") from None
        ctype = a.get("content_type") or "application/octet-stream"
        if not isinstance(ctype, str) or not re.fullmatch(r"[\w.+-]+/[\w.+-]+", ctype):
            raise Invalid(f"{where}.content_type: {ctype!r} is not a media type")
        filename = a.get("filename") or "attachment"
        if not isinstance(filename, str) or not _one_line(filename):
            raise Invalid(f"{where}.filename: one line of text")
        maintype, subtype = ctype.split("/", 1)
        message.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)


def _header_addresses(message: email.message.Message, name: str) -> list[str]:
    found = []
    for _, addr in email.utils.getaddresses(message.get_all(name, [])):
        if addr:
            found.append(addr)
    return found


def from_raw(data: bytes, sender: str | None, recipients: list[str]) -> Composed:
    """A raw message and its envelope (from the query, else its own headers)."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise Invalid("no blank line after the header")
    parsed = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)
    if sender is None:
        found = _header_addresses(parsed, "From")
        if len(found) != 1:
            raise Invalid("from: not given, and the message has no single From address")
        sender = found[0]
    if not recipients:
        recipients = [a for n in ("To", "Cc", "Bcc") for a in _header_addresses(parsed, n)]
        if not recipients:
            raise Invalid("to: not given, and the message names no recipient")
    if parsed.get_all("Bcc"):
        lines = re.split(rb"\r\n(?![ \t])", head)
        head = b"\r\n".join(li for li in lines if not li.lower().startswith(b"bcc:"))
    return Composed(sender, recipients, head + b"\r\n\r\n" + rest)
