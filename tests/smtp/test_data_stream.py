"""The DATA reader stores exactly the message the client meant, however it arrives."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.smtp.data import DataProblem, MessageScanner
from gateway.smtp.passphrase import PassphraseFilter
from tests.conftest import RawSmtp, queued


def dot_stuff(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def random_message(rng: random.Random, lines: int) -> bytes:
    words = [b".", b"..", b"x", b"Received: no", b"", b"end.", b".start", b"a" * 300]
    body = [b" ".join(rng.choice(words) for _ in range(rng.randint(0, 3))) for _ in range(lines)]
    return b"Subject: r\r\n\r\n" + b"\r\n".join(body) + b"\r\n"


async def test_random_messages_in_random_fragments_are_stored_byte_for_byte(gateway_factory):
    gw = await gateway_factory({"relay.require_tls": False})
    rng = random.Random(5321)
    expected = []
    s = await RawSmtp.open(gw)
    await s.command("EHLO client.test")
    for _ in range(15):
        message = random_message(rng, rng.randint(0, 3000))
        expected.append(message)
        assert (await s.command("MAIL FROM:<s@clinic.test>")).startswith("250")
        assert (await s.command("RCPT TO:<r@example.test>")).startswith("250")
        assert (await s.command("DATA")).startswith("354")
        wire = dot_stuff(message) + b".\r\n"
        pos = 0
        while pos < len(wire):
            step = rng.choice((1, 2, 3, 5, 700, 70000))
            s.send(wire[pos : pos + step])
            pos += step
            if rng.random() < 0.05:
                await s.writer.drain()
                await asyncio.sleep(0)
        assert (await s.reply()).startswith("250 2.0.0")
    await s.close()
    stored = [gw.spool.read(p.name)[1] for p in queued(gw)]
    assert stored == expected  # queue ids sort by arrival


def test_scanner_counts_received_headers_only_in_the_header_section():
    scanner = MessageScanner(10**6, 1000, 2)
    out = scanner.feed(b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: body\r\n")
    assert scanner.received_headers == 2
    assert scanner.problem is None
    assert out.endswith(b"Received: body\r\n")


def test_scanner_counts_received_headers_across_chunks_and_under_a_clients_dot():
    """The header section read in pieces, a Received field among them dot-stuffed by
    the client (stored without the dot: a Received field like the others): one over
    the limit is a mail loop; the body's are not counted."""
    scanner = MessageScanner(10**6, 1000, 2)
    out = scanner.feed(b"Received: a\r\n.Received: b\r\n")
    assert (scanner.received_headers, scanner.problem) == (2, None)
    assert out == b"Received: a\r\nReceived: b\r\n"
    assert scanner.feed(b"Subject: x\r\n..Received: not one\r\n") == (
        b"Subject: x\r\n.Received: not one\r\n"
    )
    assert scanner.received_headers == 2
    scanner.feed(b"received: c\r\n\r\nReceived: body\r\n")
    assert scanner.received_headers == 3
    assert scanner.problem is DataProblem.MAIL_LOOP

    below = MessageScanner(10**6, 1000, 2)
    below.feed(b"Received: a\r\n")
    below.feed(b"\r\nReceived: body\r\nReceived: body\r\n")
    assert (below.received_headers, below.problem) == (1, None)


@pytest.mark.parametrize(
    ("chunks", "as_wire"),
    [
        ([b"Subject: x\r\n\r\nbody.\r\n", b"more\r\n"], True),
        ([b"Subject: x\r\n\r\n", b".starts with a dot\r\n"], False),  # chunk's first line
        ([b"Subject: x\r\n\r\na\r\n..\r\n"], False),  # a later line: "." stored
        ([b"Subject: x\r\n\r\na\r\nb\nc\r\n"], False),  # bare LF: rejected anyway
    ],
)
def test_scanner_says_whether_what_it_returned_is_its_own_wire_form(chunks, as_wire):
    scanner = MessageScanner(10**6, 1000, 50)
    for chunk in chunks:
        scanner.feed(chunk)
    assert scanner.data_is_wire is as_wire


def test_scanner_reports_a_line_that_grows_past_the_limit_without_waiting_for_its_end():
    scanner = MessageScanner(10**6, 1000, 50)
    scanner.feed(b"x" * 1500)
    assert scanner.problem is DataProblem.LINE_TOO_LONG


def test_scanner_allows_a_1000_octet_line_and_its_dot_stuffed_form():
    scanner = MessageScanner(10**6, 1000, 50)
    out = scanner.feed(b"." + b"y" * 998 + b"\r\n")  # 1001 octets on the wire, 1000 stored
    assert scanner.problem is None
    assert len(out) == 1000


