"""Sealgate must never be an open relay: network, client certificate or AUTH only."""

from __future__ import annotations

import base64

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from gateway.smtp.auth import hash_password
from tests.conftest import make_message, queued, smtp_client, swaks

ONLY_127_0_0_1 = {"relay.networks": ["127.0.0.1/32"]}


def relay_denied(gw) -> float:
    return gw.metrics.messages_rejected.labels("relay_denied")._value.get()


async def test_relay_is_denied_from_an_address_outside_relay_networks(gateway_factory):
    gw = await gateway_factory(ONLY_127_0_0_1)
    with capture_logs() as logs:
        async with smtp_client(gw, source="127.0.0.2") as client:
            await client.mail("sender@clinic.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e:
                await client.rcpt("patient@example.test")
    assert e.value.code == 554
    assert e.value.message.startswith("5.7.1")
    assert relay_denied(gw) == 1
    denied = [entry for entry in logs if entry["event"] == "smtp.relay-denied"]
    assert denied and denied[0]["client_ip"] == "127.0.0.2"
    assert queued(gw) == []


async def test_relay_is_allowed_from_an_address_inside_relay_networks(gateway_factory):
    gw = await gateway_factory(ONLY_127_0_0_1)
    async with smtp_client(gw, source="127.0.0.1") as client:
        errors, _ = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}
    (path,) = queued(gw)
    assert gw.spool.read(path.name)[0].client.authorized_by == "network"


@pytest.mark.parametrize(
    "pattern",
    ["cn:relay.client.test", "san:relay.client.test", "san:*.client.test", "sha256:FINGERPRINT"],
)
async def test_relay_is_allowed_by_a_matching_client_certificate(gateway_factory, pki, pattern):
    import hashlib

    if pattern == "sha256:FINGERPRINT":
        digest = hashlib.sha256(pki.client_cert_der).hexdigest().upper()
        pattern = "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    gw = await gateway_factory(
        {
            **ONLY_127_0_0_1,
            "relay.client_certs": [pattern],
            "relay.client_ca_file": str(pki.ca_file),
        }
    )
    async with smtp_client(gw, source="127.0.0.2", cert_chain=pki.client_chain) as client:
        errors, _ = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}
    (path,) = queued(gw)
    client_info = gw.spool.read(path.name)[0].client
    assert client_info.authorized_by == "client-cert"
    assert client_info.client_cert_sha256 == hashlib.sha256(pki.client_cert_der).hexdigest()


async def test_a_certificate_that_matches_no_pattern_does_not_allow_relaying(gateway_factory, pki):
    gw = await gateway_factory(
        {
            **ONLY_127_0_0_1,
            "relay.client_certs": ["cn:relay.client.test"],
            "relay.client_ca_file": str(pki.ca_file),
        }
    )
    async with smtp_client(gw, source="127.0.0.2", cert_chain=pki.other_client_chain) as client:
        await client.mail("s@clinic.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e:
            await client.rcpt("r@example.test")
    assert e.value.code == 554
    assert relay_denied(gw) == 1


async def test_a_certificate_from_an_untrusted_ca_is_refused_even_if_its_name_matches(
    gateway_factory, pki
):
    gw = await gateway_factory(
        {
            **ONLY_127_0_0_1,
            "relay.client_certs": ["cn:relay.client.test"],
            "relay.client_ca_file": str(pki.ca_file),
        }
    )
    with pytest.raises((aiosmtplib.SMTPException, OSError)):
        async with smtp_client(gw, source="127.0.0.2", cert_chain=pki.rogue_client_chain) as c:
            await c.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert queued(gw) == []


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# relay users\nm365:{hash_password('correct horse')}\n")
    return path


async def test_relay_is_allowed_after_smtp_auth_over_tls(gateway_factory, users_file):
    gw = await gateway_factory({**ONLY_127_0_0_1, "relay.users_file": str(users_file)})
    async with smtp_client(gw, source="127.0.0.2") as client:
        assert "auth" in client.esmtp_extensions
        await client.login("m365", "correct horse")
        errors, _ = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}
    (path,) = queued(gw)
    env = gw.spool.read(path.name)[0]
    assert (env.client.authorized_by, env.client.auth_user) == ("smtp-auth", "m365")
    assert "with ESMTPSA id" in env.trace_headers


