"""The archive API from a client: tokens of each role and requests with them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.error
import urllib.request

from gateway.config import HostPort
from gateway.tls import self_signed_paths
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


def api_tls(gw) -> ssl.SSLContext:
    """A client context that trusts the gateway's certificate (the API's, else the
    SMTP listener's, else the self-signed one) - verified, as a client should."""
    cfg = gw.config
    cert = cfg.api.cert_file or cfg.tls.cert_file or self_signed_paths(cfg.state_dir)[0]
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False  # the certificate names the host, the test dials 127.0.0.1
    return ctx


async def call(gw, method, path, role=None, body=None, token=None):
    """A request to the archive API on the HTTPS API listener."""
    listen = HostPort(*gw.api.address)
    request = urllib.request.Request(
        f"https://{listen.host}:{listen.port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
    )
    if role or token:
        request.add_header("Authorization", f"Bearer {token or TOKENS[role]}")

    def fetch():
        try:
            with urllib.request.urlopen(request, timeout=30, context=api_tls(gw)) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    return await asyncio.to_thread(fetch)


async def journaled(gw, n):
    name = "sealgate_archive_journaled_messages_total"
    await wait_until(lambda: gw.metrics.registry.get_sample_value(name) == n, what="journaled")
