"""The archive API from a client: tokens of each role and requests with them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.error
import urllib.request

from gateway.config import HostPort
from tests.support.world import wait_until

TOKENS = {
    "auditor": "t-auditor-0123456789",
    "investigator": "t-invest-0123456789",
    "admin": "t-admin-0123456789",
}


def config() -> dict:
    return {
        "archive.api_tokens": [
            {
                "name": f"{role}-1",
                "role": role,
                "token_sha256": hashlib.sha256(t.encode()).hexdigest(),
            }
            for role, t in TOKENS.items()
        ]
    }


async def call(gw, method, path, role=None, body=None, token=None):
    listen = HostPort(*gw.http.address)
    request = urllib.request.Request(
        f"http://{listen.host}:{listen.port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
    )
    if role or token:
        request.add_header("Authorization", f"Bearer {token or TOKENS[role]}")

    def fetch():
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    return await asyncio.to_thread(fetch)


async def journaled(gw, n):
    name = "sealgate_archive_journaled_messages_total"
    await wait_until(lambda: gw.metrics.registry.get_sample_value(name) == n, what="journaled")
