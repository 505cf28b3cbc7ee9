"""The portal end to end in a real browser: Debian's headless Chromium, driven by
Selenium through chromium-driver, against the portal on loopback over HTTPS with the
test CA.  A recipient whose MX has no STARTTLS gets a notification without the
subject or body; the browser follows the link, the code arrives in a second message,
is entered, the message and its attachment are shown and downloaded; the reply
reaches the sender and the archive; wrong codes lock the link; revoked and expired
links show a clear page and no content.  A screenshot at phone width is kept in
test-artifacts/."""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from pathlib import Path

from selenium.webdriver.common.by import By

from gateway.archive.query import Query
from tests.conftest import run_sealgate, smtp_client
from tests.support.archive import archive_of
from tests.support.browser import (
    on_page,
    press,
    source,
    start_portal,
    title,
    world_with_plain_recipient,
)
from tests.support.clock import Clock
from tests.support.portal import code_in, link_in
from tests.support.world import wait_until

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
SECRET = "The margins are clear"


def message() -> bytes:
    pdf = base64.encodebytes(PDF).replace(b"\n", b"\r\n")
    png = base64.encodebytes(PNG).replace(b"\n", b"\r\n")
    return (
        b"From: Dr Who <doctor@clinic.test>\r\nTo: patient@plain.test\r\n"
        b"Subject: Biopsy result for J. Roe\r\nMessage-ID: <m1@clinic.test>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b'--b1\r\nContent-Type: multipart/related; boundary="b2"\r\n\r\n'
        b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b'<p><img src="cid:logo@clinic" alt="clinic logo"></p><p>' + SECRET.encode() + b".</p>"
        b'<script>document.title="pwned"</script><img src="https://tracker.test/p.gif">\r\n'
        b"--b2\r\nContent-Type: image/png\r\nContent-ID: <logo@clinic>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + png + b"--b2--\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="pathology.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf + b"--b1--\r\n"
    )


async def send(gw) -> str:
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("doctor@clinic.test", ["patient@plain.test"], message())
    return reply.rsplit(" ", 1)[1]


async def test_pickup_download_reply_in_a_browser(
    gateway_factory, world, pki, portal_cert, browser, tmp_path
):
    plain, clinic = await world_with_plain_recipient(world)
    gw = await start_portal(gateway_factory, world, pki, portal_cert)
    queue_id = await send(gw)
    await wait_until(lambda: plain.received, what="the notification")
    (note,) = plain.received
    assert note.rcpt_tos == ["patient@plain.test"] and note.tls_version is None
    for secret in (b"Biopsy", b"J. Roe", b"margins", b"pathology"):
        assert secret not in note.data  # neither the subject nor the body
    assert b"Example Clinic" in note.data and b"You have a secure message" in note.data
    link = link_in(note.data)

    await on_page(browser, lambda d: d.get(link))
    assert "secure message" in (await title(browser)).lower()
    assert SECRET not in await source(browser)
    await on_page(browser, lambda d: press(d, "button"))
    await wait_until(lambda: len(plain.received) == 2, what="the code message")
    code = code_in(plain.received[1].data)
    assert b"Biopsy" not in plain.received[1].data
    field = await on_page(browser, lambda d: d.find_element(By.ID, "code"))
    assert await on_page(browser, lambda d: field.get_attribute("autocomplete")) == (
        "one-time-code"
    )

    def sign_in(d):
        d.find_element(By.ID, "code").send_keys(code)
        press(d, "form[action$='/login'] button")

    await on_page(browser, sign_in)
    assert SECRET in await on_page(browser, lambda d: d.find_element(By.CLASS_NAME, "body").text)
    assert (await title(browser)).startswith("Biopsy result for J. Roe")  # no script ran
    assert "tracker.test" not in await source(browser)
    width = await on_page(
        browser,
        lambda d: d.execute_script(
            "return arguments[0].naturalWidth", d.find_element(By.CSS_SELECTOR, ".body img")
        ),
    )
    assert width == 1  # the cid: image, served by the portal

    # the attachment, downloaded with the browser's session: the same bytes
    href = await on_page(
        browser, lambda d: d.find_element(By.LINK_TEXT, "pathology.pdf").get_attribute("href")
    )
    session = await on_page(browser, lambda d: d.get_cookie("__Host-sealgate-session"))
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    request = urllib.request.Request(
        href, headers={"Cookie": f"{session['name']}={session['value']}"}
    )

    def fetch():
        with urllib.request.urlopen(request, context=context, timeout=10) as r:  # noqa: S310
            return r.read(), r.headers

    body, headers = await asyncio.to_thread(fetch)  # the portal runs on this event loop
    assert body == PDF
    assert "script-src" not in headers["Content-Security-Policy"]  # no scripts at all
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"] == 'attachment; filename="pathology.pdf"'

    # at phone width the page fits and is kept as an artefact
    await on_page(browser, lambda d: d.set_window_size(390, 844))
    width = await on_page(
        browser, lambda d: d.execute_script("return document.documentElement.scrollWidth")
    )
    assert width <= 390
    ARTIFACTS.mkdir(exist_ok=True)
    shot = str(ARTIFACTS / "portal-message-phone.png")
    assert await on_page(browser, lambda d: d.save_screenshot(shot))

    # a secure reply with a file goes to the sender through the gateway
    upload = tmp_path / "consent.txt"
    upload.write_bytes(b"I agree to the follow-up.\n")

    def reply(d):
        d.find_element(By.ID, "text").send_keys("Thank you, see you Tuesday.")
        d.find_element(By.ID, "files").send_keys(str(upload))
        press(d, "form[action$='/reply'] button")

    await on_page(browser, reply)
    assert "Reply sent" in await title(browser)
    await wait_until(lambda: clinic.received, what="the reply at the sender's server")
    (answer,) = clinic.received
    assert answer.rcpt_tos == ["doctor@clinic.test"] and answer.tls_version  # verified TLS
    assert b"Reply-To: patient@plain.test" in answer.data
    assert b"Subject: Re: Biopsy result for J. Roe" in answer.data
    assert b"Thank you, see you Tuesday." in answer.data
    assert base64.b64encode(b"I agree to the follow-up.\n") in answer.data
    with archive_of(gw) as archive:
        await wait_until(
            lambda: archive.search(Query(recipient="doctor@clinic.test")), what="reply archived"
        )
        # every step is in the access record of the original message
        await wait_until(
            lambda: (
                {"view", "download", "reply"}
                <= {e["body"]["action"] for e in archive.events(queue_id, ("access",))}
            ),
            what="access records",
        )
        actions = [e["body"]["action"] for e in archive.events(queue_id, ("access",))]
    assert actions[:2] == ["code-sent", "signed-in"]
    registry = gw.metrics.registry
    assert registry.get_sample_value("sealgate_portal_notifications_total") == 1
    assert registry.get_sample_value("sealgate_portal_pickups_total") == 1
    assert registry.get_sample_value("sealgate_portal_replies_total") == 1


