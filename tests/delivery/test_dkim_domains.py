"""DKIM per sender domain (``dkim.keys``): each copy the gateway signs carries the
signature of its own From domain, which dkimpy verifies against the key published on
the test DNS server; a From domain with no key goes unsigned, counted and logged, or
signed with ``dkim.domain``'s key when set (not aligned); the policy sees which
(fact ``dkim_key``)."""

from __future__ import annotations

import asyncio

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from gateway.crypto.dkim import DkimKey
from tests.conftest import make_message, queued, smtp_client
from tests.support.delivery import start
from tests.support.dkim_keys import publish_txt
from tests.support.smime_pki import rsa_key
from tests.support.world import wait_until


def sample(gw, name: str, **labels) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def write_key(tmp_path, world, domain: str, selector: str) -> str:
    key = DkimKey(domain, selector, rsa_key(2048, hash(domain) % 1000))
    path = tmp_path / f"{domain}.pem"
    path.write_bytes(
        key.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    publish_txt(world.dns, f"{selector}._domainkey.{domain}", key.public_record())
    return str(path)


async def dkimpy_verifies(world, message: bytes) -> list[bytes]:
    """The d= of every signature dkimpy verifies, keys read from the test DNS server
    (served on this event loop: dkimpy's blocking lookups run in a thread)."""
    return await asyncio.to_thread(_dkimpy_verifies, world, message)


def _dkimpy_verifies(world, message: bytes) -> list[bytes]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [world.dns.host]
    resolver.port = world.dns.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(answer[0].strings)

    verifier = dkim.DKIM(message)
    signatures = [
        line for line in message.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(b"DKIM-")
    ]
    return [
        verifier.domain for i in range(len(signatures)) if verifier.verify(idx=i, dnsfunc=dnsfunc)
    ]


@pytest.fixture
async def two_domains(gateway_factory, world, pki, tmp_path):
    mx = await world.mta("mx.good.test", "127.0.0.72")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    keys = {
        "clinic.test": {
            "selector": "sg1",
            "key_file": write_key(tmp_path, world, "clinic.test", "sg1"),
        },
        "labs.test": {
            "selector": "sg2",
            "key_file": write_key(tmp_path, world, "labs.test", "sg2"),
        },
    }
    return mx, keys


async def send_from(gw, author: str, rcpt: str) -> None:
    message = make_message().replace(b"sender@clinic.test", author.encode())
    async with smtp_client(gw) as client:
        await client.sendmail(author, [rcpt], message)


async def test_each_copy_is_signed_by_its_from_domain(gateway_factory, world, pki, two_domains):
    mx, keys = two_domains
    gw = await start(gateway_factory, world, pki, **{"dkim.keys": keys, "dkim.sign": "all"})
    await send_from(gw, "doctor@clinic.test", "a@good.test")
    await send_from(gw, "results@lab1.labs.test", "b@good.test")  # a parent's key aligns
    await wait_until(lambda: len(mx.received) == 2, what="both copies")
    by_rcpt = {m.rcpt_tos[0]: m.data for m in mx.received}
    assert await dkimpy_verifies(world, by_rcpt["a@good.test"]) == [b"clinic.test"]
    assert b"s=sg1;" in by_rcpt["a@good.test"]
    assert await dkimpy_verifies(world, by_rcpt["b@good.test"]) == [b"labs.test"]
    assert b"s=sg2;" in by_rcpt["b@good.test"]
    assert sample(gw, "sealgate_dkim_copies_total", result="aligned") == 2


async def test_a_from_domain_without_a_key_goes_unsigned_counted_and_logged(
    gateway_factory, world, pki, two_domains
):
    mx, keys = two_domains
    gw = await start(gateway_factory, world, pki, **{"dkim.keys": keys, "dkim.sign": "all"})
    with capture_logs() as logs:
        await send_from(gw, "someone@other.test", "a@good.test")
        await wait_until(lambda: mx.received, what="the copy")
    assert b"DKIM-Signature" not in mx.received[0].data
    assert sample(gw, "sealgate_dkim_copies_total", result="no_key") == 1
    (line,) = [e for e in logs if e["event"] == "delivery.dkim-not-signed"]
    assert line["domain"] == "other.test" and "no key" in line["reason"]


async def test_the_single_key_signs_other_domains_unaligned(
    gateway_factory, world, pki, two_domains, tmp_path
):
    mx, keys = two_domains
    fallback = write_key(tmp_path, world, "relay.clinic.test", "fb")
    gw = await start(
        gateway_factory,
        world,
        pki,
        **{
            "dkim.keys": keys,
            "dkim.sign": "all",
            "dkim.domain": "relay.clinic.test",
            "dkim.selector": "fb",
            "dkim.key_file": fallback,
        },
    )
    await send_from(gw, "someone@other.test", "a@good.test")
    await wait_until(lambda: mx.received, what="the copy")
    assert await dkimpy_verifies(world, mx.received[0].data) == [b"relay.clinic.test"]
    assert sample(gw, "sealgate_dkim_copies_total", result="fallback") == 1


async def test_the_policy_can_hold_mail_it_cannot_sign_for(
    gateway_factory, world, pki, two_domains
):
    mx, keys = two_domains
    policy = (
        "version: 1\n"
        "defaults: {modes: [tls], tls_level: may}\n"
        "rules:\n"
        "  - name: unsignable\n"
        "    when: {facts: {dkim_key: false}}\n"
        "    then: {modes: [smime], fallback: hold}\n"
    )
    gw = await start(gateway_factory, world, pki, policy=policy, **{"dkim.keys": keys})
    await send_from(gw, "someone@other.test", "a@good.test")
    await send_from(gw, "doctor@clinic.test", "b@good.test")
    await wait_until(lambda: mx.received, what="the signable one")
    assert [m.rcpt_tos for m in mx.received] == [["b@good.test"]]
    # (its spool file goes once its records are archived: a batch later)
    await wait_until(lambda: len(queued(gw)) == 1, what="the signable one finished")
    rows = [r for path in queued(gw) for r in gw.queue.store.recipients(path.name)]
    assert [(r.address, r.state.value) for r in rows] == [("a@good.test", "held")]
