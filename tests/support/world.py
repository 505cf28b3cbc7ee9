"""Delivery test world: DNS on loopback and recipient MTAs on 127.0.0.x."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ssl
import time

import pytest
import trustme

from gateway.config import parse_nameserver
from gateway.delivery.client import ClientSettings, deliver
from gateway.delivery.router import NextHop, Routed
from gateway.delivery.tls_policy import TlsLevel
from gateway.probe.dns import Resolver
from tests.conftest import free_port, leaf_files
from tests.support.dns import DnsFixture
from tests.support.mta import RecipientMta

MESSAGE = b"From: s@clinic.test\r\nTo: r@dest.test\r\nSubject: t\r\n\r\nbody\r\n"


def tls_only(level: str, fallback: str = "hold", rules: str = "") -> str:
    """A policy that sends over TLS at ``level`` or not at all (the transport tests'
    policy: no portal, no keys)."""
    return f"version: 1\ndefaults: {{modes: [tls], tls_level: {level}, fallback: {fallback}}}\n" + (
        f"rules:\n{rules}" if rules else ""
    )


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Until ``predicate()`` is true (a coroutine function's answer is awaited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = predicate()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s")


@pytest.fixture
async def world(tmp_path, pki):
    """DNS on loopback and a factory of recipient MTAs on 127.0.0.x, one port."""
    dns = await DnsFixture().start()
    # One port number for every recipient MTA, on its own address, as port 25 is in
    # the world: the gateway's delivery.port must be known before any MTA starts, so
    # it is chosen (below the ephemeral range, where no outgoing connection takes it)
    # rather than read back from a bind to port 0.
    port = free_port()
    mtas: list[RecipientMta] = []

    leaves: dict[str, trustme.LeafCert] = {}

    def cert_files(name: str, leaf: trustme.LeafCert) -> tuple:
        chain, key = leaf_files(leaf, tmp_path, name)
        leaves[name] = leaf
        return chain, key

    async def mta(name: str, ip: str, cert: str | None = "good", **kwargs) -> RecipientMta:
        dns.add(name, "A", ip)
        pair = None
        if cert == "good":
            pair = cert_files(name, pki.ca.issue_cert(name))
        elif cert == "wrong-name":
            pair = cert_files(name, pki.ca.issue_cert("somebody-else.test"))
        elif cert == "expired":
            past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
            pair = cert_files(
                name,
                pki.ca.issue_cert(
                    name, not_before=past, not_after=past + datetime.timedelta(days=30)
                ),
            )
        elif cert == "self-signed":
            pair = cert_files(name, trustme.CA().issue_cert(name))
        server = await RecipientMta(ip, port, pair, **kwargs).start()
        if name in leaves:
            server.cert_der = ssl.PEM_cert_to_DER_cert(
                leaves[name].cert_chain_pems[0].bytes().decode()
            )
        mtas.append(server)
        return server

    settings = ClientSettings(
        helo_name="gw.sealgate.test", ca_file=pki.ca_file, connect_timeout=5, command_timeout=10
    )
    resolver = Resolver((parse_nameserver(dns.nameserver),), timeout=2)

    class World:
        pass

    w = World()
    w.dns, w.port, w.mta, w.settings, w.resolver = dns, port, mta, settings, resolver

    def config(overrides: dict | None = None, policy: str | None = None) -> dict:
        """Gateway settings for this world: its DNS, its MTAs' port, the test CA, and
        ``policy`` (a policy document) when given."""
        settings = {
            "dns.nameservers": [dns.nameserver],
            "delivery.smart_host": None,
            "delivery.port": port,
            "tls.ca_file": str(pki.ca_file),
            **(overrides or {}),
        }
        if policy is not None:
            path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*.yaml')))}.yaml"
            path.write_text(policy)
            settings["policy.file"] = str(path)
        return settings

    w.config = config

    async def send(
        hosts: list[str],
        level: TlsLevel,
        rcpts=("r@dest.test",),
        sessions=None,
        metrics=None,
        data: bytes = MESSAGE,
    ):
        routed = Routed(tuple(NextHop(h, port, i) for i, h in enumerate(hosts)))
        return await deliver(
            routed,
            level,
            "s@clinic.test",
            list(rcpts),
            data,
            settings,
            resolver,
            sessions=sessions,
            metrics=metrics,
        )

    w.send = send
    yield w
    for server in mtas:
        await server.stop()
    await dns.stop()
