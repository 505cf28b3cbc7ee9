"""The archive API on the HTTPS API listener: bearer tokens, roles (an auditor reads
metadata and evidence, never content, and places no hold), every request recorded
in the access record, refused ones included; never in plaintext, never on the ops
listener."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

from tests.conftest import make_message, smtp_client
from tests.support.archive_api import TOKENS, call, config, journaled
from tests.support.http import http_get


async def test_roles_tokens_and_the_access_record(gateway_factory):
    gw = await gateway_factory(config())
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail(
            "doctor@clinic.test", ["p@dest.test", "bcc@dest.test"], make_message("Biopsy")
        )
    queue_id = reply.rsplit(" ", 1)[1]
    await journaled(gw, 1)

    assert (await call(gw, "GET", "/archive/search"))[0] == 401
    status, headers, _ = await call(gw, "GET", "/archive/search", token="not-a-token")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")

    # auditor: metadata and evidence, no content, no holds
    status, _, body = await call(
        gw, "GET", "/archive/search?sender=doctor@clinic.test&recipient=bcc@dest.test", "auditor"
    )
    assert status == 200
    (found,) = json.loads(body)["messages"]
    assert found["queue_id"] == queue_id and b"Biopsy" not in body
    status, _, body = await call(gw, "GET", f"/archive/messages/{queue_id}", "auditor")
    assert status == 200 and json.loads(body)["recipients"][1]["address"] == "bcc@dest.test"
    assert (await call(gw, "GET", f"/archive/messages/{queue_id}/content", "auditor"))[0] == 403
    assert (
        await call(gw, "POST", "/archive/holds", "auditor", {"case": "c1", "queue_ids": [queue_id]})
    )[0] == 403
    assert (await call(gw, "GET", f"/archive/export?queue_id={queue_id}", "auditor"))[0] == 403
    status, _, body = await call(
        gw, "GET", "/archive/search?format=csv&sender=@clinic.test", "auditor"
    )
    assert status == 200 and body.decode().count("\r\n") == 3  # header + a row per recipient

    # investigator: content and exports, no holds
    status, headers, body = await call(
        gw, "GET", f"/archive/messages/{queue_id}/content", "investigator"
    )
    assert status == 200 and body == make_message("Biopsy")
    assert headers["Content-Type"] == "message/rfc822"
    status, headers, body = await call(
        gw, "GET", f"/archive/export?queue_id={queue_id}", "investigator"
    )
    assert status == 200 and headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.read(f"sealgate-export/messages/{queue_id}.eml") == make_message("Biopsy")
    assert (
        await call(
            gw, "POST", "/archive/holds", "investigator", {"case": "c1", "queue_ids": [queue_id]}
        )
    )[0] == 403

    # admin: holds and purge, no content
    status, _, body = await call(
        gw, "POST", "/archive/holds", "admin", {"case": "Roe v. Clinic", "queue_ids": [queue_id]}
    )
    assert status == 200 and json.loads(body)["messages"] == 1
    status, _, body = await call(gw, "GET", "/archive/holds", "auditor")
    assert [c["case"] for c in json.loads(body)["cases"]] == ["Roe v. Clinic"]
    assert (await call(gw, "GET", f"/archive/messages/{queue_id}/content", "admin"))[0] == 403
    status, _, body = await call(gw, "POST", "/archive/purge", "admin", {})
    assert status == 200 and json.loads(body) == {"dry_run": True, "would_purge": []}
    status, _, body = await call(gw, "DELETE", "/archive/holds/Roe%20v.%20Clinic", "admin")
    assert status == 200 and json.loads(body)["released"] == 1
    status, _, body = await call(gw, "POST", "/archive/verify", "auditor")
    assert status == 200 and json.loads(body)["ok"] is True

    # every search, view, export and refusal is in the access record, by token name
    status, _, body = await call(gw, "GET", "/archive/access", "auditor")
    entries = [(e["actor"].split(" ")[0], e["action"]) for e in json.loads(body)["access"]]
    assert entries.count(("auditor-1", "search")) == 2
    assert ("investigator-1", "view") in entries and ("investigator-1", "export") in entries
    assert entries.count(("auditor-1", "denied")) == 3
    assert ("admin-1", "denied") in entries and ("auditor-1", "verify") in entries
    await gw.archive.refresh_gauges()
    metrics = (await http_get(gw, "/metrics"))[1]
    assert "\nsealgate_archive_searches 2.0" in metrics
    assert "\nsealgate_archive_exports 1.0" in metrics
    assert "\nsealgate_archive_last_verify_ok 1.0" in metrics
    assert "\nsealgate_archive_journaled_messages_total 1.0" in metrics


async def test_without_tokens_the_api_is_not_there(gateway_factory):
    gw = await gateway_factory({})
    assert (await call(gw, "GET", "/archive/search", token="anything"))[0] == 404


async def test_the_api_refuses_plaintext_and_the_ops_listener_does_not_route_it(gateway_factory):
    gw = await gateway_factory(config())
    host, port = gw.api.address
    # plain HTTP to the API's port: no HTTP answer, the TLS handshake fails first
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /archive/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['admin']}"
        "\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert not answer.startswith(b"HTTP/")
    assert b"messages" not in answer
    # the ops listener serves /metrics, /healthz, /readyz and nothing of the archive
    for path in ("/archive/search", "/archive/access", "/archive/messages/X/content"):
        assert (await http_get(gw, path))[0] == 404
    assert (await http_get(gw, "/readyz"))[0] == 200
    # over HTTPS, with the same token, the API answers
    status, headers, _ = await call(gw, "GET", "/archive/search", "admin")
    assert status == 200 and headers["Cache-Control"] == "no-store"


async def test_the_api_can_be_turned_off(gateway_factory):
    gw = await gateway_factory({**config(), "api.enabled": False})
    assert gw.api is None


async def test_a_nul_character_in_a_request_is_a_clear_400_and_changes_nothing(gateway_factory):
    """No id, address, search field or case name holds NUL, and PostgreSQL's text
    (a cluster's archive) refuses it: a request carrying one - in the path, the
    query or a JSON body - is the client's mistake, answered before any store."""
    gw = await gateway_factory(config())
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("doctor@clinic.test", ["p@dest.test"], make_message("x"))
    queue_id = reply.rsplit(" ", 1)[1]
    await journaled(gw, 1)
    for path in (
        "/archive/search?sender=doctor%00@clinic.test",
        f"/archive/messages/{queue_id}%00",
    ):
        status, _, body = await call(gw, "GET", path, "auditor")
        assert status == 400 and "NUL" in json.loads(body)["error"], path
    for hold in (
        {"case": "Roe\u0000", "queue_ids": [queue_id]},
        {"case": "Roe", "queue_ids": ["Q\u0000"]},
    ):
        status, _, body = await call(gw, "POST", "/archive/holds", "admin", hold)
        assert status == 400 and "NUL" in json.loads(body)["error"]
    status, _, body = await call(gw, "GET", "/archive/holds", "auditor")
    assert json.loads(body)["cases"] == []
    status, _, body = await call(gw, "GET", "/archive/search?sender=doctor@clinic.test", "auditor")
    assert status == 200 and len(json.loads(body)["messages"]) == 1
