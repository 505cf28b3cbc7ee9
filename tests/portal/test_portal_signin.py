"""Portal sign-in that does not travel with the link (portal.auth), in headless
Chromium against the portal over HTTPS: a password the recipient sets after a first
code and uses for later messages (wrong ones lock it, a reset needs a code); a
passphrase the sender set in a header the gateway removed on acceptance; and sign-in
with a real OpenID Connect provider on loopback (the npm oidc-provider), whose
verified email must be the recipient's.  Every sign-in, failure, lockout and reset is
in the message's access record."""

from __future__ import annotations

import asyncio
import json

from selenium.webdriver.common.by import By

from tests.conftest import free_port, queued, smtp_client
from tests.support.archive import archive_of
from tests.support.browser import on_page, press, source, start_portal, world_with_plain_recipient
from tests.support.oidc_provider import OidcProvider, sign_in_at_provider
from tests.support.portal import code_in, link_in
from tests.support.world import wait_until

SECRET = "The margins are clear"


def message(headers: str = "") -> bytes:
    return (
        "From: Dr Who <doctor@clinic.test>\r\nTo: patient@plain.test\r\n"
        f"Subject: Biopsy result\r\nMessage-ID: <m1@clinic.test>\r\n{headers}\r\n"
        f"{SECRET}.\r\n"
    ).encode()


async def send(gw, headers: str = "") -> str:
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail(
            "doctor@clinic.test", ["patient@plain.test"], message(headers)
        )
    return reply.rsplit(" ", 1)[1]


async def typed(browser, field_id: str, text: str, button: str) -> None:
    def act(d):
        field = d.find_element(By.ID, field_id)
        field.clear()
        field.send_keys(text)
        press(d, button)

    await on_page(browser, act)


def access(gw, queue_id: str) -> list[str]:
    with archive_of(gw) as archive:
        entries = archive.access_log(0)
    return [e["action"] for e in reversed(entries) if e.get("queue_id") == queue_id]


async def test_password_set_after_a_first_code_then_used_locked_and_reset(
    gateway_factory, world, pki, portal_cert, browser
):
    plain, _ = await world_with_plain_recipient(world)
    gw = await start_portal(gateway_factory, world, pki, portal_cert, **{"portal.auth": "password"})
    first = await send(gw)
    await wait_until(lambda: plain.received, what="the first notification")
    await on_page(browser, lambda d: d.get(link_in(plain.received[0].data)))
    assert "first secure message" in await source(browser)
    await on_page(browser, lambda d: press(d, "button"))
    await wait_until(lambda: len(plain.received) == 2, what="the code")
    await typed(browser, "code", code_in(plain.received[1].data), "form[action$='/login'] button")
    assert "Choose a password" in await source(browser)
    assert SECRET not in await source(browser)  # not before a password is set

    def choose(d, password: str, again: str) -> None:
        d.find_element(By.ID, "new").send_keys(password)
        d.find_element(By.ID, "again").send_keys(again)
        press(d, "button")

    await on_page(browser, lambda d: choose(d, "passwordpassword", "passwordpassword"))
    assert "too easy to guess" in await source(browser)
    await on_page(
        browser, lambda d: choose(d, "patient@plain.test is me", "patient@plain.test is me")
    )
    assert "email address" in await source(browser)
    password = "amber lantern over the quiet harbour"
    await on_page(browser, lambda d: choose(d, password, password))
    assert SECRET in await source(browser)

    # the next message: the password, no code
    second = await send(gw)
    await wait_until(lambda: len(plain.received) == 3, what="the second notification")
    await on_page(browser, lambda d: d.get(link_in(plain.received[2].data)))
    page = await source(browser)
    assert 'id="password"' in page and SECRET not in page
    await typed(browser, "password", "not the password at all", "form[action$='/password'] button")
    assert "not right" in await source(browser) and SECRET not in await source(browser)
    await typed(browser, "password", password, "form[action$='/password'] button")
    assert SECRET in await source(browser)
    assert len(plain.received) == 3  # no code was mailed for it

    # wrong passwords lock the address (portal.max_code_attempts), the right one too
    third = await send(gw)
    await wait_until(lambda: len(plain.received) == 4, what="the third notification")
    link = link_in(plain.received[3].data)
    for _ in range(5):
        await on_page(browser, lambda d: d.get(link))
        await typed(
            browser, "password", "wrong wrong wrong wrong", "form[action$='/password'] button"
        )
    assert "Your password is locked" in await source(browser)
    await on_page(browser, lambda d: d.get(link))
    await typed(browser, "password", password, "form[action$='/password'] button")
    assert "locked" in await source(browser) and SECRET not in await source(browser)

    # a reset needs a code sent to the address; it unlocks with the new password
    await on_page(browser, lambda d: d.get(link))
    await on_page(browser, lambda d: press(d, "form[action$='/code'] button"))
    await wait_until(lambda: len(plain.received) == 5, what="the reset code")
    await typed(browser, "code", code_in(plain.received[4].data), "form[action$='/login'] button")
    renewed = "a brand new phrase for the portal"
    await on_page(browser, lambda d: choose(d, renewed, renewed))
    assert SECRET in await source(browser)

    await wait_until(lambda: "password-reset" in access(gw, third), what="the record")
    assert access(gw, first)[:3] == ["code-sent", "signed-in", "password-set"]
    assert access(gw, second)[:3] == ["wrong-password", "signed-in", "view"]
    third_record = access(gw, third)
    assert third_record.count("wrong-password") == 5 and "locked" in third_record
    assert "refused-locked" in third_record and "password-reset" in third_record


