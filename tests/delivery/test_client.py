"""Delivery enforces the TLS level on each connection, per MX, and records evidence."""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
import time

import pytest
import trustme

from gateway.delivery.client import deliver, tls_context, wire_form
from gateway.delivery.router import NextHop, Routed
from gateway.delivery.sessions import ReuseLimits, SessionCache
from gateway.delivery.tls_policy import TlsLevel
from gateway.tls import client_context


async def test_verify_delivers_and_records_tls_evidence(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21")
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY)
    assert (result.outcome, result.status) == ("delivered", "2.0.0")
    ev = result.evidence
    assert (ev.mx_host, ev.ip, ev.port, ev.level) == (
        "mx1.dest.test",
        "127.0.0.21",
        world.port,
        "verify",
    )
    assert ev.tls_version in ("TLSv1.2", "TLSv1.3") and ev.tls_cipher
    assert ev.verification == "pkix"
    assert ev.peer_cert_sha256 == hashlib.sha256(mx.cert_der).hexdigest()
    assert result.diagnostic.startswith("250 2.0.0")
    (got,) = mx.received
    assert got.tls_version == ev.tls_version and got.data.endswith(b"body\r\n")


@pytest.mark.parametrize("level", [TlsLevel.ENCRYPT, TlsLevel.VERIFY])
async def test_no_starttls_where_tls_is_required_defers_and_sends_nothing(world, level):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", cert=None)
    (result,) = await world.send(["mx1.dest.test"], level)
    assert (result.outcome, result.status) == ("deferred", "4.7.4")
    assert "TLS is required, but was not offered by host mx1.dest.test" in result.diagnostic
    assert mx.received == []


async def test_may_sends_in_plaintext_when_starttls_is_not_offered(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", cert=None)
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.MAY)
    assert result.outcome == "delivered" and result.evidence.tls_version is None
    assert mx.received[0].tls_version is None


@pytest.mark.parametrize("bad", ["wrong-name", "expired", "self-signed"])
async def test_a_bad_certificate_at_verify_defers_that_mx_and_the_next_is_tried(world, bad):
    first = await world.mta("mx1.dest.test", "127.0.0.21", cert=bad)
    second = await world.mta("mx2.dest.test", "127.0.0.22")
    (result,) = await world.send(["mx1.dest.test", "mx2.dest.test"], TlsLevel.VERIFY)
    assert result.outcome == "delivered" and result.evidence.mx_host == "mx2.dest.test"
    assert first.received == [] and len(second.received) == 1


@pytest.mark.parametrize("bad", ["wrong-name", "expired", "self-signed"])
async def test_a_bad_certificate_on_the_only_mx_at_verify_is_4_7_5(world, bad):
    mx = await world.mta("mx1.dest.test", "127.0.0.21", cert=bad)
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY)
    assert (result.outcome, result.status) == ("deferred", "4.7.5")
    assert "Server certificate not verified for mx1.dest.test" in result.diagnostic
    assert mx.received == []


async def test_encrypt_accepts_a_certificate_it_does_not_check(world):
    await world.mta("mx1.dest.test", "127.0.0.21", cert="self-signed")
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.ENCRYPT)
    assert result.outcome == "delivered"
    assert result.evidence.tls_version and result.evidence.verification == "none"


async def test_a_down_first_mx_falls_through_to_the_second(world):
    world.dns.add("down.dest.test", "A", "127.0.0.23")  # nothing listens there
    second = await world.mta("mx2.dest.test", "127.0.0.22")
    (result,) = await world.send(["down.dest.test", "mx2.dest.test"], TlsLevel.VERIFY)
    assert result.outcome == "delivered" and len(second.received) == 1


async def test_every_host_down_defers_with_the_reason(world):
    world.dns.add("down.dest.test", "A", "127.0.0.23")
    (result,) = await world.send(["down.dest.test"], TlsLevel.VERIFY)
    assert (result.outcome, result.status) == ("deferred", "4.4.1")
    assert "connect to down.dest.test[127.0.0.23]" in result.diagnostic


