"""A message relayed as received: what the next server gets after DATA is what the
client sent, whichever way the delivery made its wire form - sent unread when the
SMTP listener saw no line begin with a dot, its dots stuffed again when one did."""

from __future__ import annotations

import pytest

from tests.conftest import smtp_client
from tests.support.delivery import start
from tests.support.world import wait_until

PLAIN = b"Subject: plain\r\n\r\nno line here begins with a dot.\r\n" + b"x" * 70 + b"\r\n" * 3
DOTTED = b"Subject: dots\r\n\r\n.\r\n.x\r\n..y\r\nend.\r\n"


@pytest.mark.parametrize("original", [PLAIN, DOTTED], ids=["plain", "dotted"])
async def test_a_message_arrives_as_the_client_sent_it(gateway_factory, world, pki, original):
    good = await world.mta("mx.good.test", "127.0.0.72")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    gw = await start(gateway_factory, world, pki)
    async with smtp_client(gw) as client:  # aiosmtplib stuffs the dots on the wire
        await client.sendmail("doctor@clinic.test", ["a@good.test"], original)
    await wait_until(lambda: good.received, what="delivered")
    (received,) = good.received
    head, _, rest = received.data.partition(b"Subject: ")
    assert b"Subject: " + rest == original  # after our trace fields, byte for byte
    assert head.startswith(b"Received: ")
