"""With SMTP worker processes the workers serve the HTTPS API listener too: a
submission is received and stored by whichever worker took the connection (its
access record kept by the main process), everything else is forwarded to the main
process with the client's address - status, the archive API, the document; an
idempotent retry answers the same id whichever worker takes it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.error
import urllib.request

from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import wait_until

KEYS = {
    "sgk_workers-send-0123456789": ["send", "read-status"],
    "sgk_workers-audit-0123": ["archive:read"],
}
SEND, AUDIT = list(KEYS)


def call(daemon, method, path, key=None, body=None, headers=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(
        f"https://{daemon.api}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})},
    )
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20, context=ctx) as r:  # noqa: S310 - loopback
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


async def test_workers_take_submissions_and_forward_the_rest(tmp_path, world):
    mx = await world.mta("mx.dest.test", "127.0.0.41")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    keys = [
        {"name": f"key{i}", "scopes": scopes, "key_sha256": hashlib.sha256(k.encode()).hexdigest()}
        for i, (k, scopes) in enumerate(KEYS.items())
    ]
    path = write_config(
        tmp_path,
        world.config({"smtp.workers": 2, "api.keys": keys, "delivery.retry_schedule": ["1h"]}),
    )
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        message = {"from": "doctor@clinic.test", "to": ["r@dest.test"], "text": "Normal."}
        idem = {"Idempotency-Key": "visit-9"}
        answers = await asyncio.gather(
            *(
                asyncio.to_thread(call, daemon, "POST", "/api/v1/messages", SEND, message, idem)
                for _ in range(6)
            )
        )
        accepted = [a for a in answers if a[0] == 202]
        assert accepted and {a[2]["id"] for a in accepted} == {accepted[0][2]["id"]}
        assert all(a[0] in (202, 409) for a in answers), answers  # at most: in progress
        queue_id = accepted[0][2]["id"]
        await wait_until(lambda: len(mx.received) == 1, timeout=20, what="one delivery")
        await asyncio.sleep(1)
        assert len(mx.received) == 1  # never twice

        status, _, shown = await asyncio.to_thread(
            call, daemon, "GET", f"/api/v1/messages/{queue_id}", SEND
        )
        assert status == 200 and shown["id"] == queue_id  # answered by the main process
        status, headers, problem = await asyncio.to_thread(
            call, daemon, "GET", f"/api/v1/messages/{queue_id}"
        )
        assert status == 401 and headers["Content-Type"] == "application/problem+json"
        status, _, document = await asyncio.to_thread(call, daemon, "GET", "/api/openapi.json")
        assert status == 200 and document["openapi"].startswith("3.1")

        async def recorded():
            status, _, found = await asyncio.to_thread(
                call, daemon, "GET", "/archive/access", AUDIT
            )
            assert status == 200, found
            return found["access"]

        await asyncio.sleep(1)  # the worker's access record reaches the main process
        records = await recorded()
        submits = [r for r in records if r.get("action") == "api-submit"]
        statuses = [r for r in records if r.get("action") == "api-status"]
        assert submits and submits[0]["actor"] == "key0 (api 127.0.0.1)", records[:3]
        # forwarded calls are recorded with the client's address, refused ones too
        assert {r["actor"] for r in statuses} == {"key0 (api 127.0.0.1)", "no key (api 127.0.0.1)"}
    finally:
        daemon.kill()
