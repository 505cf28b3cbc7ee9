"""Only your own tenant relays: a Microsoft 365 client certificate
(``CN=mail.protection.outlook.com``, shared by every tenant) is not enough once the
binding is configured.  Over real sockets, with a client certificate from a test CA
and DKIM keys on the test DNS server: the tenant id, the envelope sender's domain and
an aligned DKIM signature of the organisation each decide; a refusal is 550 5.7.1
with nothing spooled and counted by reason; a key DNS does not give now is 451."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from gateway.smtp.auth import hash_password
from tests.conftest import RawSmtp, make_message, queued, smtp_client
from tests.support.dkim_keys import rsa_signing_key
from tests.support.dns import DnsFixture
from tests.support.net import reset
from tests.support.world import wait_until

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "0d8c6f4e-2b1a-4c3d-9e8f-123456789abc"
EXO = "mail.protection.outlook.com"


@pytest.fixture(scope="module")
def exo_chain(pki):
    """The client certificate Exchange Online presents - every tenant's."""
    cert = pki.ca.issue_cert(EXO, common_name=EXO)
    path = pki.root / "exo.pem"
    path.write_bytes(cert.private_key_pem.bytes() + cert.cert_chain_pems[0].bytes())
    return path


@pytest.fixture
async def dns():
    server = await DnsFixture().start()
    yield server
    await server.stop()


@pytest.fixture
def keys(dns):
    ours = rsa_signing_key("clinic.test", "selector1")
    tenant = rsa_signing_key("clinic.onmicrosoft.com", "selector1-clinic")
    attacker = rsa_signing_key("attacker.onmicrosoft.com", "selector1-attacker")
    for key in (ours, tenant, attacker):
        key.publish(dns)
    return {"ours": ours, "tenant": tenant, "attacker": attacker}


def exo_config(pki, dns, **relay):
    config = {
        "relay.networks": ["127.0.0.1/32"],
        "relay.client_certs": [f"cn:{EXO}"],
        "relay.client_ca_file": str(pki.ca_file),
        "dns.nameservers": [dns.nameserver],
    }
    config.update({f"relay.{k}": v for k, v in relay.items()})
    return config


def rejected(gw, reason: str) -> float:
    return gw.metrics.messages_rejected.labels(reason)._value.get()


async def send(gw, chain, message: bytes, sender: str = "sender@clinic.test"):
    """(code, text) of the reply to the message; from 127.0.0.2, outside relay.networks."""
    async with smtp_client(gw, source="127.0.0.2", cert_chain=chain) as client:
        try:
            await client.sendmail(sender, ["patient@example.test"], message)
        except aiosmtplib.SMTPSenderRefused as e:
            return e.code, e.message
        except aiosmtplib.SMTPDataError as e:
            return e.code, e.message
        return 250, ""


def tenant_header(*ids: str) -> str:
    return "".join(f"X-MS-Exchange-CrossTenant-Id: {i}\r\n" for i in ids)


# -- the tenant id ----------------------------------------------------------------------


async def test_the_configured_tenant_relays(gateway_factory, pki, dns, exo_chain):
    gw = await gateway_factory(exo_config(pki, dns, m365_tenant_ids=[TENANT.upper()]))
    assert await send(gw, exo_chain, make_message(headers=tenant_header(TENANT))) == (250, "")
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[0].client.authorized_by == "client-cert"


@pytest.mark.parametrize(
    "headers",
    [tenant_header(OTHER_TENANT), "", tenant_header(TENANT, OTHER_TENANT)],
    ids=["another tenant", "no tenant header", "two headers that differ"],
)
async def test_any_other_tenant_is_refused_and_nothing_is_kept(
    gateway_factory, pki, dns, exo_chain, headers
):
    gw = await gateway_factory(exo_config(pki, dns, m365_tenant_ids=[TENANT]))
    with capture_logs() as logs:
        code, text = await send(gw, exo_chain, make_message(headers=headers, subject="Lab 42"))
    assert (code, text[:5]) == (550, "5.7.1")
    assert queued(gw) == []
    assert rejected(gw, "tenant_id") == 1
    (line,) = [e for e in logs if e["event"] == "smtp.binding-refused"]
    assert line["reason"] == "tenant_id" and line["authorized_by"] == "client-cert"
    assert "Lab 42" not in repr(logs) and "patient@" not in repr(logs)


