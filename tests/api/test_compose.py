"""The JSON form of a message, composed by hand in the common case and by the email
package otherwise: either way a reader finds the same headers, text and parts -
non-ASCII names, subjects and text included - and Bcc nowhere in the message."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from gateway.api.compose import Invalid, from_json, from_raw

ATTACHMENT = {
    "filename": "a.txt",
    "content_type": "text/plain",
    "content": base64.b64encode(b"x").decode(),
}


def read(data: bytes) -> email.message.EmailMessage:
    assert b"\r\n" in data and data.count(b"\n") == data.count(b"\r\n")  # CRLF only
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


@pytest.mark.parametrize("attachments", [[], [ATTACHMENT]])  # by hand / the email package
@pytest.mark.parametrize(
    ("subject", "name", "text"),
    [
        ("Lab results", "B. Roe", "All normal.\nSee you."),
        ("Résultats d'analyse ✓", "Zoë Müller", "Tout est normal — à bientôt.\n"),
        ("x" * 950, "Ann", "y" * 1200),  # long: folded and encoded
    ],
)
def test_a_reader_finds_the_same_message_either_way(attachments, subject, name, text):
    body = {
        "from": {"address": "doctor@clinic.test", "name": "Dr. Lee"},
        "to": [{"address": "a@dest.test", "name": name}],
        "cc": ["c@dest.test"],
        "bcc": ["hidden@dest.test"],
        "subject": subject,
        "text": text,
        "headers": {"X-Ehr-Reference": "visit-42"},
        "attachments": attachments,
    }
    composed = from_json(body, "gw.test")
    assert composed.sender == "doctor@clinic.test"
    assert composed.recipients == ["a@dest.test", "c@dest.test", "hidden@dest.test"]
    message = read(composed.data)
    assert message["Subject"] == subject
    assert message["To"].addresses[0].display_name == name
    assert message["To"].addresses[0].addr_spec == "a@dest.test"
    assert message["From"].addresses[0].display_name == "Dr. Lee"
    assert message["X-Ehr-Reference"] == "visit-42" and message["Bcc"] is None
    assert b"hidden@dest.test" not in composed.data
    assert message["Message-ID"].endswith("@gw.test>") and message["Date"]
    part = message.get_body(("plain",))
    assert part is not None
    assert part.get_content().replace("\r\n", "\n").rstrip("\n") == text.rstrip("\n")
    assert max(len(line) for line in composed.data.split(b"\r\n")) <= 998


def test_text_and_html_become_alternatives_and_html_alone_is_html():
    both = read(
        from_json(
            {"from": "a@x.test", "to": ["b@y.test"], "text": "t", "html": "<p>h</p>"}, "gw"
        ).data
    )
    assert both.get_content_type() == "multipart/alternative"
    assert both.get_body(("plain",)).get_content().strip() == "t"
    assert both.get_body(("html",)).get_content().strip() == "<p>h</p>"
    alone = read(from_json({"from": "a@x.test", "to": ["b@y.test"], "html": "<p>h</p>"}, "gw").data)
    assert alone.get_content_type() == "text/html"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"to": ["b@y.test"]}, "from: needed"),
        ({"from": "a@x.test"}, "at least one recipient"),
        ({"from": "a@x.test", "to": ["b@y.test"], "subject": "a\u2028b"}, "subject"),
        ({"from": "a@x.test", "to": ["b@y.test"], "headers": {"From": "x"}}, "composed"),
        ({"from": "a@x.test", "to": ["b@y.test"], "headers": {"X-A": "1\r\nBcc: z@z"}}, "one line"),
        ({"from": "a@x.test", "to": ["b@y.test"], "attachments": [{"content": "!!"}]}, "base64"),
    ],
)
def test_what_cannot_be_composed_is_refused_with_the_reason(body, why):
    with pytest.raises(Invalid, match=why):
        from_json(body, "gw")


def test_a_raw_message_keeps_its_bytes_but_not_its_bcc():
    raw = b"From: a@x.test\nTo: b@y.test\nBcc: secret@y.test,\n other@y.test\nSubject: s\n\nbody\n"
    composed = from_raw(raw, None, [])
    assert composed.recipients == ["b@y.test", "secret@y.test", "other@y.test"]
    assert b"secret" not in composed.data and b"other@" not in composed.data
    assert composed.data.endswith(b"\r\n\r\nbody\r\n")
