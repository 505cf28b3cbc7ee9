"""The DSN extension inbound (RFC 3461): advertised after EHLO; RET and ENVID on
MAIL, NOTIFY and ORCPT on RCPT accepted and kept with the spooled envelope as the
client wrote them (ENVID and ORCPT are case-sensitive); a malformed one refused with
501 5.5.4 and the transaction goes on."""

from __future__ import annotations

from tests.conftest import RawSmtp, queued, smtp_client

PLAINTEXT = {"relay.require_tls": False}


async def test_dsn_is_advertised_and_its_parameters_kept_as_written(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    async with smtp_client(gw) as client:
        assert "dsn" in client.esmtp_extensions
    s = await RawSmtp.open(gw)
    await s.command("EHLO client.test")
    assert (await s.command("MAIL FROM:<s@clinic.test> RET=HDRS ENVID=Case+2BSensitive-1 SIZE=60"))[
        :3
    ] == "250"
    assert (
        await s.command(
            "RCPT TO:<a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bx@Example.test"
        )
    )[:3] == "250"
    assert (await s.command("RCPT TO:<b@example.test> notify=never"))[:3] == "250"
    assert (await s.command("RCPT TO:<c@example.test>"))[:3] == "250"
    assert (await s.command("DATA")).startswith("354")
    s.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert (await s.reply()).startswith("250")
    await s.close()
    (path,) = queued(gw)
    envelope = gw.spool.read(path.name)[0]
    assert "RET=HDRS" in envelope.mail_options
    assert "ENVID=Case+2BSensitive-1" in envelope.mail_options
    options = [r.options for r in envelope.recipients]
    assert options[0] == ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A+2Bx@Example.test")
    assert options[1] == ("NOTIFY=never",)
    assert options[2] == ()


async def test_malformed_dsn_parameters_are_refused_and_the_session_goes_on(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.open(gw)
    await s.command("EHLO client.test")
    for bad, why in (
        ("MAIL FROM:<s@clinic.test> RET=BODY", "RET is FULL or HDRS"),
        ("MAIL FROM:<s@clinic.test> ENVID=a=b", "ENVID is xtext"),
        ("MAIL FROM:<s@clinic.test> RET=FULL RET=HDRS", "RET given twice"),
    ):
        reply = await s.command(bad)
        assert reply.startswith("501 5.5.4 Invalid parameter") and why in reply, reply
    assert (await s.command("MAIL FROM:<s@clinic.test> RET=FULL"))[:3] == "250"
    for bad, why in (
        ("RCPT TO:<a@example.test> NOTIFY=NEVER,SUCCESS", "NOTIFY is NEVER, or"),
        ("RCPT TO:<a@example.test> NOTIFY=SOMETIMES", "NOTIFY is NEVER, or"),
        ("RCPT TO:<a@example.test> ORCPT=a@example.test", "ORCPT is address-type;xtext"),
        ("RCPT TO:<a@example.test> NOTIFY", "NOTIFY needs a value"),
    ):
        reply = await s.command(bad)
        assert reply.startswith("501 5.5.4 Invalid parameter") and why in reply, reply
    assert (await s.command("RCPT TO:<a@example.test> NOTIFY=DELAY"))[:3] == "250"
    await s.command("QUIT")
    await s.close()


async def test_dsn_parameters_after_helo_are_a_syntax_error(gateway_factory):
    gw = await gateway_factory(PLAINTEXT)
    s = await RawSmtp.open(gw)
    await s.command("HELO client.test")
    assert (await s.command("MAIL FROM:<s@clinic.test> RET=HDRS")).startswith("501")
    await s.close()
