"""The message API (/api/v1) on the HTTPS API listener, with keys of each scope:
a message submitted as JSON or raw is stored before the 202, decided, archived and
delivered like one from SMTP, with the same per-recipient outcomes; its status shows
each recipient's decision and evidence; an idempotent retry sends once; errors are
RFC 9457 problem details; a send key revokes only its own portal items; admins act
on the queue and the key directory; every call is in the archive's access record."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from tests.conftest import make_message, smtp_client
from tests.support import api
from tests.support.delivery import state
from tests.support.documents import PDF_TYPE, slow_pdf, with_attachment
from tests.support.http import http_get
from tests.support.world import wait_until

ROOT = Path(__file__).resolve().parents[2]

MESSAGE = {
    "from": "doctor@clinic.test",
    "to": ["a@dest.test"],
    "cc": [{"address": "b@dest.test", "name": "B. Roe"}],
    "bcc": ["c@dest.test"],
    "subject": "Lab results",
    "text": "The results are attached.",
    "attachments": [
        {
            "filename": "results.txt",
            "content_type": "text/plain",
            "content": base64.b64encode(b"all normal").decode(),
        }
    ],
    "headers": {"X-Ehr-Reference": "visit-42"},
}


async def start(gateway_factory, world, **overrides):
    await_mta = await world.mta("mx.dest.test", "127.0.0.31")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await gateway_factory(
        world.config({"delivery.retry_schedule": ["1h"], **api.config(), **overrides})
    )
    return gw, await_mta


def outcomes(gw, queue_id):
    return {
        r["address"]: (r["state"], r["mode"], (r["decision"] or {}).get("rule"))
        for r in _status_rows(gw, queue_id)
    }


def _status_rows(gw, queue_id):
    decisions = gw.queue.store.decisions(queue_id)
    return [
        {
            "address": r.address,
            "state": r.state.value,
            "mode": decisions.get(r.idx, {}).get("mode"),
            "decision": decisions.get(r.idx),
        }
        for r in gw.queue.store.recipients(queue_id)
    ]


async def test_a_json_message_is_stored_decided_archived_and_delivered_like_smtp(
    gateway_factory, world
):
    gw, mx = await start(gateway_factory, world)
    status, headers, body = await api.call(gw, "POST", "/api/v1/messages", "ehr", MESSAGE)
    assert status == 202, body
    queue_id = body["id"]
    assert headers["Location"] == f"/api/v1/messages/{queue_id}"
    await wait_until(lambda: len(mx.received) == 1, what="delivery")
    (received,) = mx.received
    assert sorted(received.rcpt_tos) == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert received.mail_from == "doctor@clinic.test"
    text = received.data.decode()
    assert "Subject: Lab results" in text and "X-Ehr-Reference: visit-42" in text
    assert "c@dest.test" not in text.split("\r\n\r\n")[0]  # Bcc is not written
    assert "with HTTPS id " + queue_id in text and 'filename="results.txt"' in text
    await wait_until(lambda: gw.queue.store.message(queue_id)["done"], what="done")

    status, _, shown = await api.call(gw, "GET", f"/api/v1/messages/{queue_id}", "status")
    assert status == 200 and shown["done"] and shown["sender"] == "doctor@clinic.test"
    first = shown["recipients"][0]
    assert (first["address"], first["state"], first["status"], first["mode"]) == (
        "a@dest.test",
        "delivered",
        "2.0.0",
        "tls",
    )
    assert first["decision"]["rule"] and first["evidence"][0]["outcome"] == "delivered"
    assert first["evidence"][0]["evidence"]["verification"] == "pkix"

    # the same message by SMTP: the same outcome for every recipient
    async with smtp_client(gw) as client:
        await client.sendmail(
            "doctor@clinic.test",
            ["a@dest.test", "b@dest.test", "c@dest.test"],
            make_message("Lab results", "The results are attached."),
        )
    await wait_until(lambda: len(mx.received) == 2, what="the SMTP copy")
    smtp_id = next(q for q in _queue_ids(gw) if q != queue_id)
    await wait_until(lambda: gw.queue.store.message(smtp_id)["done"], what="done")
    assert outcomes(gw, smtp_id) == outcomes(gw, queue_id)
    for q in (queue_id, smtp_id):
        await wait_until(lambda q=q: gw.archive.archive.has_content(q), what="archived")

    def submitted() -> list[dict]:
        return [a for a in gw.archive.archive.access_log() if a.get("action") == "api-submit"]

    # (the archive writes its records in batches, lingering under load)
    await wait_until(submitted, what="the submission's access record")
    accessed = submitted()
    assert accessed and accessed[0]["actor"].startswith("ehr (api ")
    assert accessed[0]["queue_id"] == queue_id


def _queue_ids(gw):
    rows = gw.queue.store._db.execute("SELECT queue_id FROM messages").fetchall()
    return [r[0] for r in rows]


async def test_a_raw_message_takes_its_envelope_from_the_query_or_its_headers(
    gateway_factory, world
):
    gw, mx = await start(gateway_factory, world)
    raw = b"From: doctor@clinic.test\nTo: a@dest.test\nBcc: c@dest.test\nSubject: Raw\n\nHello\n"
    # the TLS of the trace and the evidence is the connection's, not a client's say
    headers = {"Content-Type": "message/rfc822", "X-Sealgate-Tls-Version": "SSLv2"}
    status, _, body = await api.call(
        gw, "POST", "/api/v1/messages", "ehr", data=raw, headers=headers
    )
    assert status == 202, body
    path = "/api/v1/messages?from=billing%40clinic.test&to=b%40dest.test&to=a%40dest.test"
    status, _, second = await api.call(gw, "POST", path, "ehr", data=raw, headers=headers)
    assert status == 202, second
    await wait_until(lambda: len(mx.received) == 2, what="both")
    by_sender = {m.mail_from: m for m in mx.received}
    first = by_sender["doctor@clinic.test"]
    assert sorted(first.rcpt_tos) == ["a@dest.test", "c@dest.test"]
    assert b"Bcc:" not in first.data and b"\r\nSubject: Raw\r\n" in first.data  # CRLF now
    assert b"(using TLSv1.3 with cipher " in first.data and b"SSLv2" not in first.data
    assert sorted(by_sender["billing@clinic.test"].rcpt_tos) == ["a@dest.test", "b@dest.test"]


async def test_an_idempotent_retry_sends_once(gateway_factory, world):
    gw, mx = await start(gateway_factory, world)
    key = {"Idempotency-Key": "order-7781"}
    first = await api.call(gw, "POST", "/api/v1/messages", "ehr", MESSAGE, headers=key)
    again = await api.call(gw, "POST", "/api/v1/messages", "ehr", MESSAGE, headers=key)
    assert first[0] == again[0] == 202 and first[2]["id"] == again[2]["id"]
    assert again[1]["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first[1]
    other = await api.call(gw, "POST", "/api/v1/messages", "crm", MESSAGE, headers=key)
    assert other[0] == 202 and other[2]["id"] != first[2]["id"]  # keys are per API key
    changed = dict(MESSAGE, subject="Another")
    status, _, problem = await api.call(gw, "POST", "/api/v1/messages", "ehr", changed, headers=key)
    assert status == 422 and "Idempotency-Key" in problem["detail"]
    await wait_until(lambda: len(mx.received) == 2, what="two messages, not three")
    assert len(_queue_ids(gw)) == 2


async def test_errors_are_problem_details(gateway_factory, world):
    overrides = {"relay.sender_domains": ["clinic.test"], "smtp.max_recipients": 100}
    gw, _ = await start(gateway_factory, world, **overrides)
    cases = [
        ("POST", "/api/v1/messages", None, MESSAGE, 401),
        ("POST", "/api/v1/messages", "old", MESSAGE, 401),  # expired
        ("POST", "/api/v1/messages", "sgk_wrong", MESSAGE, 401),
        ("POST", "/api/v1/messages", "status", MESSAGE, 403),  # no send scope
        ("POST", "/api/v1/messages", "ehr", dict(MESSAGE, to="a@dest.test"), 422),
        ("POST", "/api/v1/messages", "ehr", dict(MESSAGE, **{"from": "x@other.test"}), 403),
        ("POST", "/api/v1/messages", "ehr", dict(MESSAGE, to=["not an address"]), 422),
        ("POST", "/api/v1/messages", "ehr", dict(MESSAGE, unknown=1), 422),
        ("GET", "/api/v1/messages/NOSUCHID", "status", None, 404),
        ("DELETE", "/api/v1/messages", "ehr", None, 405),
        ("GET", "/api/v1/nothing", "ehr", None, 404),
        ("POST", "/api/v1/messages/NOSUCHID/hold", "ehr", None, 403),
        ("POST", "/api/v1/messages/NOSUCHID/hold", "ops", None, 404),
    ]
    for method, path, key, body, expected in cases:
        status, headers, problem = await api.call(gw, method, path, key, body)
        assert status == expected, (method, path, key, status, problem)
        assert headers["Content-Type"] == "application/problem+json"
        assert problem["status"] == expected and problem["title"] and problem["detail"]
        if expected == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, problem = await api.call(
        gw, "POST", "/api/v1/messages", "ehr", data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    too_many = dict(MESSAGE, to=[f"r{i}@dest.test" for i in range(101)])
    status, _, problem = await api.call(gw, "POST", "/api/v1/messages", "ehr", too_many)
    assert status == 422 and "more than 100 recipients" in problem["detail"]

    def denied() -> list[dict]:
        return [a for a in gw.archive.archive.access_log() if a.get("status") == 403]

    # refused calls are recorded too (in the archive's next batch)
    await wait_until(denied, what="the refused calls' access records")


async def test_admins_act_on_the_queue_and_the_key_directory(gateway_factory, world, tmp_path):
    from tests.support.smime_pki import mailbox

    gw, _ = await start(gateway_factory, world, **{"delivery.smart_host": None})
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")  # nothing answers there
    world.dns.add("mx.slow.test", "A", "127.0.0.39")
    status, _, body = await api.call(
        gw, "POST", "/api/v1/messages", "ehr", dict(MESSAGE, to=["r@slow.test"], cc=[], bcc=[])
    )
    queue_id = body["id"]
    for action in ("hold", "release", "retry", "delete"):
        status, _, done = await api.call(gw, "POST", f"/api/v1/messages/{queue_id}/{action}", "ops")
        assert status == 200 and done == {"id": queue_id, "action": action, "done": True}
    audit = [a["action"] for a in gw.queue.store.audit(queue_id)]
    assert audit == ["hold", "release", "retry", "delete"]
    assert gw.queue.store.audit(queue_id)[0]["actor"] == "ops (api)"

    cert = mailbox("r@dest.test").pem
    status, _, imported = await api.call(
        gw,
        "POST",
        "/api/v1/keys",
        "ops",
        data=cert,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 200 and imported["imported"][0]["addresses"] == ["r@dest.test"]
    status, _, listed = await api.call(gw, "GET", "/api/v1/keys", "ops")
    assert [k["fingerprint"] for k in listed["keys"]] == [imported["imported"][0]["fingerprint"]]
    assert (await api.call(gw, "GET", "/api/v1/keys", "ehr"))[0] == 403


async def test_explain_says_what_the_policy_would_decide(gateway_factory, world):
    gw, _ = await start(gateway_factory, world)
    body = {"sender": "doctor@clinic.test", "recipients": ["a@dest.test"]}
    status, _, explained = await api.call(gw, "POST", "/api/v1/explain", "status", body)
    assert status == 200, explained
    (recipient,) = explained["recipients"]
    assert recipient["recipient"] == "a@dest.test" and recipient["decision"]["mode"] == "tls"
    assert (await api.call(gw, "POST", "/api/v1/explain", "ehr", body))[0] == 403


async def test_archive_scopes_open_the_archive_api(gateway_factory, world):
    gw, _ = await start(gateway_factory, world)
    status, _, found = await api.call(gw, "GET", "/archive/search?limit=5", "auditor")
    assert status == 200, found
    status, _, _ = await api.call(gw, "GET", "/archive/search?limit=5", "ehr")
    assert status == 401  # a send key is not an archive key


async def test_a_send_key_revokes_only_the_portal_items_of_its_own_messages(gateway_factory, world):
    plain = await world.mta("mx.plain.test", "127.0.0.93", cert=None)
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    gw, _ = await start(gateway_factory, world)
    message = dict(MESSAGE, to=["patient@plain.test"], cc=[], bcc=[])
    _, _, body = await api.call(gw, "POST", "/api/v1/messages", "ehr", message)
    queue_id = body["id"]
    await wait_until(lambda: plain.received, what="the portal notification")
    await wait_until(lambda: state(gw, queue_id)["patient@plain.test"][0] == "delivered")
    status, _, problem = await api.call(gw, "POST", f"/api/v1/messages/{queue_id}/revoke", "crm")
    assert status == 403 and "only the messages it sent" in problem["detail"]
    status, _, revoked = await api.call(gw, "POST", f"/api/v1/messages/{queue_id}/revoke", "ehr")
    assert status == 200 and len(revoked["revoked"]) == 1
    (item,) = gw.portal.store.items_of(queue_id)
    assert item.revoked is not None
    status, _, _ = await api.call(gw, "POST", f"/api/v1/messages/{queue_id}/revoke", "ehr")
    assert status == 409  # nothing left to revoke
    status, _, _ = await api.call(gw, "POST", "/api/v1/messages/NOSUCHID/revoke", "ops")
    assert status == 404


async def test_explaining_a_message_whose_document_is_slow_to_read_holds_nothing_else(
    gateway_factory, world
):
    # its PDF takes seconds to read (past the policy's scan_time: its reader is
    # killed then): meanwhile the daemon answers - it once read it on its event loop
    await world.mta("mx.dest.test", "127.0.0.31")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    strict = (ROOT / "policies" / "examples" / "hipaa-strict.yaml").read_text()
    strict = strict.replace("scan_time: 5s", "scan_time: 1s")  # it takes 4-7 s
    gw = await gateway_factory(world.config(api.config(), policy=strict))
    message = with_attachment(slow_pdf(), PDF_TYPE).decode()
    body = {"sender": "doctor@clinic.test", "recipients": ["a@dest.test"], "message": message}
    explaining = asyncio.ensure_future(api.call(gw, "POST", "/api/v1/explain", "status", body))
    waits = []
    while not explaining.done():
        started = time.monotonic()
        assert await http_get(gw, "/healthz") == (200, "ok\n")
        waits.append(time.monotonic() - started)
        await asyncio.sleep(0.2)
    status, _, explained = await explaining
    assert status == 200, explained
    phi = explained["message"]["content"]["phi"]  # unreadable: counted as PHI
    assert "took longer to read than the scan allows" in phi["error"]
    assert len(waits) >= 3 and max(waits) < 1.0, waits


async def test_a_raw_message_to_an_address_that_is_not_ascii_goes_with_smtputf8_and_8bitmime(
    gateway_factory, world
):
    gw, mx = await start(gateway_factory, world)
    raw = "From: doctor@clinic.test\nSubject: Befund\n\nGrüße\n".encode()
    path = "/api/v1/messages?to=pati%C3%ABnt%40dest.test"
    headers = {"Content-Type": "message/rfc822"}
    status, _, body = await api.call(gw, "POST", path, "ehr", data=raw, headers=headers)
    assert status == 202, body
    await wait_until(lambda: mx.received, what="the message")
    (sent,) = mx.received
    assert sent.rcpt_tos == ["patiënt@dest.test"]
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(sent.mail_options)
    assert sent.data.endswith("Grüße\r\n".encode())
