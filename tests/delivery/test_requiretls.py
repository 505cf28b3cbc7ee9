"""REQUIRETLS (RFC 8689) end to end: offered to clients only after STARTTLS; a
message sent with it goes only to a server with a verified certificate whose MX
name is authenticated (DNSSEC, MTA-STS, or this gateway's own route) and which
offers REQUIRETLS itself - passed on in its MAIL FROM - else it fails with 5.7.30 /
5.7.10 and a report without content.  "TLS-Required: No" lowers the TLS level only
where the policy allows it (allow_tls_required_no)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RawSmtp, make_message, smtp_client
from tests.support.delivery import BODY, SUBJECT, start, state
from tests.support.world import wait_until


async def send_requiretls(gw, rcpts, data=None):
    async with smtp_client(gw) as client:
        assert "requiretls" in client.esmtp_extensions  # after STARTTLS
        await client.mail("doctor@clinic.test", options=["REQUIRETLS"])
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        await client.data(data or make_message(SUBJECT, BODY))
    (path,) = list(gw.spool.queue_dir.iterdir())
    return path.name


async def test_requiretls_goes_only_where_it_is_offered_verified_and_authenticated(
    gateway_factory, world, pki
):
    good = await world.mta("mx.req.test", "127.0.0.41", requiretls=True)
    plain_tls = await world.mta("mx.noreq.test", "127.0.0.42")  # verified, no REQUIRETLS
    unsigned = await world.mta("mx.unsigned.test", "127.0.0.43", requiretls=True)
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    for domain in ("req.test", "noreq.test", "unsigned.test", "clinic.test"):
        world.dns.add(domain, "MX", f"10 mx.{domain}.")
    for domain in ("req.test", "noreq.test"):
        world.dns.secure(domain)
    gw = await start(gateway_factory, world, pki, **{"dns.dnssec": "trust-ad"})
    queue_id = await send_requiretls(gw, ["a@req.test", "b@noreq.test", "c@unsigned.test"])
    await wait_until(lambda: sender_sink.received, what="the report of the failed ones")
    (received,) = good.received
    assert received.requiretls and received.rcpt_tos == ["a@req.test"]
    assert plain_tls.received == [] and unsigned.received == []  # (probed, not sent to)
    states = state(gw, queue_id)
    assert states["a@req.test"] == ("delivered", "2.0.0")
    assert states["b@noreq.test"] == ("bounced", "5.7.30")
    assert states["c@unsigned.test"] == ("bounced", "5.7.30")
    text = sender_sink.received[0].data.decode()
    assert "REQUIRETLS, but it is not offered by host mx.noreq.test[127.0.0.42]" in text
    assert "authenticated by neither DNSSEC nor MTA-STS" in text
    assert SUBJECT not in text and "margins" not in text
    evidence = gw.queue.store.attempts(queue_id)
    delivered = [a for a in evidence if a["outcome"] == "delivered"][0]["evidence"]
    assert delivered["requiretls"] is True and delivered["verification"] == "pkix"


async def test_requiretls_is_not_offered_or_taken_before_starttls(gateway_factory):
    gw = await gateway_factory({"relay.require_tls": False})
    s = await RawSmtp.open(gw)
    ehlo = await s.command("EHLO client.test")
    assert "REQUIRETLS" not in ehlo
    reply = await s.command("MAIL FROM:<s@clinic.test> REQUIRETLS")
    assert reply.startswith("530 5.7.10 REQUIRETLS needs a TLS session"), reply
    assert (await s.command("MAIL FROM:<s@clinic.test>")).startswith("250")
    await s.close()


RELAXED = """version: 1
allow_tls_required_no: {allow}
defaults: {{modes: [tls, portal], tls_level: verify, fallback: portal}}
"""


async def test_tls_required_no_lowers_the_level_only_where_the_policy_allows(
    gateway_factory, world, pki, tmp_path
):
    self_signed = await world.mta("mx.dest.test", "127.0.0.44", cert="self-signed")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    message = b"TLS-Required: No\r\n" + make_message(SUBJECT, BODY)
    seen = {}
    for allow in ("false", "true"):
        policy = Path(tmp_path / f"policy-{allow}.yaml")
        policy.write_text(RELAXED.format(allow=allow))
        gw = await start(  # both stay up for the checks: a state directory each
            gateway_factory,
            world,
            pki,
            **{"policy.file": str(policy), "state_dir": str(tmp_path / f"state-{allow}")},
        )
        async with smtp_client(gw) as client:
            await client.sendmail("doctor@clinic.test", ["r@dest.test"], message)
        (path,) = list(gw.spool.queue_dir.iterdir())
        await wait_until(
            lambda gw=gw, q=path.name: (
                state(gw, q).get("r@dest.test", ("pending",))[0] != "pending"
            ),
            what="the first attempt",
        )
        seen[allow] = (gw, path.name)
    gw, queue_id = seen["false"]
    assert gw.queue.store.decisions(queue_id)[0]["mode"] == "portal"  # header ignored
    gw, queue_id = seen["true"]
    assert state(gw, queue_id)["r@dest.test"] == ("delivered", "2.0.0")
    (attempt,) = gw.queue.store.attempts(queue_id)
    assert attempt["evidence"]["tls_required_no"] is True
    assert attempt["evidence"]["verification"] == "none"
    notification, message_itself = self_signed.received  # the portal's, then the message
    assert b"margins" not in notification.data
    assert b"margins" in message_itself.data and message_itself.tls_version
