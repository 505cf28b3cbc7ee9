"""The console's HTTP rules without a browser: no page or data without a session,
the role checks on every route, CSRF, the security headers and a CSP that allows no
script, local sign-in with password and TOTP (wrong codes lock, a code is used once),
sessions that end when idle, and the access record of it all."""

from __future__ import annotations

import re
import time
import urllib.parse

import pyotp
import pytest

from gateway.archive.api import ALLOWED
from gateway.console.web import may
from tests.support.clock import Clock
from tests.support.console import PASSWORD, csrf_of

PUBLIC = {"/static/console.css", "/", "/signin", "/oidc/callback", "/oidc/{provider}", "/signout"}


def routes(gw) -> list[tuple[str, str, str]]:
    """(method, path, what it needs) of every route the console serves."""
    out = []
    for route in gw.console.console.app().router.routes():
        path = route.resource.canonical
        if route.method == "HEAD":
            continue
        need = getattr(route.handler, "need", None)
        if path in PUBLIC:
            assert need is None
            continue
        assert need is not None, f"{route.method} {path} is not behind sign-in and a role"
        out.append((route.method, path, need))
    return out


def concrete(path: str, queue_id: str) -> str:
    return path.replace("{queue_id}", queue_id).replace("{n}", "1")


async def test_no_page_or_data_without_a_session(console):
    w = await console()
    anonymous = w.browser()
    for method, path, _ in routes(w.gw):
        url = concrete(path, w.queue_id)
        if method == "GET":
            status, _, r = await anonymous.get(url)
            assert status == 303 and r.headers["Location"].startswith("/signin?next="), url
        else:
            status, body, _ = await anonymous.post(url, {"case": "x", "sender": "a@b.c"}, "x")
            assert status == 401, url
            assert w.queue_id.encode() not in body
    status, page, r = await anonymous.get("/signin")
    assert status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe" not in csp
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-") and "Secure" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    with pytest.raises(AssertionError):
        csrf_of("")  # (the helper finds nothing where nothing is)


async def test_every_route_checks_the_role(console):
    w = await console()
    people = {role: await w.signed_in(role) for role in ALLOWED}
    with_csrf = 0
    for method, path, need in routes(w.gw):
        url = concrete(path, w.queue_id)
        for role, person in people.items():
            if method == "GET":
                status, page, _ = await person.get(url)
            else:
                status, body, _ = await person.post(url, {"sender": "", "case": ""})
                page = body.decode()
                with_csrf += 1
            allowed = may(frozenset({role}), need)
            if allowed:
                assert status != 403 and status < 500, (role, method, url, page[:500])
            else:
                assert status == 403 and "Your role does not allow" in page, (role, method, url)
            assert "<script" not in page.lower()
    assert with_csrf
    auditor = people["auditor"]
    status, page, _ = await auditor.get("/access?action=denied")
    assert "denied" in page and "auditor-1" in page  # refusals are recorded


