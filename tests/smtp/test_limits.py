"""Limits and their reply codes: size, recipients, line length, connections, timeouts,
and mail loops."""

from __future__ import annotations

import asyncio
import logging
import time

import aiosmtplib
import pytest

from tests.conftest import RawSmtp, make_message, queued, smtp_client
from tests.support.net import reset
from tests.support.world import wait_until

PLAINTEXT = {"relay.require_tls": False}


async def test_declared_size_over_the_limit_is_refused_at_mail(gateway_factory):
    gw = await gateway_factory({"smtp.max_message_size": "10KiB"})
    async with smtp_client(gw) as client:
        assert client.esmtp_extensions["size"] == "10240"
        response = await client.execute_command(b"MAIL", b"FROM:<s@clinic.test>", b"SIZE=20000")
    assert response.code == 552
    assert response.message.startswith("5.3.4")


async def test_data_over_the_size_limit_is_refused_after_data(gateway_factory):
    gw = await gateway_factory({**PLAINTEXT, "smtp.max_message_size": "10KiB"})
    s = await RawSmtp.open(gw)
    await s.command("EHLO client.test")
    replies = []
    for body in (b"z" * 70 + b"\r\n") * 200, b"small\r\n":  # no SIZE declared
        assert (await s.command("MAIL FROM:<s@clinic.test>")).startswith("250")
        assert (await s.command("RCPT TO:<r@example.test>")).startswith("250")
        assert (await s.command("DATA")).startswith("354")
        s.send(b"Subject: big\r\n\r\n" + body + b".\r\n")
        replies.append(await s.reply())
    await s.close()
    assert replies[0].startswith("552 5.3.4")
    assert replies[1].startswith("250 2.0.0")  # the session survives the refusal
    assert len(queued(gw)) == 1
    assert gw.metrics.messages_rejected.labels("message_too_big")._value.get() == 1


async def test_data_over_the_size_limit_gets_552_5_3_4(gateway_factory):
    gw = await gateway_factory({**PLAINTEXT, "smtp.max_message_size": "10KiB"})
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 200 + b".\r\n")
    reply = await s.reply()
    assert reply.startswith("552 5.3.4"), reply
    await s.close()
    assert queued(gw) == []


