"""The console in headless Chromium, signed in through a real OpenID Connect provider
on loopback (the npm oidc-provider) whose role claims the console maps: an auditor
sees metadata and evidence but no content and cannot export; an investigator reads
a message, downloads its attachment byte for byte and an export that verifies with
its own verify.py; an admin's hold placed by search covers a message that arrives
afterwards; a person the provider vouches for but who has no role is refused; a
local account signs in with a TOTP code and wrong codes lock it.  Every action is on
the access-record page.  Screenshots of the overview, a search and a message at
desktop and phone width go to test-artifacts/."""

from __future__ import annotations

import asyncio
import io
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pyotp
from selenium.webdriver.common.by import By

from tests.conftest import free_port
from tests.portal.test_portal_browser import PDF
from tests.portal.test_portal_browser import message as pdf_message
from tests.support.browser import on_page, press, source
from tests.support.console import PASSWORD
from tests.support.oidc_provider import OidcProvider, sign_in_at_provider

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECRET = "The margins are clear"
DESKTOP, PHONE = (1280, 900), (390, 844)


async def provider_on(port: int, console_port: int) -> OidcProvider:
    return await OidcProvider(
        port,
        clients=[
            {
                "client_id": "sealgate-console",
                "client_secret": "console-secret-for-tests",
                "redirect_uris": [f"https://127.0.0.1:{console_port}/oidc/callback"],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            }
        ],
        accounts={
            "ana": {
                "email": "ana@clinic.test",
                "email_verified": True,
                "name": "Ana Auditor",
                "roles": ["Sealgate.Auditor"],
            },
            "ivan": {
                "email": "ivan@clinic.test",
                "email_verified": True,
                "name": "Ivan Investigator",
                "groups": ["g-investigators", "g-staff"],
            },
            "adam": {
                "email": "adam@clinic.test",
                "email_verified": True,
                "name": "Adam Admin",
                "roles": ["Sealgate.Admin"],
            },
            "nora": {
                "email": "nora@clinic.test",
                "email_verified": True,
                "name": "Nora Nobody",
                "groups": ["g-staff"],
            },
        },  # fmt: skip
    ).start()


async def sign_in_with_provider(browser, base: str, login: str) -> str:
    await on_page(browser, lambda d: d.get(base + "/signin"))
    await on_page(browser, lambda d: press(d, "a.button"))

    await on_page(browser, lambda d: sign_in_at_provider(d, login))
    for _ in range(50):  # the console's own page moves on (a same-site navigation)
        page = await source(browser)
        if "Sign out" in page or "refused" in page:
            return page
        await asyncio.sleep(0.1)
    return await source(browser)


async def sign_out(browser) -> None:
    await on_page(browser, lambda d: press(d, "form.who button"))


async def shoot(browser, name: str) -> None:
    """The page at desktop and phone width, kept; at phone width nothing is wider
    than the screen."""
    ARTIFACTS.mkdir(exist_ok=True)
    for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        await on_page(browser, lambda d, w=width, h=height: d.set_window_size(w, h))
        if label == "phone":
            scroll = await on_page(
                browser, lambda d: d.execute_script("return document.documentElement.scrollWidth")
            )
            assert scroll <= width, f"{name} is {scroll}px wide on a phone"
        path = str(ARTIFACTS / f"console-{name}-{label}.png")
        assert await on_page(browser, lambda d, p=path: d.save_screenshot(p))
    await on_page(browser, lambda d: d.set_window_size(*DESKTOP))


def fetch(url: str, cookie: dict, ca_file: str, form: dict | None = None) -> tuple[int, bytes]:
    data = urllib.parse.urlencode(form, doseq=True).encode() if form is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Cookie": f"{cookie['name']}={cookie['value']}"}
    )
    context = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(request, context=context, timeout=30) as r:  # noqa: S310
        return r.status, r.read()


