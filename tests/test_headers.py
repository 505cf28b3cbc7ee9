"""gateway.headers: where a message's header section ends, with CRLF or bare LF."""

from gateway.archive.query import message_id_of, subject_of
from gateway.headers import header_is_ascii, header_section


def test_the_header_section_ends_at_the_first_empty_line_crlf_or_bare_lf():
    assert header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore") == b"A: 1\r\nB: 2\r\n\r\n"
    assert header_section(b"A: 1\nB: 2\n\nbody\n\nmore") == b"A: 1\nB: 2\n\n"
    assert header_section(b"A: 1\r\n\nbody") == b"A: 1\r\n\n"


def test_without_an_empty_line_the_whole_message_is_its_header_up_to_the_limit():
    assert header_section(b"A: 1\r\nB: 2\r\n") == b"A: 1\r\nB: 2\r\n"
    assert header_section(b"A: 1\r\nB: 2\r\n", limit=6) == b"A: 1\r\n"
    # an empty line past the limit is not looked for
    assert header_section(b"A: 1\r\nB: 2\r\n\r\nbody", limit=8) == b"A: 1\r\nB:"


def test_utf8_in_the_body_only_leaves_the_header_ascii():
    assert header_is_ascii("From: a@b\r\n\r\nÄrztin".encode())
    assert not header_is_ascii("From: Ärztin <a@b>\r\n\r\nbody".encode())
    assert header_is_ascii("From: a@b\n\nÄrztin".encode())  # bare LF
    assert not header_is_ascii("From: a@b\nX: Ä".encode())  # no body at all


def test_the_archive_reads_message_id_and_subject_from_the_header_only():
    data = b"Subject: Lab\r\n results\r\nMessage-ID: <1@x>\r\n\r\nSubject: not this\r\n"
    assert subject_of(data) == "Lab results"
    assert message_id_of(data) == "<1@x>"
    body_only = b"From: a@b\r\n\r\nMessage-ID: <2@x>\r\nSubject: body\r\n"
    assert message_id_of(body_only) is None
    assert subject_of(body_only) == ""
    assert subject_of(b"From: a@b\nSubject: bare\n\nSubject: no") == "bare"