async def test_csrf_is_refused_and_changes_nothing(console):
    w = await console()
    admin = await w.signed_in("admin")
    status, body, _ = await admin.post(
        "/holds", {"case": "Case 1", "selected": w.queue_id}, csrf="forged"
    )
    assert status == 403 and b"too old" in body
    status, page, _ = await admin.get("/holds")
    assert "Case 1" not in page and "No legal holds" in page
    async with admin.http.post(
        admin.base + "/signin",
        data=b"csrf=x&name=\xff\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 400  # not a form: the client's mistake
    status, _, r = await admin.post("/holds", {"case": "Case 1", "selected": w.queue_id})
    assert status == 303 and r.headers["Location"] == "/holds"
    status, page, _ = await admin.get("/holds")
    assert "Case 1" in page


async def test_a_nul_character_in_an_address_or_a_form_is_a_400_and_changes_nothing(console):
    """No name, id or search field holds NUL (PostgreSQL's text refuses it): a page
    address or a form with one is the client's mistake."""
    w = await console()
    admin = await w.signed_in("admin")
    status, page, _ = await admin.get("/search?sender=dr%00@clinic.test")
    assert status == 400 and "NUL character" in page
    status, body, _ = await admin.post("/holds", {"case": "Case\x001", "selected": w.queue_id})
    assert status == 400 and b"NUL character" in body
    status, page, _ = await admin.get("/holds")
    assert "No legal holds" in page


async def test_local_sign_in_needs_password_and_code_wrong_ones_lock(console):
    w = await console(**{"console.max_failures": 3})
    ana = await w.account("ana", ("auditor",))
    status, page = await ana.sign_in(
        code="000000" if pyotp.TOTP(ana.secret).now() != "000000" else "111111"
    )
    assert status == 401 and "name, password or code is wrong" in page
    status, page = await ana.sign_in(password="not the password at all")
    assert status == 401
    # an unknown account gets the same answer
    nobody = w.browser()
    nobody.name, nobody.secret = "nobody", pyotp.random_base32()
    status, other = await nobody.sign_in()
    assert status == 401 and "name, password or code is wrong" in other
    status, page = await ana.sign_in(code="123")  # the third failure locks
    assert status == 401
    status, page = await ana.sign_in()  # right, but locked
    assert status == 401 and "/signout" not in page
    Clock.install(w.gw.console.data.store).advance(901)
    status, page = await ana.sign_in()
    assert status == 200 and 'action="/signout"' in page and "ana" in page
    value = w.gw.metrics.registry.get_sample_value
    assert value("sealgate_console_signins_total", {"method": "local", "outcome": "wrong"}) == 3
    assert value("sealgate_console_signins_total", {"method": "local", "outcome": "locked"}) == 1
    assert value("sealgate_console_signins_total", {"method": "local", "outcome": "refused"}) == 1
    assert value("sealgate_console_signins_total", {"method": "local", "outcome": "right"}) == 1
    admin = await w.signed_in("admin")
    status, page, _ = await admin.get("/access?action=signin-failed")
    assert page.count("signin-failed") >= 5 and "nobody (local" in page
    status, page, _ = await admin.get("/access?action=signin")
    assert "ana (local:ana" in page


async def test_a_code_is_accepted_once(console):
    w = await console()
    ana = await w.account("ana", ("auditor",))
    code = pyotp.TOTP(ana.secret).now()
    status, _ = await ana.sign_in(code=code)
    assert status == 200
    again = w.browser()
    again.name, again.secret = ana.name, ana.secret
    status, page = await again.sign_in(code=code)  # replayed within its 30 s
    assert status == 401


async def test_sessions_end_when_idle_and_at_sign_out(console):
    w = await console(**{"console.idle_timeout": "10m"})
    auditor = await w.signed_in("auditor")
    assert (await auditor.get("/overview"))[0] == 200
    clock = Clock.install(w.gw.console.data.store)
    clock.advance(599)
    assert (await auditor.get("/overview"))[0] == 200  # seen: kept alive
    clock.advance(601)
    status, _, r = await auditor.get("/overview")
    assert status == 303 and r.headers["Location"].startswith("/signin")
    other = await w.signed_in("investigator")
    status, _, r = await other.post("/signout", {})
    assert status == 303 and r.headers["Location"] == "/signin"
    assert (await other.get("/overview"))[0] == 303


async def test_pages_show_what_each_role_may_see(console):
    w = await console()
    auditor = await w.signed_in("auditor")
    status, page, _ = await auditor.get(f"/messages/{w.queue_id}")
    assert status == 200
    assert "audit@tls.test" in page  # the Bcc recipient, from the envelope
    assert "TLSv1.3" in page and "pkix" in page and "mx.tls.test" in page
    assert "Read the message" not in page  # no content for an auditor
    assert "Lab results" not in page  # not even the subject
    status, page, _ = await auditor.get(f"/messages/{w.queue_id}/content")
    assert status == 403
    investigator = await w.signed_in("investigator")
    status, page, _ = await investigator.get(f"/messages/{w.queue_id}")
    assert "Read the message" in page
    status, page, _ = await investigator.get(f"/messages/{w.queue_id}/content")
    assert status == 200 and "Hello." in page
    status, page, _ = await auditor.get(f"/access?queue_id={w.queue_id}")
    assert re.search(r"investigator-1 \(local:investigator-1.*view<", page)
    assert "view-evidence" in page


async def test_counting_days_ahead_survives_a_full_disk(console):
    import datetime
    import sqlite3

    from structlog.testing import capture_logs

    w = await console()
    data = w.gw.console.data
    kept = await data.run(data.settled_days_missing, time.time(), 400)
    assert kept == []  # the archive began today: no finished day to count

    def full(day):
        raise sqlite3.OperationalError("database or disk is full")

    data.settled_days_missing = lambda now, days: [datetime.date(2026, 1, 5)]
    data.keep_day = full
    with capture_logs() as logs:
        await w.gw.console.keep_days()  # logged, not raised
    assert any(
        e["event"] == "console.error" and e["error_type"] == "OperationalError" for e in logs
    )
    auditor = await w.signed_in("auditor")
    assert (await auditor.get("/overview"))[0] == 200
    await w.gw.stop()  # and the daemon stops cleanly


async def test_sign_in_returns_only_to_a_page_of_the_console(console):
    w = await console()
    for target, lands in (
        ("/search?domain=tls.test", "/search?domain=tls.test"),
        ("//evil.test/x", "/overview"),
        ("/\\evil.test/x", "/overview"),
        ("https://evil.test/", "/overview"),
        ("/%0d%0aSet-Cookie:x", "/%0d%0aSet-Cookie:x"),  # a path, as written: still here
    ):
        person = await w.account(f"p{abs(hash(target)) % 10**6}", ("auditor",))
        status, page, _ = await person.get("/signin?" + urllib.parse.urlencode({"next": target}))
        form = {
            "csrf": csrf_of(page),
            "name": person.name,
            "password": PASSWORD,
            "code": pyotp.TOTP(person.secret).now(),
            "next": target,
        }
        async with person.http.post(person.base + "/signin", data=form, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == lands, (target, r.headers)