async def test_auth_login_mechanism_works_too(gateway_factory, users_file):
    gw = await gateway_factory({**ONLY_127_0_0_1, "relay.users_file": str(users_file)})
    async with smtp_client(gw, source="127.0.0.2") as client:
        await client.auth_login("m365", "correct horse")
        errors, _ = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}


async def test_auth_is_refused_before_tls(gateway_factory, users_file):
    gw = await gateway_factory(
        {**ONLY_127_0_0_1, "relay.users_file": str(users_file), "relay.require_tls": False}
    )
    async with smtp_client(gw, source="127.0.0.2", tls=False) as client:
        assert "auth" not in client.esmtp_extensions
        token = base64.b64encode(b"\0m365\0correct horse").decode()
        response = await client.execute_command(b"AUTH", b"PLAIN", token.encode())
        assert response.code == 538
        await client.mail("s@clinic.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e:
            await client.rcpt("r@example.test")
        assert e.value.code == 554


async def test_wrong_passwords_are_refused_and_end_the_session(gateway_factory, users_file):
    gw = await gateway_factory({**ONLY_127_0_0_1, "relay.users_file": str(users_file)})
    async with smtp_client(gw, source="127.0.0.2") as client:
        for user in ("m365", "nobody"):
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as e:
                await client.auth_plain(user, "wrong")
            assert e.value.code == 535
        # the third failure (max_auth_failures) ends the session with 421
        with pytest.raises(
            (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPServerDisconnected)
        ) as e:
            await client.auth_plain("m365", "wrong again")
        assert getattr(e.value, "code", 421) == 421
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.mail("s@clinic.test")
    assert gw.metrics.auth.labels("failure")._value.get() == 3


async def test_swaks_from_an_outside_address_is_denied(gateway_factory):
    gw = await gateway_factory(ONLY_127_0_0_1)
    code, out = await swaks(gw, "--tls", "--local-interface", "127.0.0.3")
    assert code != 0
    assert "554 5.7.1 <r@example.test>: Relay access denied" in out
    assert queued(gw) == []


async def test_swaks_with_auth_from_an_outside_address_is_allowed(gateway_factory, users_file):
    gw = await gateway_factory({**ONLY_127_0_0_1, "relay.users_file": str(users_file)})
    code, out = await swaks(
        gw,
        "--tls",
        "--local-interface",
        "127.0.0.3",
        "--auth",
        "PLAIN",
        "--auth-user",
        "m365",
        "--auth-password",
        "correct horse",
    )
    assert code == 0, out
    assert "235 2.7.0" in out
    assert len(queued(gw)) == 1


@pytest.mark.parametrize("keep", [4096, 2])
def test_relay_networks_answers_are_the_same_when_kept(tmp_path, monkeypatch, keep):
    """`RelayPolicy.network_allows` keeps its answer for each address (at most
    `ALLOWED_KEEP` of them, then starts again): asked again, or past the bound, it
    gives the answer the networks give."""
    from gateway.smtp import auth
    from gateway.smtp.auth import RelayPolicy
    from tests.conftest import load_test_config, write_config

    monkeypatch.setattr(auth, "ALLOWED_KEEP", keep)
    config = load_test_config(
        write_config(tmp_path, {"relay.networks": ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]})
    )
    policy = RelayPolicy(config.relay.networks, (), {})
    expected = {
        "127.0.0.1": True,
        "127.0.0.2": False,
        "10.1.2.3": True,
        "::ffff:10.1.2.3": True,  # IPv4-mapped
        "::1": True,
        "::2": False,
        "fe80::1%eth0": False,
        "not an address": False,
    }
    for _ in range(3):
        assert {ip: policy.network_allows(ip) for ip in expected} == expected
    assert len(policy._allowed) <= keep