async def test_compliance_officers_in_a_browser(console, portal_cert, browser, tmp_path):
    chain, key, _ = portal_cert
    console_port, idp_port = free_port(), free_port()
    provider = await provider_on(idp_port, console_port)
    secret = tmp_path / "console-client.secret"
    secret.write_text("console-secret-for-tests\n")
    try:
        w = await console(
            **{
                "console.listen": f"127.0.0.1:{console_port}",
                "console.cert_file": str(chain),
                "console.key_file": str(key),
                "console.max_failures": 2,
                "console.oidc_providers": [
                    {
                        "name": "clinic-idp",
                        "label": "Clinic account",
                        "issuer": provider.issuer,
                        "client_id": "sealgate-console",
                        "client_secret_file": str(secret),
                        "domains": ["clinic.test"],
                    }
                ],
                "console.role_claims": [
                    {"claim": "roles", "value": "Sealgate.Auditor", "role": "auditor"},
                    {"claim": "groups", "value": "g-investigators", "role": "investigator"},
                    {"claim": "roles", "value": "Sealgate.Admin", "role": "admin"},
                ],
            }
        )
        base = w.base
        with_pdf = await w.send(["patient@tls.test", "audit@tls.test"], data=pdf_message())

        # -- the auditor: metadata and evidence, no content, no export ---------------
        page = await sign_in_with_provider(browser, base, "ana")
        assert "Overview" in page and "ana@clinic.test" in page and "auditor" in page
        assert "messages received" in page and "<svg" in page
        await shoot(browser, "overview")

        def search(d, field: str, value: str):
            d.get(base + "/search")
            d.find_element(By.ID, field).send_keys(value)
            press(d, "form.search button[type=submit]")

        await on_page(browser, lambda d: search(d, "recipient", "audit@tls.test"))
        page = await source(browser)
        assert f"/messages/{with_pdf}" in page and "Download all results as CSV" in page
        assert "Export the selected" not in page and "Hold the selected" not in page
        await shoot(browser, "search")
        await on_page(browser, lambda d: press(d, f"a[href='/messages/{with_pdf}']"))
        page = await source(browser)
        assert "audit@tls.test" in page and "TLSv1.3" in page and "pkix" in page
        assert SECRET not in page and "Read the message" not in page
        await shoot(browser, "message")
        await on_page(browser, lambda d: d.get(f"{base}/messages/{with_pdf}/content"))
        assert "Your role does not allow" in await source(browser)
        await on_page(browser, lambda d: d.get(f"{base}/exports"))
        assert "Your role does not allow" in await source(browser)
        await sign_out(browser)
        assert "Sign in with Clinic account" in await source(browser)

        # -- the investigator: reads, downloads the attachment and an export -----------
        page = await sign_in_with_provider(browser, base, "ivan")
        assert "ivan@clinic.test" in page and "investigator" in page
        await on_page(browser, lambda d: d.get(f"{base}/messages/{with_pdf}"))
        await on_page(browser, lambda d: press(d, "a.button[href$='/content']"))
        assert SECRET in await on_page(
            browser, lambda d: d.find_element(By.CLASS_NAME, "body").text
        )
        href = await on_page(
            browser, lambda d: d.find_element(By.LINK_TEXT, "pathology.pdf").get_attribute("href")
        )
        cookie = await on_page(browser, lambda d: d.get_cookie("__Host-sealgate-console"))
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        status, body = await asyncio.to_thread(fetch, href, cookie, w.ca_file)
        assert status == 200 and body == PDF
        await on_page(browser, lambda d: search(d, "recipient", "audit@tls.test"))
        csrf = await on_page(
            browser, lambda d: d.find_element(By.NAME, "csrf").get_attribute("value")
        )
        status, body = await asyncio.to_thread(
            fetch, base + "/exports", cookie, w.ca_file, {"csrf": csrf, "selected": [with_pdf]}
        )
        assert status == 200
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            z.extractall(tmp_path / "export")
        root = tmp_path / "export" / "sealgate-export"
        assert (root / f"messages/{with_pdf}.eml").read_bytes() == pdf_message()
        checked = subprocess.run(
            ["/usr/bin/python3", "-I", "verify.py"], cwd=root, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert checked.returncode == 0 and "FAILED" not in checked.stdout, checked.stdout
        await sign_out(browser)

        # -- the admin: a hold by search covers a message that arrives afterwards ------
        page = await sign_in_with_provider(browser, base, "adam")
        assert "adam@clinic.test" in page and "Retention" in page
        await on_page(browser, lambda d: search(d, "domain", "tls.test"))

        def hold_by_search(d):
            d.find_element(By.ID, "case").send_keys("Roe v. Clinic")
            press(d, "button[name=by_search]")

        await on_page(browser, hold_by_search)
        page = await source(browser)
        assert "Roe v. Clinic" in page and "now and later" in page
        later = await w.send(["late@tls.test"], subject="Follow-up")
        await on_page(browser, lambda d: search(d, "recipient", "late@tls.test"))
        page = await source(browser)
        assert f"/messages/{later}" in page and '<span class="tag">held</span>' in page
        await sign_out(browser)

        # -- vouched for, but no role: refused and recorded ----------------------------
        page = await sign_in_with_provider(browser, base, "nora")
        assert "Sign-in refused" in page and "no console role" in page

        # -- a local account with TOTP; wrong codes lock it ---------------------------
        local = await w.account("breakglass", ("auditor", "admin"))

        def local_sign_in(d, code: str):
            d.get(base + "/signin")
            d.find_element(By.ID, "name").send_keys("breakglass")
            d.find_element(By.ID, "password").send_keys(PASSWORD)
            d.find_element(By.ID, "code").send_keys(code)
            press(d, "form[action='/signin'] button")

        await on_page(browser, lambda d: local_sign_in(d, pyotp.TOTP(local.secret).now()))
        page = await source(browser)
        assert "Sign out" in page and "breakglass" in page
        await sign_out(browser)
        wrong = "000000" if pyotp.TOTP(local.secret).now() != "000000" else "111111"
        for _ in range(2):
            await on_page(browser, lambda d: local_sign_in(d, wrong))
            assert "Sign-in failed" in await source(browser)
        await on_page(
            browser, lambda d: local_sign_in(d, pyotp.TOTP(local.secret).at(time.time() + 30))
        )
        assert "Sign-in failed" in await source(browser)  # locked: even the right code

        # -- everything above is on the access-record page ---------------------------
        page = await sign_in_with_provider(browser, base, "adam")
        await on_page(browser, lambda d: d.get(base + "/access"))
        page = await source(browser)
        for seen in (
            "ana@clinic.test (clinic-idp:ana",
            "ivan@clinic.test (clinic-idp:ivan",
            "view-evidence",
            ">view<",
            ">download<",
            ">export<",
            ">denied<",
            ">signin<",
            ">signin-failed<",
            "nora@clinic.test",
            "breakglass (local:breakglass",
        ):
            assert seen in page, seen
        assert ">hold<" in page
        await shoot(browser, "access")
    finally:
        await provider.stop()