async def test_each_recipient_gets_the_servers_own_answer(world):
    mx = await world.mta(
        "mx1.dest.test",
        "127.0.0.21",
        rcpt_replies={
            "gone@dest.test": "550 5.1.1 No such user",
            "full@dest.test": "452 4.2.2 Mailbox full",
        },
    )
    results = await world.send(
        ["mx1.dest.test"],
        TlsLevel.VERIFY,
        rcpts=("ok@dest.test", "gone@dest.test", "full@dest.test"),
    )
    by = {r.address: (r.outcome, r.status) for r in results}
    assert by == {
        "ok@dest.test": ("delivered", "2.0.0"),
        "gone@dest.test": ("bounced", "5.1.1"),
        "full@dest.test": ("deferred", "4.2.2"),
    }
    assert mx.received[0].rcpt_tos == ["ok@dest.test"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_rcpt_and_data_go_in_one_write_to_a_server_that_offers_pipelining(
    world, pipelining
):
    """RFC 2920: one round trip for the commands up to DATA; every recipient still
    gets its own answer, in order, with or without it."""
    mx = await world.mta(
        "mx1.dest.test",
        "127.0.0.21",
        pipelining=pipelining,
        rcpt_replies={"gone@dest.test": "550 5.1.1 No such user"},
    )
    results = await world.send(
        ["mx1.dest.test"], TlsLevel.VERIFY, rcpts=("a@dest.test", "gone@dest.test", "b@dest.test")
    )
    assert [(r.address, r.outcome, r.status) for r in results] == [
        ("a@dest.test", "delivered", "2.0.0"),
        ("gone@dest.test", "bounced", "5.1.1"),
        ("b@dest.test", "delivered", "2.0.0"),
    ]
    assert mx.received[0].rcpt_tos == ["a@dest.test", "b@dest.test"]
    (first, *rest) = mx.groups
    if pipelining:
        assert first.startswith(b"MAIL FROM:<s@clinic.test>") and first.endswith(
            b"RCPT TO:<a@dest.test>\r\nRCPT TO:<gone@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
        )
    else:
        assert first.startswith(b"MAIL FROM:<s@clinic.test>") and b"RCPT" not in first


@pytest.mark.parametrize("pipelining", [True, False])
async def test_every_recipient_refused_sends_no_message_and_keeps_the_session(world, pipelining):
    mx = await world.mta(
        "mx1.dest.test",
        "127.0.0.21",
        pipelining=pipelining,
        rcpt_replies={"x@dest.test": "550 5.1.1 No such user", "y@dest.test": "451 4.3.0 Later"},
    )
    cache = SessionCache(ReuseLimits(), per_key=4)
    results = await world.send(
        ["mx1.dest.test"], TlsLevel.VERIFY, rcpts=("x@dest.test", "y@dest.test"), sessions=cache
    )
    assert [(r.outcome, r.status) for r in results] == [("bounced", "5.1.1"), ("deferred", "4.3.0")]
    assert mx.received == [] and mx.attempts == 0  # DATA was refused: no recipient
    (ok,) = await world.send(
        ["mx1.dest.test"], TlsLevel.VERIFY, rcpts=("z@dest.test",), sessions=cache
    )
    assert (ok.outcome, ok.evidence.reused) == ("delivered", 1)  # the same session, reset
    assert mx.connections == 1
    await cache.close()


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 Try later", "deferred"), ("554 5.6.0 Content rejected", "bounced")],
)
async def test_the_data_reply_decides_for_every_accepted_recipient(world, reply, outcome):
    await world.mta("mx1.dest.test", "127.0.0.21", data_reply=reply)
    results = await world.send(
        ["mx1.dest.test"], TlsLevel.VERIFY, rcpts=("a@dest.test", "b@dest.test")
    )
    assert {(r.outcome, r.status) for r in results} == {(outcome, reply.split()[1])}


