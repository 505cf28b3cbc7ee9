"""The portal's HTTP rules without a browser: the policy's portal_expiry, CSRF,
security headers, the per-address rate limit, short sessions, expiry counted."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from tests.conftest import make_message, run_sealgate, smtp_client
from tests.support.clock import Clock
from tests.support.delivery import refusing_and_sender
from tests.support.portal import csrf_of, request_code
from tests.support.world import wait_until

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


async def test_the_policy_sets_how_long_a_message_waits(portal):
    policy = "version: 1\ndefaults: {modes: [tls, portal], portal_expiry: 2d}\n"
    gw, _, _, _, queue_id = await portal(policy)
    (item,) = gw.portal.store.items_of(queue_id)
    assert item.expires - item.created == pytest.approx(2 * 86400, abs=5)


async def test_headers_csrf_and_no_content_before_sign_in(portal):
    gw, plain, link, http, _ = await portal()
    async with http.get(link) as r:
        page = await r.text()
        assert r.status == 200
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        assert "Biopsy" not in page and "p******@plain.test" in page
    async with http.post(link + "/code", data={"csrf": "forged"}) as r:
        assert r.status == 403  # the form's token must match the cookie
    assert len(plain.received) == 1  # no code was sent
    async with http.post(link + "/code", data={"csrf": csrf_of(page)}) as r:
        assert r.status == 200
    await wait_until(lambda: len(plain.received) == 2, what="the code")
    async with http.get(link + "/read", allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"].endswith(link.rsplit("/", 1)[1])
    async with http.get(link + "/part/1", allow_redirects=False) as r:
        assert r.status == 303  # no part without a session


async def test_sessions_are_short_and_a_used_code_is_spent(portal):
    gw, plain, link, http, _ = await portal(**{"portal.session_ttl": "1s"})
    clock = Clock.install(gw.portal.store)
    csrf, code = await request_code(http, link, plain)
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        assert "Biopsy" in await r.text()  # signed in, redirected to the message
    clock.advance(1.3)
    async with http.get(link + "/read", allow_redirects=False) as r:
        assert r.status == 303  # the session is over
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        assert "not right" in await r.text()  # the code was used up


async def test_requests_per_address_are_limited(portal):
    gw, _, link, http, _ = await portal(**{"portal.requests_per_minute": 4})
    statuses = []
    for _ in range(6):
        async with http.get(link) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert gw.metrics.registry.get_sample_value("sealgate_portal_rate_limited_total") == 2


async def test_expired_unread_messages_are_counted_and_deleted(portal):
    gw, _, link, http, queue_id = await portal(**{"portal.expiry": "1s"})
    Clock.install(gw.portal.store).advance(1.2)
    await gw.portal.sweep()
    assert gw.metrics.registry.get_sample_value("sealgate_portal_expired_unread_total") == 1
    (item,) = gw.portal.store.items_of(queue_id)
    assert item.gone and item.expires < gw.portal.now()
    async with http.get(link) as r:
        assert r.status == 410 and "This message has expired" in await r.text()


async def test_behind_a_proxy_the_forwarded_address_is_the_client(gateway_factory, world, tmp_path):
    logo = tmp_path / "logo.png"
    logo.write_bytes(base64.b64decode(PNG_1X1))
    gw = await gateway_factory(
        world.config(
            {
                "portal.behind_proxy": True,
                "portal.requests_per_minute": 2,
                "portal.logo_file": str(logo),
                "portal.colour": "#aa0000",
            }
        )
    )
    port = gw.portal.address[1]
    statuses = {}
    async with aiohttp.ClientSession() as http:  # plain HTTP from the proxy
        for client in ("203.0.113.7", "203.0.113.7", "203.0.113.7", "198.51.100.9"):
            headers = {"X-Forwarded-For": f"10.9.9.9, {client}", "X-Forwarded-Proto": "https"}
            async with http.get(f"http://127.0.0.1:{port}/m/unknown", headers=headers) as r:
                statuses.setdefault(client, []).append(r.status)
        async with http.get(f"http://127.0.0.1:{port}/static/logo.png") as r:
            assert r.status == 200 and await r.read() == logo.read_bytes()
        async with http.get(f"http://127.0.0.1:{port}/static/portal.css") as r:
            assert "--accent: #aa0000" in await r.text()
    # the limit counts each forwarded client, not the proxy's own address
    assert statuses == {"203.0.113.7": [404, 404, 429], "198.51.100.9": [404]}


def test_check_config_refuses_a_logo_that_is_not_a_png(tmp_path):
    logo = tmp_path / "logo.png"
    logo.write_text("<svg/>")
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nportal: {{logo_file: {logo}}}\n")
    checked = run_sealgate("check-config", "--config", str(config))
    assert checked.returncode == 78 and "portal.logo_file" in checked.stderr
    assert "is not a PNG image" in checked.stderr


async def test_sign_out_needs_the_session_s_token_and_ends_the_session(portal):
    gw, plain, link, http, _ = await portal()
    csrf, code = await request_code(http, link, plain)
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        session_csrf = csrf_of(await r.text())
    async with http.post(link + "/logout", data={"csrf": "forged"}) as r:
        assert r.status == 403
    async with http.get(link + "/read", allow_redirects=False) as r:
        assert r.status == 200  # still signed in
    async with http.post(link + "/logout", data={"csrf": session_csrf}) as r:
        assert r.status == 200 and "signed out" in await r.text()
    async with http.get(link + "/read", allow_redirects=False) as r:
        assert r.status == 303


async def test_a_notification_that_bounces_is_reported_to_the_original_sender(
    gateway_factory, world
):
    gone, clinic = await refusing_and_sender(world, "127.0.0.94", "127.0.0.95", cert=None)
    gw = await gateway_factory(world.config())
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["gone@plain.test"], make_message("Biopsy"))
    await wait_until(lambda: clinic.received, what="the DSN at the sender's server")
    (dsn,) = clinic.received
    assert dsn.rcpt_tos == ["doctor@clinic.test"] and gone.received == []
    text = dsn.data.decode()
    assert "gone@plain.test" in text and "5.1.1" in text
    assert "Biopsy" not in text  # neither the original nor the notification leaks it


async def _refused_everywhere_but(http, link: str, csrf: str, allowed: set[str]) -> None:
    """Every way in but ``allowed`` is refused, and nothing of the message shows."""
    forms = {
        "code": ("/code", {"csrf": csrf}),
        "login": ("/login", {"csrf": csrf, "code": "12345678"}),
        "password": ("/password", {"csrf": csrf, "password": "x" * 20}),
        "passphrase": ("/passphrase", {"csrf": csrf, "passphrase": "x" * 20}),
    }
    for name, (path, form) in forms.items():
        if name in allowed:
            continue
        async with http.post(link + path, data=form, allow_redirects=False) as r:
            assert r.status == 403, name
            assert "Biopsy" not in await r.text()
    if "oidc" not in allowed:
        async with http.get(link + "/oidc/test-idp", allow_redirects=False) as r:
            assert r.status in (403, 404)
    for path in ("/read", "/part/1", "/password/new"):
        async with http.get(link + path, allow_redirects=False) as r:
            assert r.status == 303, path


async def test_a_passphrase_message_opens_with_the_passphrase_only(portal):
    message = make_message("Biopsy", headers="X-Sealgate-Passphrase: tulip radiator\r\n")
    gw, plain, link, http, _ = await portal(message=message)
    async with http.get(link) as r:
        csrf = csrf_of(await r.text())
    await _refused_everywhere_but(http, link, csrf, {"passphrase"})
    assert len(plain.received) == 1  # no code could be asked for
    async with http.post(
        link + "/passphrase", data={"csrf": csrf, "passphrase": "tulip radiator"}
    ) as r:
        assert "Biopsy" in await r.text()


async def test_an_oidc_message_cannot_be_opened_with_a_code_or_a_guessed_callback(portal):
    gw, plain, link, http, _ = await portal(
        **{
            "portal.auth": "oidc",
            "portal.oidc_providers": [
                {"name": "test-idp", "issuer": "https://127.0.0.1:9", "client_id": "portal"}
            ],
        }
    )
    async with http.get(link) as r:
        page = await r.text()
        assert "Sign in with test-idp" in page
    await _refused_everywhere_but(http, link, csrf_of_cookie(http), {"oidc"})
    base = link.split("/m/", 1)[0]
    async with http.get(base + "/oidc/callback?state=forged&code=x") as r:
        assert r.status in (400, 403) and "Biopsy" not in await r.text()


def csrf_of_cookie(http) -> str:
    """The double-submit token the landing page set (an OIDC page has no form)."""
    for cookie in http.cookie_jar:
        if cookie.key == "__Host-sealgate-csrf":
            return cookie.value
    return "none"


async def test_in_password_mode_a_code_leads_to_choosing_a_password_not_to_the_message(portal):
    gw, plain, link, http, _ = await portal(**{"portal.auth": "password"})
    csrf, code = await request_code(http, link, plain)
    async with http.post(
        link + "/login", data={"csrf": csrf, "code": code}, allow_redirects=False
    ) as r:
        assert r.status == 303 and r.headers["Location"].endswith("/password/new")
    for path in ("/read", "/part/1"):
        async with http.get(link + path, allow_redirects=False) as r:
            assert r.status == 303 and not r.headers["Location"].endswith("/read")
    async with http.get(link + "/password/new") as r:
        page = await r.text()
        assert "Choose a password" in page and "Biopsy" not in page
    async with http.post(
        link + "/password/new",
        data={"csrf": csrf_of(page), "password": "short", "again": "short"},
    ) as r:
        assert "at least 15 characters" in await r.text()
    good = "seven orange lanterns glowing"
    async with http.post(
        link + "/password/new", data={"csrf": csrf_of(page), "password": good, "again": good}
    ) as r:
        assert "Biopsy" in await r.text()
    stored = gw.portal.store.password_of("patient@plain.test")
    assert stored.startswith("$argon2id$") and good not in stored