@pytest.mark.parametrize(
    "ending", [b"\r", b"\n", b"\r\r\n", b"\n\r", b"\n\n", b"\r\r", b"\r\n\r", b"\n\r\n"]
)
@pytest.mark.parametrize("where", ["first line", "a middle line", "the last line"])
@pytest.mark.parametrize("pieces", ["whole", "a byte at a time"])
def test_scanner_finds_every_line_ending_but_crlf_wherever_it_is(ending, where, pieces):
    # the checks count CRs, LFs and lines: every mix of bare ones must still show
    lines = [b"Subject: x", b"", b"body", b".dotted", b"end"]
    at = {"first line": 0, "a middle line": 2, "the last line": 4}[where]
    lines[at] += ending + b"more"
    message = b"\r\n".join(lines) + b"\r\n"
    scanner = MessageScanner(10**6, 1000, 50)
    for chunk in [message] if pieces == "whole" else [bytes([b]) for b in message]:
        scanner.feed(chunk)
    scanner.finish()
    assert scanner.problem is DataProblem.BARE_LINE_ENDING


@pytest.mark.parametrize("pieces", ["whole", "a byte at a time", "in lines"])
def test_scanner_returns_crlf_text_unstuffed_as_the_client_meant_it(pieces):
    message = b"Subject: x\r\n\r\n.\r\n..x\r\nbody.\r\n\r\n. \r\nend\r\n"
    chunks = {
        "whole": [message],
        "a byte at a time": [bytes([b]) for b in message],
        "in lines": message.splitlines(keepends=True),
    }[pieces]
    scanner = MessageScanner(10**6, 1000, 50)
    out = b"".join(scanner.feed(chunk) for chunk in chunks) + scanner.finish()
    assert scanner.problem is None
    assert out == b"Subject: x\r\n\r\n\r\n.x\r\nbody.\r\n\r\n \r\nend\r\n"
    assert scanner.data_is_wire is False


@pytest.mark.parametrize("pieces", ["whole", "the header in two", "a byte at a time"])
def test_the_passphrase_field_is_taken_out_however_the_message_arrives(pieces):
    head = b"From: a@b.test\r\nX-Sealgate-Passphrase: tulip\r\n radiator\r\nSubject: s\r\n\r\n"
    body = b"x-sealgate-passphrase: in the body, not a field\r\n" * 3
    message = head + body
    cut = {"whole": [len(message)], "the header in two": [20, len(message)]}.get(
        pieces, range(1, len(message) + 1)
    )
    chunks = [message[a:b] for a, b in zip([0, *cut], cut, strict=False)]
    f = PassphraseFilter("X-Sealgate-Passphrase")
    out = b"".join(f.feed(chunk) for chunk in chunks) + f.finish()
    assert out == b"From: a@b.test\r\nSubject: s\r\n\r\n" + body
    assert f.value == "tulip radiator"


def test_a_message_without_the_passphrase_field_passes_as_it_came():
    message = b"From: a@b.test\r\nSubject: s\r\n\r\nX-Sealgate-Passphrase: body text\r\n"
    f = PassphraseFilter("X-Sealgate-Passphrase")
    assert f.feed(message) is message  # the first piece holds the whole header: not copied
    assert f.feed(b"more\r\n") == b"more\r\n" and f.finish() == b"" and f.value is None
    empty_head = PassphraseFilter("X-Sealgate-Passphrase")
    assert empty_head.feed(b"\r\nbody\r\n") == b"\r\nbody\r\n" and empty_head.value is None


def test_the_received_fields_date_is_the_moment_given_to_the_second():
    """Made once a second (`_date`): each field still carries its own moment, in its
    own zone."""
    import datetime
    import email.utils

    from gateway.model import ClientInfo
    from gateway.smtp.server import received_header

    client = ClientInfo(ip="127.0.0.1", port=1, helo="h")
    utc = datetime.UTC
    est = datetime.timezone(datetime.timedelta(hours=-5))
    moments = [
        datetime.datetime(2026, 12, 6, 22, 0, 0, 10, tzinfo=utc),
        datetime.datetime(2026, 12, 6, 22, 0, 0, 999_999, tzinfo=utc),
        datetime.datetime(2026, 12, 6, 22, 0, 1, 5, tzinfo=utc),
        datetime.datetime(2026, 12, 6, 17, 0, 1, 5, tzinfo=est),  # the same instant
        datetime.datetime(2026, 12, 6, 22, 0, 0, 10, tzinfo=utc),  # back again
    ]
    for when in moments:
        header = received_header(client, "gw.test", "Q1", True, False, when)
        date = header.rsplit(";\r\n\t", 1)[1].removesuffix("\r\n")
        assert date == email.utils.format_datetime(when.replace(microsecond=0))
        assert email.utils.parsedate_to_datetime(date) == when.replace(microsecond=0)
