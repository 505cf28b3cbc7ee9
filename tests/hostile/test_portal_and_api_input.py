"""Attacks on the portal and the archive API: simultaneous wrong codes cannot get
past the lockout, hostile attachment names download safely, and the archive API
answers bad input with 400 and a problem description instead of guessing."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import quote

from tests.conftest import make_message, smtp_client
from tests.support.archive_api import call, journaled
from tests.support.archive_api import config as api_config
from tests.support.portal import request_code

PORTAL_ONLY = "version: 1\ndefaults: {modes: [portal], fallback: hold}\n"


async def test_simultaneous_wrong_codes_cannot_overshoot_the_lockout(portal):
    gw, plain, link, http, queue_id = await portal(
        PORTAL_ONLY, **{"portal.requests_per_minute": 1000, "portal.max_code_attempts": 5}
    )
    csrf, right = await request_code(http, link, plain)
    wrong = str((int(right) + 1) % 10**8).zfill(8)

    async def attempt():
        async with http.post(link + "/login", data={"csrf": csrf, "code": wrong}) as r:
            return await r.text()

    pages = await asyncio.gather(*(attempt() for _ in range(30)))
    assert sum("locked" in p.lower() for p in pages) >= 25
    assert gw.metrics.portal_failed_codes._value.get() == 5
    assert gw.metrics.portal_lockouts._value.get() == 1
    (item,) = gw.portal.store.items_of(queue_id)
    assert gw.portal.store.item_by_id(item.id).state(time.time()) == "locked"
    # the right code does not open a locked link
    async with http.post(link + "/login", data={"csrf": csrf, "code": right}) as r:
        assert "Biopsy" not in await r.text()


def with_attachments(names: list[str]) -> bytes:
    """A message with a PDF per name, each name in RFC 2231 form (so a CR LF can be
    in it, as a hostile sender would put it)."""
    parts = [
        "--b\r\nContent-Type: text/plain\r\n\r\nSee the files.\r\n",
        *(
            f"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
            f"filename*=utf-8''{quote(name, safe='')}\r\n\r\nfile {n}\r\n"
            for n, name in enumerate(names)
        ),
    ]
    head = (
        "From: doctor@clinic.test\r\nTo: p@plain.test\r\nSubject: Biopsy\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    return (head + "".join(parts) + "--b--\r\n").encode()


async def test_hostile_attachment_names_download_with_safe_names(portal):
    names = ["a\r\nSet-Cookie: x=1.pdf", "../../etc/passwd", 'résumé "final".pdf']
    gw, plain, link, http, _ = await portal(PORTAL_ONLY, message=with_attachments(names))
    csrf, code = await request_code(http, link, plain)
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        page = await r.text()
    assert "passwd" in page and "etc/passwd" not in page
    dispositions = []
    for n in (2, 3, 4):
        async with http.get(f"{link}/part/{n}") as r:
            assert r.status == 200, await r.text()
            assert await r.read() == f"file {n - 2}".encode()
            dispositions.append(r.headers["Content-Disposition"])
            assert "Set-Cookie" not in r.headers
    assert dispositions[0].startswith('attachment; filename="a__Set-Cookie_ x=1.pdf"')
    assert dispositions[1].startswith('attachment; filename="passwd"')
    assert dispositions[2].endswith("filename*=UTF-8''r%C3%A9sum%C3%A9%20_final_.pdf")


async def test_archive_api_refuses_bad_input_with_a_problem_description(gateway_factory):
    gw = await gateway_factory(api_config())
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("doctor@clinic.test", ["p@dest.test"], make_message())
    queue_id = reply.rsplit(" ", 1)[1]
    await journaled(gw, 1)

    async def problem(method, path, body=None):
        status, headers, raw = await call(gw, method, path, "admin", body)
        assert status == 400, raw
        assert headers["Content-Type"] == "application/problem+json"
        found = json.loads(raw)
        assert found["status"] == 400 and found["title"] == "Bad Request"
        return found["detail"]

    # a string is not a list of ids (it was split into characters and held)
    assert "queue_ids" in await problem("POST", "/archive/holds", {"case": "c", "queue_ids": "ABC"})
    assert "not in the archive" in await problem(
        "POST", "/archive/holds", {"case": "c", "queue_ids": [queue_id, "B" * 16]}
    )
    assert "case" in await problem("POST", "/archive/holds", {"case": 7, "queue_ids": [queue_id]})
    assert "query" in await problem("POST", "/archive/holds", {"case": "c", "query": "x"})
    assert "sender" in await problem(
        "POST", "/archive/holds", {"case": "c", "query": {"sender": 1}}
    )
    for limit in ("-1", "0", "x", "100001", "1e3"):
        assert "limit" in await problem("GET", f"/archive/search?limit={limit}")
    status, _, body = await call(gw, "GET", "/archive/holds", "auditor")
    assert json.loads(body)["cases"] == []  # nothing was held by the bad requests
    status, _, body = await call(gw, "GET", "/archive/search?limit=1", "auditor")
    assert status == 200 and len(json.loads(body)["messages"]) == 1
