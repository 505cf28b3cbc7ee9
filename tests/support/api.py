"""The message API from an application's side: keys with each scope, and HTTPS
requests that verify the gateway's certificate."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp

from gateway.config import HostPort
from tests.support.archive_api import api_tls

KEYS = {
    "ehr": ("sgk_test-ehr-0123456789", ["send"]),
    "crm": ("sgk_test-crm-0123456789", ["send"]),
    "status": ("sgk_test-status-0123456789", ["read-status"]),
    "ops": ("sgk_test-ops-0123456789", ["admin"]),
    "auditor": ("sgk_test-auditor-0123456789", ["archive:read"]),
    "old": ("sgk_test-old-0123456789", ["admin"]),
}


def config() -> dict:
    return {
        "api.keys": [
            {
                "name": name,
                "scopes": scopes,
                "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                **({"expires": "2020-01-01"} if name == "old" else {}),
            }
            for name, (key, scopes) in KEYS.items()
        ]
    }


async def call(
    gw,
    method: str,
    path: str,
    key: str | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body: JSON when it is JSON) of one request."""
    listen = HostPort(*gw.api.address)
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {KEYS[key][0] if key in KEYS else key}"
    if json_body is not None:
        data = json.dumps(json_body).encode()
        sent.setdefault("Content-Type", "application/json")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=api_tls(gw))) as session,
        session.request(
            method, f"https://{listen.host}:{listen.port}{path}", data=data, headers=sent
        ) as r,
    ):
        raw = await r.read()
        kind = r.headers.get("Content-Type", "")
        body = json.loads(raw) if "json" in kind and raw else raw
        return r.status, dict(r.headers), body