async def test_a_wrong_sender_domain_is_refused_at_mail(gateway_factory, pki, dns, exo_chain):
    gw = await gateway_factory(
        exo_config(pki, dns, m365_tenant_ids=[TENANT], sender_domains=["clinic.test"])
    )
    message = make_message(headers=tenant_header(TENANT))
    code, text = await send(gw, exo_chain, message, sender="ceo@elsewhere.test")
    assert (code, text[:5]) == (550, "5.7.1")
    assert rejected(gw, "sender_domain") == 1
    assert queued(gw) == []
    code, _ = await send(gw, exo_chain, message, sender="a@sub.clinic.test")
    assert code == 550
    assert await send(gw, exo_chain, message) == (250, "")


async def test_subdomains_only_when_listed_with_a_leading_dot(gateway_factory, pki, dns, exo_chain):
    gw = await gateway_factory(
        exo_config(pki, dns, m365_tenant_ids=[TENANT], sender_domains=[".clinic.test"])
    )
    message = make_message(headers=tenant_header(TENANT))
    assert await send(gw, exo_chain, message, sender="a@lab.clinic.test") == (250, "")
    code, _ = await send(gw, exo_chain, message, sender="a@clinic.test")
    assert code == 550


# -- DKIM -------------------------------------------------------------------------------


def dkim_config(pki, dns):
    return exo_config(pki, dns, dkim_domains=["clinic.test", "clinic.onmicrosoft.com"])


async def test_a_message_signed_by_the_organisation_relays(
    gateway_factory, pki, dns, exo_chain, keys
):
    gw = await gateway_factory(dkim_config(pki, dns))
    # Microsoft 365 signs custom-domain mail twice: the domain and the tenant's
    signed = keys["tenant"].sign(keys["ours"].sign(make_message()))
    assert await send(gw, exo_chain, signed) == (250, "")
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[1] == signed  # kept byte for byte


async def test_the_binding_holds_for_relay_networks_too(gateway_factory, pki, dns, keys):
    gw = await gateway_factory(dkim_config(pki, dns))
    async with smtp_client(gw, source="127.0.0.1") as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as e:
            await client.sendmail("sender@clinic.test", ["p@example.test"], make_message())
        assert e.value.code == 550
        errors, _ = await client.sendmail(
            "sender@clinic.test", ["p@example.test"], keys["ours"].sign(make_message())
        )
    assert errors == {}


def altered(message: bytes) -> bytes:
    return message.replace(b"Hello.", b"Hello, altered.")


