"""SMTP smuggling: only CRLF "." CRLF ends data; bare CR/LF messages are rejected whole.

Each case hides a second transaction behind an end-of-data marker that some server
might honour.  Sealgate must answer exactly one reply for the whole DATA, reject it,
and queue nothing: neither the cover message nor the smuggled one.
"""

from __future__ import annotations

import pytest

from tests.conftest import RawSmtp, queued

SMUGGLED = (
    b"MAIL FROM:<attacker@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"From: ceo@clinic.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)

MARKERS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
}

PLAINTEXT = {"relay.require_tls": False}


@pytest.mark.parametrize("marker", MARKERS.values(), ids=MARKERS.keys())
async def test_smuggled_message_behind_a_non_crlf_end_marker_is_not_accepted(
    gateway_factory, marker
):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: cover\r\n\r\ncover body" + marker + SMUGGLED + b".\r\n")
    reply = await s.reply()
    assert reply.startswith("554 5.5.2"), reply
    # The session is back at the command level: one reply for the whole DATA.
    assert (await s.command("NOOP")).startswith("250")
    await s.close()
    assert queued(gw) == []
    assert gw.metrics.messages_rejected.labels("bare_line_ending")._value.get() == 1


async def test_bare_lf_inside_a_message_is_rejected(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: x\r\n\r\nline one\nline two\r\n.\r\n")
    assert (await s.reply()).startswith("554 5.5.2")
    await s.close()
    assert queued(gw) == []


@pytest.mark.parametrize(
    ("sent", "stored", "as_wire"),
    [
        (
            b"Subject: dots\r\n\r\n..\r\n...two\r\n.x\r\nend.\r\n",
            b"Subject: dots\r\n\r\n.\r\n..two\r\nx\r\nend.\r\n",
            False,  # delivery must stuff its dots again
        ),
        (  # no line begins with a dot: the stored bytes are their own wire form
            b"Subject: plain\r\n\r\nno dot.\r\nstarts a line\r\n",
            b"Subject: plain\r\n\r\nno dot.\r\nstarts a line\r\n",
            True,
        ),
    ],
    ids=["dotted", "plain"],
)
async def test_dot_stuffed_lines_are_unstuffed_and_kept(gateway_factory, sent, stored, as_wire):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(sent + b".\r\n")
    reply = await s.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    await s.close()
    (path,) = queued(gw)
    envelope, data = gw.spool.read(path.name)
    assert data == stored
    assert envelope.data_is_wire is as_wire


async def test_an_empty_message_ends_at_the_first_dot_line(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(b".\r\nNOOP\r\n")
    assert (await s.reply()).startswith("250 2.0.0 Ok: queued as")
    assert (await s.reply()).startswith("250")  # the pipelined NOOP is a command
    await s.close()
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[1] == b""


async def test_pipelined_commands_after_data_are_not_swallowed(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(
        b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@clinic.test>\r\n"
        b"RCPT TO:<b@example.test>\r\nDATA\r\n"
    )
    assert (await s.reply()).startswith("250 2.0.0")
    assert (await s.reply()).startswith("250 2.1.0")
    assert (await s.reply()).startswith("250 2.1.5")
    assert (await s.reply()).startswith("354")
    s.send(b"Subject: two\r\n\r\nbody two\r\n.\r\n")
    assert (await s.reply()).startswith("250 2.0.0")
    await s.close()
    bodies = sorted(gw.spool.read(p.name)[1] for p in queued(gw))
    assert bodies == [b"Subject: one\r\n\r\nbody\r\n", b"Subject: two\r\n\r\nbody two\r\n"]


async def test_end_marker_split_across_packets_is_still_found(gateway_factory):
    import asyncio

    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    for piece in (b"Subject: split\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
        s.send(piece)
        await s.writer.drain()
        await asyncio.sleep(0.02)
    assert (await s.reply()).startswith("250 2.0.0")
    await s.close()
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[1] == b"Subject: split\r\n\r\nbody\r\n"


async def test_prose_whose_lines_end_in_a_dot_is_kept_whole_across_chunks(gateway_factory):
    # every line ends in "." (each ends a read of the listener's) and the message is
    # several times DATA_CHUNK: the pieces are gathered, checked and written in order
    lines = [b"Sentence number %d ends here." % n for n in range(12_000)]
    lines[5000] = b".a line that began with a dot."
    body = b"Subject: prose\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\n")
    reply = await s.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    assert (await s.reply()).startswith("250")  # the pipelined NOOP is a command
    await s.close()
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[1] == body


async def test_a_bare_lf_far_into_prose_is_still_found(gateway_factory):
    lines = [b"Sentence number %d ends here." % n for n in range(6_000)]
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(
        b"\r\n".join(lines[:4000]) + b"\nsmuggled.\r\n" + b"\r\n".join(lines[4000:]) + b"\r\n.\r\n"
    )
    assert (await s.reply()).startswith("554 5.5.2")
    await s.close()
    assert queued(gw) == []
