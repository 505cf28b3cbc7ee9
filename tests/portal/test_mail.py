"""The portal's notification (`gateway.portal.mail.notification`), composed without
`EmailMessage`: a mail reader's parser finds the headers (encoded when they are
not ASCII), a text and an HTML alternative carrying the whole link, the
organisation and the expiry, quoted-printable lines of 76 at most, and no defects;
an address that is not ASCII is written as UTF-8 (RFC 6532);
a link too long for one line survives the encoding.  The code message keeps
the sender's address in From whatever the organisation's name, and so does a
recipient's reply."""

from __future__ import annotations

import dataclasses
import datetime
import email
import email.header
import email.policy
import email.utils
import re

import pytest

from gateway.config import Config
from gateway.portal.mail import code_message, notification, reply

LINK = "https://portal.example.org/m/" + "Ab0_-" * 8 + "xyz"
EXPIRES = datetime.datetime(2027, 1, 4, 12, tzinfo=datetime.UTC).timestamp()


def _parsed(data: bytes) -> email.message.EmailMessage:
    # (as a reader of SMTPUTF8 mail does: headers in UTF-8, RFC 6532)
    msg = email.message_from_string(data.decode(), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_the_notification_is_a_multipart_alternative_with_the_link_in_both_parts():
    data = notification(
        Config().portal, "portal@gw.example", "r@plain.test", LINK, EXPIRES, "gw.example"
    )
    msg = _parsed(data)
    assert data.isascii() and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert msg["From"] == "Sealgate <portal@gw.example>"
    assert msg["To"] == "r@plain.test"
    assert msg["Subject"] == Config().portal.notification_subject
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"].endswith("@gw.example>")
    sent = email.utils.parsedate_to_datetime(msg["Date"])
    assert abs(sent - datetime.datetime.now(datetime.UTC)).total_seconds() < 60
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert not msg.defects and not any(p.defects for p in msg.iter_parts())
    text = msg.get_body(("plain",)).get_content()
    page = msg.get_body(("html",)).get_content()
    assert f"\n{LINK}\r\n" in text and f'<a href="{LINK}">' in page
    assert "Sealgate has sent you a secure message." in text
    assert "until 04 January 2027" in text and "until 04 January 2027" in page
    head, body = data.split(b"\r\n\r\n", 1)
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_a_link_longer_than_a_line_comes_out_whole():
    long = "https://secure-portal.a-hospital-with-a-long-name.example.org/m/" + "T" * 43
    msg = _parsed(
        notification(Config().portal, "portal@gw.example", "r@x.test", long, EXPIRES, "gw.x")
    )
    assert long in msg.get_body(("plain",)).get_content()
    assert f'href="{long}"' in msg.get_body(("html",)).get_content()


@pytest.mark.parametrize("recipient", ["jürgen@bücher.test", "x" * 60 + "@" + "d" * 40 + ".test"])
def test_headers_that_are_not_ascii_or_short_are_encoded_and_folded(recipient):
    portal = dataclasses.replace(
        Config().portal,
        organization='Klinikum Süd, Abteilung "Kardiologie" & <Nachsorge>',
        notification_subject="Sie haben eine sichere Nachricht – bitte bald öffnen, "
        "sie läuft nach dreißig Tagen ab",
    )
    data = notification(portal, "portal@gw.example", recipient, LINK, EXPIRES, "gw.example")
    msg = _parsed(data)
    # an address that is not ASCII is the one thing in UTF-8 (RFC 6532: an encoded
    # word may not stand in an address, RFC 2047 5)
    assert data.replace(f"To: {recipient}".encode(), b"").isascii()
    # (the parser puts a space between two encoded words a fold split, which RFC
    # 2047 6.2 says to drop: the header itself is read with decode_header)
    head = re.sub(rb"\r\n(?=[ \t])", b"", data.split(b"\r\n\r\n", 1)[0])  # unfolded
    (folded,) = [line[6:] for line in head.split(b"\r\n") if line.startswith(b"From: ")]
    decoded = email.header.make_header(email.header.decode_header(folded.decode()))
    assert str(decoded) == f"{portal.organization} <portal@gw.example>"
    assert msg["From"].addresses[0].addr_spec == "portal@gw.example"
    assert msg["Subject"] == portal.notification_subject
    assert msg["To"] == recipient
    page = msg.get_body(("html",)).get_content()
    assert "Klinikum Süd, Abteilung &quot;Kardiologie&quot; &amp; &lt;Nachsorge&gt;" in page
    assert portal.organization in msg.get_body(("plain",)).get_content()
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_the_code_message_keeps_the_sender_address_whatever_the_organization():
    portal = dataclasses.replace(
        Config().portal, organization='Klinikum Süd, Abteilung "Kardiologie" & <Nachsorge>'
    )
    msg = _parsed(code_message(portal, "portal@gw.example", "r@x.test", "12345678", "gw.x"))
    assert msg["From"].addresses[0].addr_spec == "portal@gw.example"
    assert "12345678" in msg.get_content()


def test_a_reply_keeps_the_portal_address_in_from_whatever_the_organization():
    portal = dataclasses.replace(Config().portal, organization="Klinikum Süd <Nachsorge>")
    data = reply(
        portal,
        "portal@gw.example",
        "r@x.test",
        "doc@clinic.test",
        "Befund",
        None,
        "Danke",
        [],
        "gw",
    )
    msg = _parsed(data)
    assert msg["From"].addresses[0].addr_spec == "portal@gw.example"
    assert msg["Reply-To"] == "r@x.test" and msg["To"] == "doc@clinic.test"


def test_a_reply_between_addresses_that_are_not_ascii_names_them_as_utf_8():
    data = reply(
        Config().portal,
        "portal@gw.example",
        "patiënt@plain.test",
        "ärztin@klinik.test",
        "Befund",
        None,
        "Danke",
        [],
        "gw",
    )
    msg = _parsed(data)
    assert msg["Reply-To"] == "patiënt@plain.test" and msg["To"] == "ärztin@klinik.test"
    assert msg["From"].addresses[0].addr_spec == "portal@gw.example"
    assert "To: ärztin@klinik.test\r\n".encode() in data  # not an encoded word
    assert "Reply-To: patiënt@plain.test\r\n".encode() in data
