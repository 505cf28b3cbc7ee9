"""Messages of the shapes a clinic sends (plain, HTML with an inline image, nested
multipart with attachments, UTF-8 everywhere, long lines), and a DKIM check."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import dkim

from gateway.crypto.dkim import DkimKey


def plain() -> bytes:
    return (
        b"From: Dr A <a@clinic.test>\r\nTo: bob@dest.test\r\nSubject: Results\r\n"
        b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@clinic.test>\r\n\r\n"
        b"Your results are fine.\r\n.leading dot\r\n"
    )


def base(subject: str = "Results") -> EmailMessage:
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"], m["To"], m["Subject"] = "Dr A <a@clinic.test>", "bob@dest.test", subject
    m["Date"], m["Message-ID"] = "Sun, 22 Nov 2026 10:00:00 +0000", "<2@clinic.test>"
    return m


def html_inline_image() -> bytes:
    m = base()
    m.set_content("See the scan.")
    m.add_alternative('<p>See the scan:</p><img src="cid:scan@clinic.test">', subtype="html")
    html = m.get_payload()[1]
    html.add_related(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image", "png", cid="<scan@clinic.test>"
    )
    return m.as_bytes()


def nested_with_attachments() -> bytes:
    m = base()
    m.set_content("Letter attached.")
    m.add_alternative("<p>Letter attached.</p>", subtype="html")
    m.add_attachment(
        bytes(range(256)) * 40, maintype="application", subtype="pdf", filename="letter.pdf"
    )
    m.add_attachment("a,b\r\n1,2\r\n", subtype="csv", filename="data.csv")
    return m.as_bytes()


def utf8_everywhere() -> bytes:
    m = base(subject="Résultats de Zoë – 検査")
    m.set_content("Grüße, Zoë: 検査結果は正常です。\n", charset="utf-8", cte="8bit")
    m.add_attachment(
        "naïve 8-bit text\n".encode(), maintype="text", subtype="plain", filename="n.txt"
    )
    return m.as_bytes()


def long_lines() -> bytes:
    return (
        b"From: a@clinic.test\r\nTo: bob@dest.test\r\nSubject: long\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + b"x" * 996
        + b"\r\n"
        + b"y" * 10
        + b"\r\n"
    )


MESSAGES = {
    "plain text, no MIME fields": plain,
    "html with an inline image": html_inline_image,
    "nested multipart with attachments": nested_with_attachments,
    "utf-8 headers, 8-bit bodies": utf8_everywhere,
    "long lines": long_lines,
}


def verify(message: bytes, key: DkimKey) -> bool:
    record = key.public_record().encode()

    def dnsfunc(name, timeout=5):
        assert name == f"{key.selector}._domainkey.{key.domain}.".encode()
        return record

    return bool(dkim.verify(message, dnsfunc=dnsfunc))
