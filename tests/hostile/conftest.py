"""Fixtures of the hostile tests: the delivery world (DNS, recipient MTAs) and a
gateway that relays for 127.0.0.1 and delivers to it."""

from __future__ import annotations

import pytest

from tests.support.world import tls_only


@pytest.fixture
async def relay(gateway_factory, world, pki):  # noqa: F811 - the imported fixture
    """``await relay(**overrides)``: a gateway relaying for 127.0.0.1, delivering over
    TLS (level ``may``) to recipient MTAs of ``world``; recipients at ``tls.test`` go
    to ``mx.tls.test`` (127.0.0.41), DSNs for ``clinic.test`` to ``mx.clinic.test``
    (127.0.0.42).  Returns (gateway, recipient MTA, sender's MTA)."""

    async def start(**overrides):
        dest = await world.mta("mx.tls.test", "127.0.0.41")
        sender = await world.mta("mx.clinic.test", "127.0.0.42")
        world.dns.add("tls.test", "MX", "10 mx.tls.test.")
        world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
        settings = {"relay.networks": ["127.0.0.1/32"], "delivery.retry_schedule": ["1s"]}
        gw = await gateway_factory(world.config({**settings, **overrides}, tls_only("may")))
        return gw, dest, sender

    return start