async def test_a_passphrase_set_by_the_sender_never_leaves_the_gateway(
    gateway_factory, world, pki, portal_cert, browser
):
    plain, _ = await world_with_plain_recipient(world)
    gw = await start_portal(gateway_factory, world, pki, portal_cert)
    phrase = "violet kettle under the stairs"
    queue_id = await send(gw, f"X-Sealgate-Passphrase: {phrase}\r\n")
    (spooled,) = queued(gw)
    envelope, data = gw.spool.read(spooled.name)
    assert b"X-Sealgate-Passphrase" not in data and phrase.encode() not in data
    assert envelope.portal_passphrase.startswith("$argon2id$")
    await wait_until(lambda: plain.received, what="the notification")
    (note,) = plain.received
    assert b"passphrase" not in note.data.lower() and phrase.encode() not in note.data
    await wait_until(lambda: _archived(gw, queue_id), what="archived")
    with archive_of(gw) as archive:
        archived_envelope, archived = archive.message(queue_id)
    assert phrase.encode() not in archived and b"X-Sealgate-Passphrase" not in archived
    assert "portal_passphrase" not in json.dumps(archived_envelope)

    await on_page(browser, lambda d: d.get(link_in(note.data)))
    page = await source(browser)
    assert 'id="passphrase"' in page and '/code"' not in page  # no code is offered
    await typed(browser, "passphrase", "violet kettle on the stairs", "button")
    assert "not right" in await source(browser)
    await typed(browser, "passphrase", phrase, "button")
    assert SECRET in await source(browser)
    assert len(plain.received) == 1  # no code was ever mailed
    # (the archive writes its records in batches: the view's is in within a linger)
    await wait_until(lambda: "view" in access(gw, queue_id), what="the view's record")
    actions = access(gw, queue_id)
    assert actions[:3] == ["wrong-passphrase", "signed-in", "view"]


def _archived(gw, queue_id: str) -> bool:
    with archive_of(gw) as archive:
        return bool(archive.has(queue_id))


async def test_a_rule_that_asks_for_a_passphrase_bounces_mail_without_one(
    gateway_factory, world, pki, portal_cert
):
    plain, clinic = await world_with_plain_recipient(world)
    policy = (
        "version: 1\n"
        "defaults: {modes: [tls, portal], tls_level: verify, fallback: hold}\n"
        "rules:\n"
        "  - name: lab-results\n"
        "    when: {recipient_domain: [plain.test]}\n"
        "    then: {modes: [portal], portal_auth: passphrase}\n"
    )
    gw = await start_portal(gateway_factory, world, pki, portal_cert, policy=policy)
    await send(gw)
    await wait_until(lambda: clinic.received, what="the DSN to the sender")
    (dsn,) = clinic.received
    assert dsn.rcpt_tos == ["doctor@clinic.test"] and b"5.7.0" in dsn.data
    assert b"passphrase" in dsn.data and SECRET.encode() not in dsn.data
    assert plain.received == []  # nothing was deposited, no notification


async def test_sign_in_with_a_real_openid_connect_provider(
    gateway_factory, world, pki, portal_cert, browser, tmp_path
):
    plain, _ = await world_with_plain_recipient(world)
    portal_port, idp_port = free_port(), free_port()
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret-for-tests\n")
    provider = await OidcProvider(
        idp_port,
        clients=[
            {
                "client_id": "sealgate-portal",
                "client_secret": "s3cret-for-tests",
                "redirect_uris": [f"https://127.0.0.1:{portal_port}/oidc/callback"],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            }
        ],
        accounts={
            "patient@plain.test": {"email": "patient@plain.test", "email_verified": True},
            "mallory@evil.test": {"email": "mallory@evil.test", "email_verified": True},
            "unverified": {"email": "patient@plain.test", "email_verified": False},
        },
    ).start()
    try:
        gw = await start_portal(
            gateway_factory,
            world,
            pki,
            portal_cert,
            **{
                "portal.listen": f"127.0.0.1:{portal_port}",
                "portal.auth": "oidc",
                "portal.oidc_providers": [
                    {
                        "name": "test-idp",
                        "label": "Test Identity",
                        "issuer": provider.issuer,
                        "client_id": "sealgate-portal",
                        "client_secret_file": str(secret),
                    }
                ],
            },
        )
        queue_id = await send(gw)
        await wait_until(lambda: plain.received, what="the notification")
        link = link_in(plain.received[0].data)

        async def sign_in_as(login: str) -> str:
            await on_page(browser, lambda d: d.get(link))
            await on_page(browser, lambda d: press(d, "a.button"))

            await on_page(browser, lambda d: sign_in_at_provider(d, login))
            await asyncio.sleep(0.5)  # the portal's refresh on to the message
            return await source(browser)

        page = await sign_in_as("mallory@evil.test")
        assert "not the address this message was sent to" in page and SECRET not in page
        page = await sign_in_as("unverified")
        assert "did not open the message" in page and SECRET not in page
        page = await sign_in_as("patient@plain.test")
        for _ in range(50):  # the portal's own page moves on to the message
            if SECRET in page:
                break
            await asyncio.sleep(0.1)
            page = await source(browser)
        assert SECRET in page
        assert len(plain.received) == 1  # no code by mail
        await wait_until(lambda: "view" in access(gw, queue_id), what="the view's record")
        actions = access(gw, queue_id)
        assert actions.count("oidc-refused") == 2
        assert actions[-2:] == ["signed-in", "view"]
    finally:
        await provider.stop()