@pytest.mark.parametrize(
    ("pipelining", "slow"),
    [(True, "rcpt_delay"), (False, "rcpt_delay"), (True, "data_delay"), (False, "data_delay")],
)
async def test_a_server_that_stops_answering_defers_the_message_after_the_timeout(
    world, pipelining, slow
):
    """Whether the reply that never comes is one of a pipelined group (read by our
    own reader), a command's or the message's (read by aiosmtplib's): deferred
    after ``command_timeout``, saying so, the same way."""
    mx = await world.mta("mx1.dest.test", "127.0.0.21", pipelining=pipelining, **{slow: 30})
    settings = dataclasses.replace(world.settings, command_timeout=0.5)
    routed = Routed((NextHop("mx1.dest.test", world.port, 0),))
    started = time.monotonic()
    (result,) = await deliver(
        routed,
        TlsLevel.VERIFY,
        "s@clinic.test",
        ["r@dest.test"],
        b"Subject: x\r\n\r\nbody\r\n",
        settings,
        world.resolver,
    )
    assert time.monotonic() - started < 10
    assert (result.outcome, result.status) == ("deferred", "4.4.2")
    assert result.diagnostic.endswith("failed: Timed out waiting for server response")
    assert mx.received == []


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),  # a line holding only a dot is not the end
        (b"..x\r\nend", b"...x\r\nend\r\n.\r\n"),
        (b"a\nb\r.c", b"a\r\nb\r\n..c\r\n.\r\n"),  # foreign data: line endings made CRLF
        (b"", b"\r\n.\r\n"),
    ],
)
def test_the_wire_form_dot_stuffs_and_ends_with_the_end_marker(data, wire):
    assert b"".join(wire_form(data)) == wire


def test_a_message_that_needs_no_change_is_sent_as_it_is_not_copied():
    data = b"Subject: x\r\n\r\n" + b"line\r\n" * 100_000
    head = b"Received: from a by b; Thu, 3 Dec 2026 18:00:00 +0000\r\n"
    pieces = wire_form(data, head)
    assert pieces[1] is data and pieces == (head, data, b".\r\n")


def test_a_message_marked_as_its_own_wire_form_is_sent_unread():
    data = b"Subject: x\r\n\r\n" + b"line\r\n" * 1000
    head = b"Received: from a by b\r\n"
    assert wire_form(data, head, data_is_wire=True) == (head, data, b".\r\n")
    # its last line not ended after all: looked at, and ended
    assert wire_form(b"a\r\n.b", head, data_is_wire=True) == (head, b"a\r\n..b", b"\r\n.\r\n")
    # a head without its CRLF is joined to it: the two are looked at
    assert b"".join(wire_form(b"\r\n.x\r\n", b"R: x", data_is_wire=True)) == (
        b"R: x\r\n..x\r\n.\r\n"
    )


@pytest.mark.parametrize(
    ("head", "data", "wire"),
    [
        (b"R: x\r\n", b".hidden\r\nb\r\n", b"R: x\r\n..hidden\r\nb\r\n.\r\n"),
        (b"R: x\r\n", b"", b"R: x\r\n.\r\n"),  # the head ended its line already
        (b"R: x\r\n", b"body", b"R: x\r\nbody\r\n.\r\n"),
        (b"R: x", b"\r\n.b", b"R: x\r\n..b\r\n.\r\n"),  # a head without its CRLF
    ],
)
def test_a_head_goes_before_the_message_as_if_joined_to_it(head, data, wire):
    assert b"".join(wire_form(data, head)) == wire == b"".join(wire_form(head + data))


async def test_lines_starting_with_a_dot_arrive_intact(world):
    mx = await world.mta("mx1.dest.test", "127.0.0.21")
    data = b"Subject: t\r\n\r\n.\r\n..two\r\n.\r\n.end\r\n"
    (result,) = await world.send(["mx1.dest.test"], TlsLevel.VERIFY, data=data)
    assert result.outcome == "delivered"
    assert mx.received[0].data == data


def test_the_client_tls_context_is_made_once_and_again_when_the_ca_file_changes(tmp_path, pki):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pki.ca_file.read_bytes())
    first = tls_context(TlsLevel.VERIFY, ca_file)
    assert tls_context(TlsLevel.VERIFY, ca_file) is first  # no system CAs loaded again
    assert client_context(ca_file) is first  # the HTTPS fetches (MTA-STS, WKD) share it
    assert first.minimum_version == ssl.TLSVersion.TLSv1_2
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert tls_context(TlsLevel.MAY, None).verify_mode == ssl.CERT_NONE
    other = trustme.CA()
    ca_file.write_bytes(pki.ca_file.read_bytes() + other.cert_pem.bytes())  # replaced
    again = tls_context(TlsLevel.VERIFY, ca_file)
    assert again is not first
    assert len(again.get_ca_certs()) == len(first.get_ca_certs()) + 1
