"""front - the HTTPS API listener as the SMTP worker processes serve it.

With ``smtp.workers`` above 1 the workers share the API's listening socket as they
share the SMTP one, so that messages submitted by API are received, checked and
stored (fsynced) by the workers in parallel, like SMTP mail, and not by the main
process, which queues, delivers and archives.  A worker answers ``POST
/api/v1/messages`` itself (`gateway.api.v1`: the same code and checks; the access
record goes to the main process over the control socket); every other request -
status, revoke, queue actions, explain, keys, the archive API, the OpenAPI document
- it forwards to the main process's API on a Unix socket (``0600``, in a directory
only the gateway's user reads), naming the client in ``x-sealgate-peer``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from gateway.api.server import PEER_HEADER, Request, Response
from gateway.api.v1 import MessagesApi, problem

# not passed on: hop-by-hop, or set by the listener that answers
_HOP_BY_HOP = {
    "cache-control",
    "x-content-type-options",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-type",
    "host",
    "date",
    "server",
}


class ControlJournal:
    """The access record, kept by the main process: sent over the control socket."""

    def __init__(self, send: Callable[[dict[str, Any]], None]):
        self.send = send

    def access(self, queue_id: str, actor: str, action: str, **detail: Any) -> None:
        self.send(
            {
                "type": "access",
                "queue_id": queue_id,
                "actor": actor,
                "action": action,
                "detail": detail,
            }
        )


class Forwarder:
    """Requests the worker does not answer itself, passed to the main process."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, request: Request) -> Response:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        headers[PEER_HEADER] = request.peer
        if "content-type" in request.headers:
            headers["content-type"] = request.headers["content-type"]
        path = request.path + (f"?{request.query_string}" if request.query_string else "")
        try:
            async with self._session.request(
                request.method,
                f"http://sealgate{path}",
                data=request.body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=300),
            ) as r:
                body = await r.read()
                kept = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_BY_HOP}
                return Response(
                    f"{r.status} {r.reason or ''}".strip(),
                    r.headers.get("Content-Type", "application/octet-stream"),
                    body,
                    kept,
                )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return problem(503, "Service Unavailable", "the gateway is not ready; retry")


class WorkerApi:
    """``POST /api/v1/messages`` here; the rest to the main process."""

    def __init__(self, messages: MessagesApi, forward: Forwarder):
        self.messages, self.forward = messages, forward

    async def __call__(self, request: Request) -> Response:
        if request.method == "POST" and request.path == "/api/v1/messages":
            return await self.messages(request)
        return await self.forward(request)