async def test_recipients_past_the_limit_get_452_and_the_rest_is_accepted(gateway_factory):
    gw = await gateway_factory({"smtp.max_recipients": 3})
    async with smtp_client(gw) as client:
        await client.mail("s@clinic.test")
        for i in range(3):
            await client.rcpt(f"r{i}@example.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e:
            await client.rcpt("r3@example.test")
        assert e.value.code == 452
        assert e.value.message.startswith("4.5.3")
        await client.data(make_message())
    (path,) = queued(gw)
    env = gw.spool.read(path.name)[0]
    assert [r.address for r in env.recipients] == [
        "r0@example.test",
        "r1@example.test",
        "r2@example.test",
    ]


async def test_a_line_longer_than_the_limit_rejects_the_message(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\nmore\r\n.\r\n")
    reply = await s.reply()
    assert reply.startswith("500 5.5.2"), reply
    await s.close()
    assert queued(gw) == []


async def test_a_longer_line_limit_accepts_long_lines(gateway_factory):
    gw = await gateway_factory({**PLAINTEXT, "smtp.max_line_length": 20000})
    async with smtp_client(gw, tls=False) as client:
        errors, _ = await client.sendmail(
            "s@clinic.test", ["r@example.test"], make_message(body="x" * 12000 + "\r\n")
        )
    assert errors == {}


async def test_connections_over_the_per_ip_limit_get_421(gateway_factory):
    gw = await gateway_factory({"smtp.max_connections_per_ip": 2})
    first = await RawSmtp.open(gw)
    second = await RawSmtp.open(gw)
    with pytest.raises(AssertionError, match="421 4.7.0"):
        await RawSmtp.open(gw)
    other_ip = await RawSmtp.open(gw, source="127.0.0.2")  # another client is unaffected
    await first.close()
    await wait_until(lambda: gw.smtp.ctx.connections["127.0.0.1"] < 2, what="a slot freed")
    again = await RawSmtp.open(gw)  # a slot was freed
    for s in (second, other_ip, again):
        await s.close()
    assert gw.metrics.connections.labels("refused")._value.get() == 1


async def test_connections_over_the_total_limit_get_421(gateway_factory):
    gw = await gateway_factory({"smtp.max_connections": 1})
    first = await RawSmtp.open(gw)
    with pytest.raises(AssertionError, match="421 4.7.0"):
        await RawSmtp.open(gw, source="127.0.0.2")
    await first.close()


async def test_an_idle_client_gets_421_after_the_command_timeout(gateway_factory):
    gw = await gateway_factory({"smtp.command_timeout": "300ms"})
    s = await RawSmtp.open(gw)
    reply = await s.reply(timeout=5)
    assert reply.startswith("421 4.4.2")
    await s.close()


async def test_the_command_timeout_counts_from_the_last_command_not_the_first(gateway_factory):
    # the idle timer moves lazily (re-armed when it fires early): commands for
    # three timeouts keep the session; then idle, it ends a timeout after the last
    gw = await gateway_factory({"smtp.command_timeout": "400ms"})
    s = await RawSmtp.open(gw)  # greeted
    for _ in range(8):
        await asyncio.sleep(0.15)
        assert (await s.command("NOOP")).startswith("250")
    last = time.monotonic()
    assert (await s.reply(timeout=5)).startswith("421 4.4.2")
    assert time.monotonic() - last >= 0.35
    await s.close()


async def test_a_stalled_data_phase_times_out_and_keeps_nothing(gateway_factory):
    gw = await gateway_factory({**PLAINTEXT, "smtp.data_timeout": "300ms"})
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: half\r\n\r\nhalf a mess")
    assert (await s.reply(timeout=5)).startswith("421 4.4.2")
    await s.close()
    await wait_until(lambda: not list(gw.spool.tmp_dir.iterdir()), what="the half message gone")
    assert queued(gw) == []


async def test_more_than_50_received_headers_is_a_loop(gateway_factory):
    gw = await gateway_factory()
    hops = "".join(
        f"Received: from hop{i} by hop{i + 1}; Sun, 22 Nov 2026 07:00:00 +0000\r\n"
        for i in range(51)
    )
    async with smtp_client(gw) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as e:
            await client.sendmail(
                "s@clinic.test", ["r@example.test"], hops.encode() + make_message()
            )
        assert e.value.code == 554
        assert e.value.message.startswith("5.4.6")
        errors, _ = await client.sendmail(
            "s@clinic.test", ["r@example.test"], hops.encode().split(b"\r\n", 1)[1] + make_message()
        )
        assert errors == {}  # exactly 50 is still fine
    assert len(queued(gw)) == 1
    assert gw.metrics.messages_rejected.labels("mail_loop")._value.get() == 1


async def test_accepted_message_carries_our_received_and_marker_headers(gateway_factory):
    gw = await gateway_factory({"smtp.marker_header": "X-Clinic-Gateway"})
    async with smtp_client(gw) as client:
        await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    (path,) = queued(gw)
    env, data = gw.spool.read(path.name)
    assert data == make_message()  # the received bytes stay untouched
    trace = env.trace_headers
    assert trace.startswith(
        "Received: from client.test (unknown [127.0.0.1])\r\n\tby gw.sealgate.test"
    )
    assert f"with ESMTPS id {env.queue_id};" in trace
    assert f"(using {env.client.tls_version} with cipher {env.client.tls_cipher})" in trace
    assert "X-Clinic-Gateway: gw.sealgate.test\r\n" in trace
    assert "r@example.test" not in trace  # no "for <rcpt>": Bcc recipients stay hidden


async def test_a_reset_mid_data_is_not_timed_out_later(gateway_factory, caplog):
    # the DATA handler's cleanup runs after connection_lost: it once armed the idle
    # timer again, which fired on the dead session - a timeout counted and logged
    # that no client saw, and an AssertionError in the loop's callback
    gw = await gateway_factory({**PLAINTEXT, "smtp.command_timeout": "300ms"})
    s = await RawSmtp.start_data(gw)
    s.send(b"Subject: half\r\n\r\nhalf a mess")
    await asyncio.sleep(0.1)
    reset(s.writer)
    await wait_until(lambda: not gw.smtp.ctx.sessions, what="the session gone")
    await asyncio.sleep(0.8)  # past the command timeout
    assert gw.metrics.messages_rejected.labels("timeout")._value.get() == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert queued(gw) == []