REFUSED = {
    "unsigned": lambda k: make_message(),
    "signed only by another tenant": lambda k: k["attacker"].sign(make_message()),
    "tenant domain not aligned with From": lambda k: k["tenant"].sign(make_message()),
    "body length l=": lambda k: k["ours"].sign(make_message(), length=True),
    "altered after signing": lambda k: altered(k["ours"].sign(make_message())),
    "a second From added": lambda k: b"From: ceo@clinic.test\r\n" + k["ours"].sign(make_message()),
    "From forged to the organisation": lambda k: (
        k["attacker"]
        .sign(make_message().replace(b"sender@clinic.test", b"a@attacker.onmicrosoft.com"))
        .replace(b"a@attacker.onmicrosoft.com", b"sender@clinic.test")
    ),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_messages_not_bound_by_dkim_are_refused(
    gateway_factory, pki, dns, exo_chain, keys, case
):
    gw = await gateway_factory(dkim_config(pki, dns))
    with capture_logs() as logs:
        code, text = await send(gw, exo_chain, REFUSED[case](keys))
    assert (code, text[:5]) == (550, "5.7.1"), text
    assert queued(gw) == []
    assert rejected(gw, "dkim_unbound") == 1
    (line,) = [e for e in logs if e["event"] == "smtp.binding-refused"]
    assert line["reason"] == "dkim_unbound"


async def test_a_signature_without_from_in_h_is_refused(gateway_factory, pki, dns, exo_chain, keys):
    from tests.crypto.test_dkim_verify import sign_without_from

    gw = await gateway_factory(dkim_config(pki, dns))
    code, text = await send(gw, exo_chain, sign_without_from(keys["ours"], make_message()))
    assert (code, text[:5]) == (550, "5.7.1")
    assert queued(gw) == []


async def test_a_dns_timeout_for_the_key_answers_451(gateway_factory, pki, dns, exo_chain, keys):
    dns.silence("selector1._domainkey.clinic.test")
    gw = await gateway_factory(dkim_config(pki, dns))
    code, text = await send(gw, exo_chain, keys["ours"].sign(make_message()))
    assert (code, text[:5]) == (451, "4.4.3")
    assert queued(gw) == []
    assert rejected(gw, "dkim_tempfail") == 1


async def test_keys_are_fetched_once_and_then_cached(gateway_factory, pki, dns, exo_chain, keys):
    gw = await gateway_factory(dkim_config(pki, dns))
    signed = keys["ours"].sign(make_message())
    for _ in range(3):
        assert await send(gw, exo_chain, signed) == (250, "")
    asked = [q for q in dns.queries if q[0].startswith("selector1._domainkey.clinic.test")]
    assert len(asked) == 1


# -- SMTP AUTH users and their own senders ---------------------------------------------


async def test_an_authenticated_user_sends_only_as_its_own_senders(gateway_factory, tmp_path):
    users = tmp_path / "users"
    users.write_text(
        f"billing:{hash_password('pw-billing')}:billing@clinic.test,lab.clinic.test\n"
        f"free:{hash_password('pw-free')}\n"
    )
    gw = await gateway_factory({"relay.networks": [], "relay.users_file": str(users)})
    async with smtp_client(gw) as client:
        await client.login("billing", "pw-billing")
        for sender, code in [
            ("billing@clinic.test", 250),
            ("anyone@lab.clinic.test", 250),
            ("ceo@clinic.test", 550),
            ("", 550),  # the null sender
        ]:
            reply = await client.mail(sender) if code == 250 else None
            if code == 550:
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
                    await client.mail(sender)
                assert (e.value.code, e.value.message[:5]) == (550, "5.7.1")
            else:
                assert reply.code == 250
                await client.rset()
    async with smtp_client(gw) as client:
        await client.login("free", "pw-free")
        assert (await client.mail("ceo@clinic.test")).code == 250
    assert rejected(gw, "sender_not_owned") == 2


async def test_the_null_sender_passes_only_when_dkim_binds_the_message(
    gateway_factory, pki, dns, exo_chain, keys
):
    # a bounce your tenant relays has no sender domain to check: DKIM holds it
    gw = await gateway_factory(
        exo_config(pki, dns, sender_domains=["clinic.test"], dkim_domains=["clinic.test"])
    )
    assert await send(gw, exo_chain, keys["ours"].sign(make_message()), sender="") == (250, "")
    code, _ = await send(gw, exo_chain, make_message(), sender="")
    assert code == 550  # unsigned: refused after DATA
    second = exo_config(pki, dns, sender_domains=["clinic.test"])
    gw2 = await gateway_factory({**second, "state_dir": str(gw.config.state_dir) + "-2"})
    code, text = await send(gw2, exo_chain, make_message(), sender="")
    assert (code, text[:5]) == (550, "5.7.1")
    assert rejected(gw2, "sender_domain") == 1


async def test_a_reset_while_the_key_is_looked_up_keeps_nothing(
    gateway_factory, pki, dns, exo_chain, keys
):
    # the message is whole (spilled to tmp/: over 256 KiB) and waits for its DKIM
    # key; the client resets: its tmp/ file and descriptor go, as for a reset mid-DATA
    dns.silence("selector1._domainkey.clinic.test")
    gw = await gateway_factory(dkim_config(pki, dns))
    body = "".join(f"line {i:06d} of a long result\r\n" for i in range(12_000))
    signed = keys["ours"].sign(make_message(body=body))
    s = await RawSmtp.open(gw, source="127.0.0.2")
    assert (await s.command("EHLO client.test")).startswith("250")
    await s.starttls(exo_chain)
    assert (await s.command("EHLO client.test")).startswith("250")
    await s.begin_data("sender@clinic.test", "patient@example.test")
    s.send(signed + b".\r\n")
    await wait_until(lambda: list(gw.spool.tmp_dir.iterdir()), what="the message spilled")
    await asyncio.sleep(0.3)  # all of it in (loopback); the key's lookup waits 5 s
    assert gw.smtp.ctx.sessions and list(gw.spool.tmp_dir.iterdir())
    reset(s.writer)
    await wait_until(lambda: not gw.smtp.ctx.sessions, what="the session gone")
    await wait_until(lambda: not list(gw.spool.tmp_dir.iterdir()), what="tmp/ emptied")
    assert queued(gw) == []
