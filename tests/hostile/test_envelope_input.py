"""Hostile envelopes at the SMTP boundary: what cannot be stored, archived or
delivered is refused with a syntax reply before anything is acknowledged, and the
session (and the gateway) go on; what SMTPUTF8 allows is accepted and delivered
exactly.  Each case here lost mail or stuck it before the listener checked the
envelope (`gateway.addresses`)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from gateway.events import Event
from tests.conftest import RawSmtp, make_message, queued
from tests.support.archive import archive_of
from tests.support.world import wait_until

UTF8_MAIL = "MAIL FROM:<a@clinic.test> SMTPUTF8"
PLAIN_MAIL = "MAIL FROM:<a@clinic.test>"


async def tls_session(gw, helo: bytes = b"EHLO client.test") -> RawSmtp:
    s = await RawSmtp.open(gw)
    assert (await s.command(helo + b"\r\n")).startswith("250")
    await s.starttls()
    assert (await s.command("EHLO client.test")).startswith("250")
    return s


async def send_ok(
    s: RawSmtp, rcpt: str = "r@tls.test", mail: str = PLAIN_MAIL, message: bytes | None = None
) -> str:
    """A whole transaction that must succeed; the queue id."""
    for command, code in ((mail, "250"), (f"RCPT TO:<{rcpt}>", "250"), ("DATA", "354")):
        reply = await s.command(command.encode() + b"\r\n")
        assert reply.startswith(code), (command, reply)
    message = make_message() if message is None else message
    reply = await s.command(message.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.split()[-1]


@pytest.mark.parametrize(
    ("mail", "rcpt", "expected"),
    [
        # the battery's critical finding: acknowledged, then lost, then no restart
        (UTF8_MAIL, b"r\xff\xfe@tls.test", "553 5.1.3 Bad recipient address syntax: not valid"),
        (PLAIN_MAIL, b"r\xff\xfe@tls.test", "553 5.1.3 Bad recipient address syntax: not valid"),
        # overlong UTF-8 for "/" is not UTF-8 either
        (UTF8_MAIL, b"r\xc0\xaf@tls.test", "553 5.1.3 Bad recipient address syntax: not valid"),
        # stuck at every retry before: aiosmtplib refuses to send a NUL
        (PLAIN_MAIL, b"r\x00z@tls.test", "553 5.1.3 Bad recipient address syntax: contains a"),
        (PLAIN_MAIL, b"r\x7fz@tls.test", "553 5.1.3 Bad recipient address syntax: contains a"),
        (PLAIN_MAIL, "r\u0085z@tls.test".encode(), "553 5.1.3 Bad recipient address syntax: con"),
        (UTF8_MAIL, "r\u0085z@tls.test".encode(), "553 5.1.3 Bad recipient address syntax: con"),
        (PLAIN_MAIL, "dr.müller@tls.test".encode(), "553 5.6.7 Non-ASCII address requires"),
        (PLAIN_MAIL, b"r@[127.0.0.41]", "553 5.1.3 Bad recipient address syntax: address lit"),
        (PLAIN_MAIL, b"r@-tls.test", "553 5.1.3 Bad recipient address syntax: invalid domain"),
        (PLAIN_MAIL, b"r@tls_x.test", "553 5.1.3 Bad recipient address syntax: invalid domain"),
        (UTF8_MAIL, "r@\u2603.test".encode(), "553 5.1.3 Bad recipient address syntax: domain"),
        (PLAIN_MAIL, b"x" * 65 + b"@tls.test", "553 5.1.3 Bad recipient address syntax: local"),
        (PLAIN_MAIL, b"r@" + b"a." * 130 + b"test", "553 5.1.3 Bad recipient address syntax"),
        (PLAIN_MAIL, b"r@" + b"a" * 990 + b".test", "553 5.1.3 Bad recipient address syntax: lon"),
        (PLAIN_MAIL, b"r@" + b"a" * 1100 + b".test", "500 5.5.2"),  # past the line limit
    ],
)
async def test_a_recipient_that_cannot_be_represented_is_refused_and_the_session_goes_on(
    relay, mail, rcpt, expected
):
    gw, dest, _ = await relay()
    s = await tls_session(gw)
    with capture_logs() as logs:
        assert (await s.command(mail)).startswith("250")
        reply = await s.command(b"RCPT TO:<" + rcpt + b">\r\n")
        assert reply.startswith(expected), reply
        assert (await s.command("RSET")).startswith("250")
        queue_id = await send_ok(s)
    await s.close()
    assert [p.name for p in queued(gw)] in ([queue_id], [])  # only the good message
    await wait_until(lambda: dest.received, what="the good message delivered")
    assert [m.rcpt_tos for m in dest.received] == [["r@tls.test"]]
    assert not [e for e in logs if e["log_level"] == "error"]


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        (b"a\xff@clinic.test> SMTPUTF8", "501 5.1.7 Bad sender address syntax: not valid UTF-8"),
        (b"a\xff@clinic.test>", "501 5.1.7 Bad sender address syntax: not valid UTF-8"),
        (b"a\x00z@clinic.test>", "501 5.1.7 Bad sender address syntax: contains a control"),
        ("ä@clinic.test>".encode(), "553 5.6.7 Non-ASCII address requires"),
        (b"a@clinic.test> SIZE=\xd9\xa1\xd9\xa2", "501 5.5.4"),  # Arabic-Indic digits
        (b"a@clinic.test> BODY=8BITMIME\x01", "501 5.5.4"),
    ],
)
async def test_a_sender_that_cannot_be_represented_is_refused_at_mail(relay, sender, expected):
    gw, dest, _ = await relay()
    s = await tls_session(gw)
    reply = await s.command(b"MAIL FROM:<" + sender + b"\r\n")
    assert reply.startswith(expected), reply
    assert (await s.command("RCPT TO:<r@tls.test>")).startswith("503")  # no transaction
    await send_ok(s)
    await s.close()
    await wait_until(lambda: dest.received, what="the good message delivered")
    assert [m.mail_from for m in dest.received] == ["a@clinic.test"]


async def test_smtputf8_addresses_and_quoted_local_parts_are_delivered_exactly(relay):
    gw, dest, _ = await relay()
    s = await tls_session(gw)
    await send_ok(s, "δοκιμή@tls.test", "MAIL FROM:<dr.müller@clinic.test> SMTPUTF8")
    await send_ok(s, '"john doe"@tls.test')
    await s.close()
    await wait_until(lambda: len(dest.received) == 2, what="both delivered")
    got = sorted((m.mail_from, tuple(m.rcpt_tos)) for m in dest.received)
    assert got == [
        ("a@clinic.test", ('"john doe"@tls.test',)),
        ("dr.müller@clinic.test", ("δοκιμή@tls.test",)),
    ]


async def test_invalid_utf8_in_ehlo_is_refused_and_the_next_message_is_archived(relay):
    gw, dest, _ = await relay()
    s = await RawSmtp.open(gw)
    for helo in (b"EHLO a\xffb.test", b"HELO a\xffb.test", b"EHLO a\x00b", "EHLO ä.test".encode()):
        reply = await s.command(helo + b"\r\n")
        assert reply.startswith("501 5.5.2 Invalid HELO/EHLO name"), (helo, reply)
    assert (await s.command("MAIL FROM:<a@clinic.test>")).startswith("503")  # no HELO yet
    assert (await s.command("EHLO a.test")).startswith("250")
    await s.starttls()
    assert (await s.command("EHLO client.test")).startswith("250")
    queue_id = await send_ok(s)
    await s.close()
    await wait_until(lambda: dest.received, what="delivered")
    await wait_until(lambda: not queued(gw), what="the spool file removed once archived")
    with archive_of(gw) as archive:
        envelope, _ = archive.message(queue_id)
    assert envelope["client"]["helo"] == "client.test"


async def test_starttls_inside_tls_is_answered_503_and_the_session_stays_usable(relay):
    gw, dest, _ = await relay()
    s = await tls_session(gw)
    assert (await s.command("STARTTLS")).startswith("503 5.5.1")
    await send_ok(s)
    await s.close()
    await wait_until(lambda: dest.received, what="delivered")


async def test_failed_tls_handshakes_are_one_info_line_each_without_traceback(relay):
    gw, _, _ = await relay()
    with capture_logs() as logs:
        for garbage in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n", b""):
            s = await RawSmtp.open(gw)
            await s.command("EHLO client.test")
            assert (await s.command("STARTTLS")).startswith("220")
            s.send(garbage)
            s.writer.write_eof() if not garbage else None
            with pytest.raises(ConnectionError):
                await s.reply(timeout=5)
            await s.close()
        await wait_until(
            lambda: len([e for e in logs if e["event"] == Event.TLS_FAILED]) == 3,
            what="three handshake failures logged",
        )
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert all(e["log_level"] == "info" and "exc_info" not in e for e in logs)
    assert gw.metrics.messages_rejected.labels("tls_handshake_failed")._value.get() == 3


async def test_malformed_auth_answers_get_syntax_replies(relay, tmp_path):
    from gateway.smtp.auth import hash_password

    users = tmp_path / "users"
    users.write_text(f"m365:{hash_password('correct horse')}\n")
    gw, _, _ = await relay(**{"relay.users_file": str(users)})
    s = await tls_session(gw)
    with capture_logs() as logs:
        reply = await s.command("AUTH PLAIN dGVzdA==é".encode() + b"\r\n")
        assert reply.startswith("501 5.5.2"), reply
        assert (await s.command("AUTH LOGIN")).startswith("334")
        reply = await s.command(b"A" * 70_000 + b"\r\n")
        assert reply.startswith("500 5.5.2"), reply
        assert (await s.command("AUTH LOGIN")).startswith("334")
        assert (await s.command("*")).startswith("501")
        assert (await s.command("NOOP")).startswith("250")
    await s.close()
    assert not [e for e in logs if e["event"] == Event.SESSION_ERROR]


async def test_a_utf8_address_for_a_server_without_smtputf8_bounces_with_5_6_7(relay, world):
    gw, dest, sender = await relay()
    old = await world.mta("mx.old.test", "127.0.0.45", utf8=False)  # no SMTPUTF8
    world.dns.add("old.test", "MX", "10 mx.old.test.")
    s = await tls_session(gw)
    await send_ok(s, "δοκιμή@old.test", "MAIL FROM:<a@clinic.test> SMTPUTF8")
    await s.close()
    await wait_until(lambda: sender.received, what="the DSN")
    assert old.received == []
    assert "Status: 5.6.7" in sender.received[0].data.decode()


async def test_utf8_header_fields_for_a_server_without_smtputf8_bounce_with_5_6_7(relay, world):
    """RFC 6531 3.4: an internationalized message - here an ASCII envelope, but a From
    naming a UTF-8 address (RFC 6532) - is not sent to a server without SMTPUTF8.  A
    message that asked for SMTPUTF8 but is ASCII throughout still goes, without it."""
    gw, dest, sender = await relay()
    old = await world.mta("mx.old.test", "127.0.0.45", utf8=False)  # no SMTPUTF8
    world.dns.add("old.test", "MX", "10 mx.old.test.")
    utf8_from = make_message().replace(b"From: sender@", "From: Ärztin <ärztin@".encode())
    s = await tls_session(gw)
    await send_ok(s, "one@old.test", UTF8_MAIL, utf8_from)
    await send_ok(s, "two@old.test", UTF8_MAIL)
    await s.close()
    await wait_until(lambda: sender.received and old.received, what="the DSN and the other")
    dsn = sender.received[0].data.decode()
    assert "Status: 5.6.7" in dsn and "one@old.test" in dsn
    assert "needed for the message's header fields" in dsn
    assert [m.rcpt_tos for m in old.received] == [["two@old.test"]]
    assert "SMTPUTF8" not in old.received[0].mail_options