async def test_wrong_codes_lock_the_link(gateway_factory, world, pki, portal_cert, browser):
    plain, _ = await world_with_plain_recipient(world)
    gw = await start_portal(
        gateway_factory, world, pki, portal_cert, **{"portal.max_code_attempts": 3}
    )
    await send(gw)
    await wait_until(lambda: plain.received, what="the notification")
    link = link_in(plain.received[0].data)
    await on_page(browser, lambda d: d.get(link))
    await on_page(browser, lambda d: press(d, "button"))
    await wait_until(lambda: len(plain.received) == 2, what="the code")
    code = code_in(plain.received[1].data)
    wrong = str((int(code) + 1) % 10**8).zfill(8)

    def enter(value):
        def action(d):
            d.find_element(By.ID, "code").send_keys(value)
            press(d, "form[action$='/login'] button")

        return action

    for _ in range(2):
        await on_page(browser, enter(wrong))
        alert = await on_page(
            browser, lambda d: d.find_element(By.CSS_SELECTOR, "[role=alert]").text
        )
        assert "not right" in alert
    await on_page(browser, enter(wrong))
    assert "This link is locked" in await source(browser)
    await on_page(browser, lambda d: d.get(link))  # the right code cannot help now
    page = await source(browser)
    assert "This link is locked" in page and SECRET not in page
    assert gw.metrics.registry.get_sample_value("sealgate_portal_lockouts_total") == 1
    assert gw.metrics.registry.get_sample_value("sealgate_portal_failed_codes_total") == 3


async def test_revoked_and_expired_links_say_so_and_show_nothing(
    gateway_factory, world, pki, portal_cert, browser, tmp_path
):
    plain, _ = await world_with_plain_recipient(world)
    gw = await start_portal(gateway_factory, world, pki, portal_cert, **{"portal.expiry": "3s"})
    revoked_id = await send(gw)
    await wait_until(lambda: plain.received, what="the first notification")
    await send(gw)
    await wait_until(lambda: len(plain.received) == 2, what="the second notification")
    first, second = (link_in(m.data) for m in plain.received)
    done = await asyncio.to_thread(
        run_sealgate, "portal", "revoke", revoked_id, "--config", str(tmp_path / "config.yaml")
    )
    assert done.returncode == 0 and "revoked" in done.stdout, done.stderr
    await on_page(browser, lambda d: d.get(first))
    page = await source(browser)
    assert "This message was withdrawn" in page
    assert SECRET not in page and "button" not in page
    Clock.install(gw.portal.store).advance(3.2)  # the second one's expiry has passed
    await on_page(browser, lambda d: d.get(second))
    page = await source(browser)
    assert "This message has expired" in page and SECRET not in page
    await on_page(browser, lambda d: d.get(first.rsplit("/", 1)[0] + "/not-a-token"))
    assert "This link is not valid" in await source(browser)
