"""The archive API on the HTTPS API listener (``api.listen``), for compliance tools
and dashboards.

Bearer tokens from ``archive.api_tokens`` (only their SHA-256 is configured), each
with a role - or keys from ``api.keys`` with archive scopes (``archive:read``: the
auditor's, ``archive:manage``: the admin's, ``archive:content``: the investigator's):

=====================  =========  ============  =====
                       auditor    investigator  admin
=====================  =========  ============  =====
search, proofs, holds  yes        yes           yes
list, access record,
verification
message content,       no         yes           no
exports
place/release holds,   no         no            yes
purge
=====================  =========  ============  =====

Endpoints (JSON unless said otherwise):

- ``GET /archive/search?sender=&recipient=&since=&until=&message_id=&queue_id=&mode=
  &status=&rule=&subject=&limit=[&format=csv]``: metadata, one entry per message
  (``format=csv``: the load file, a row per recipient).  ``since``/``until``: ISO
  8601 dates or times.
- ``GET /archive/messages/<id>``: the delivery proof.
- ``GET /archive/messages/<id>/content``: the message as received (message/rfc822).
- ``GET /archive/export?<search fields>`` or ``?case=NAME``: the export zip.
- ``GET /archive/holds``; ``POST /archive/holds`` ``{"case", "queue_ids", "query"}``;
  ``DELETE /archive/holds/<case>``.
- ``POST /archive/purge`` ``{"confirm": true}`` purges; without it, a dry run.
- ``GET /archive/access?since=``: the access record.
- ``GET /archive/verify``: the last verification; ``POST /archive/verify`` runs one.

Every request that reaches a handler - refused ones too - is recorded in the access
record with the token's name.  It is served over HTTPS only (`gateway.api.server`).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from gateway.api.keys import caller_of
from gateway.api.server import Request, Response
from gateway.archive import report
from gateway.archive.export import export_bytes
from gateway.archive.journal import Archive
from gateway.archive.query import Query
from gateway.config import ApiKeyConfig, ApiTokenConfig
from gateway.errors import SealgateError
from gateway.events import Event
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics

log = get_logger("gateway.archive.api")

READ, CONTENT, MANAGE = "read", "content", "manage"
ALLOWED = {
    "auditor": {READ},
    "investigator": {READ, CONTENT},
    "admin": {READ, MANAGE},
}
MAX_RESULTS = 100_000
QUERY_FIELDS = (
    "sender",
    "recipient",
    "message_id",
    "queue_id",
    "mode",
    "status",
    "rule",
    "subject",
)


class ApiError(SealgateError):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _json(status: str, value: Any) -> Response:
    return Response(status, "application/json", (json.dumps(value, indent=1) + "\n").encode())


def _problem(status: str, detail: str) -> Response:
    """An error as RFC 9457 problem details (``error`` repeats ``detail``)."""
    code, _, title = status.partition(" ")
    body = {"type": "about:blank", "title": title, "status": int(code), "detail": detail}
    body["error"] = detail
    return Response(
        status, "application/problem+json", (json.dumps(body, indent=1) + "\n").encode()
    )


def _limit(value: str | None) -> int:
    """The ``limit`` parameter: a whole number from 1 to `MAX_RESULTS`."""
    if value is None:
        return 1000
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_RESULTS:
        raise ApiError("400 Bad Request", f"limit: must be a whole number from 1 to {MAX_RESULTS}")
    return int(value)


def _time(value: str | None, name: str) -> float | None:
    if not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ApiError("400 Bad Request", f"{name}: {value!r} is not an ISO 8601 date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _holds_nul(value: Any) -> bool:
    """A string of ``value`` (a parsed JSON body: at any depth) holds NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def query_from(params: dict[str, Any]) -> Query:
    unknown = set(params) - {*QUERY_FIELDS, "since", "until", "limit", "format", "case"}
    if unknown:
        raise ApiError("400 Bad Request", f"unknown field(s): {', '.join(sorted(unknown))}")
    wrong = sorted(k for k, v in params.items() if not isinstance(v, str))
    if wrong:
        raise ApiError("400 Bad Request", f"{', '.join(wrong)}: must be a string")
    return Query(
        **{k: params[k] for k in QUERY_FIELDS if params.get(k)},
        since=_time(params.get("since"), "since"),
        until=_time(params.get("until"), "until"),
    )


class ArchiveApi:
    def __init__(
        self,
        archive: Archive,
        tokens: tuple[ApiTokenConfig, ...],
        metrics: Metrics,
        keys: tuple[ApiKeyConfig, ...] = (),
    ):
        self.archive = archive  # a connection of its own, used from this API's thread
        self.tokens = tokens
        self.keys = keys  # api.keys: those with archive scopes act as the roles
        self.metrics = metrics
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="archive-api")

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.archive.index.close()

    def _who(self, request: Request) -> ApiTokenConfig | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        for t in self.tokens:
            if hmac.compare_digest(digest, t.token_sha256):
                return t
        caller = caller_of(auth, self.keys)
        role = caller.archive_role if caller is not None else None
        if caller is not None and role is not None:
            return ApiTokenConfig(caller.name, role, digest)  # type: ignore[arg-type]
        return None

    async def __call__(self, request: Request) -> Response:
        archive_keys = any(s.startswith("archive:") for k in self.keys for s in k.scopes)
        if not self.tokens and not archive_keys:
            return Response("404 Not Found", "text/plain", b"not found\n")
        who = self._who(request)
        if who is None:
            return Response(
                "401 Unauthorized",
                "application/json",
                b'{"error": "a valid bearer token is needed"}\n',
                {"WWW-Authenticate": 'Bearer realm="sealgate-archive"'},
            )
        if "\x00" in unquote(request.path) or any("\x00" in v for v in request.query.values()):
            # no id, address or case name holds one (and PostgreSQL's text refuses it)
            return _problem(
                "400 Bad Request", "a NUL character is not allowed in the path or query"
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._handle, request, who)
        except ApiError as e:
            return _problem(e.status, str(e))

    def _route(self, request: Request) -> tuple[str, Callable[..., Response], tuple[str, ...]]:
        parts = [unquote(p) for p in request.path.strip("/").split("/")][1:]
        m = request.method
        if m == "GET" and parts == ["search"]:
            return READ, self._search, ()
        if m == "GET" and len(parts) == 2 and parts[0] == "messages":
            return READ, self._proof, (parts[1],)
        if m == "GET" and len(parts) == 3 and parts[0] == "messages" and parts[2] == "content":
            return CONTENT, self._content, (parts[1],)
        if m == "GET" and parts == ["export"]:
            return CONTENT, self._export, ()
        if parts == ["holds"] and m in ("GET", "POST"):
            return (READ, self._holds, ()) if m == "GET" else (MANAGE, self._hold, ())
        if m == "DELETE" and len(parts) == 2 and parts[0] == "holds":
            return MANAGE, self._release, (parts[1],)
        if m == "POST" and parts == ["purge"]:
            return MANAGE, self._purge, ()
        if m == "GET" and parts == ["access"]:
            return READ, self._access, ()
        if parts == ["verify"] and m in ("GET", "POST"):
            return READ, self._verify, (m,)
        raise ApiError("404 Not Found", "no such archive endpoint")

    def _handle(self, request: Request, who: ApiTokenConfig) -> Response:
        """In the API's thread: check the role, record the access, answer."""
        need, handler, args = self._route(request)
        actor = f"{who.name} ({who.role}, api {request.peer})"
        if need not in ALLOWED[who.role]:
            self.archive.access(
                actor, "denied", args[0] if args else "", request=f"{request.method} {request.path}"
            )
            log.warning(Event.ARCHIVE_ACCESS, actor=who.name, role=who.role, outcome="denied")
            raise ApiError("403 Forbidden", f"the {who.role} role may not do this")
        log.info(Event.ARCHIVE_ACCESS, actor=who.name, role=who.role, path=request.path)
        return handler(request, actor, *args)

    def _body(self, request: Request) -> dict[str, Any]:
        try:
            value = json.loads(request.body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise ApiError("400 Bad Request", "the body is not JSON") from None
        if not isinstance(value, dict):
            raise ApiError("400 Bad Request", "the body must be a JSON object")
        try:
            nul = _holds_nul(value)  # no case name, id or search field holds one
        except RecursionError:
            raise ApiError("400 Bad Request", "the body is nested too deep") from None
        if nul:
            raise ApiError("400 Bad Request", "a NUL character (\\u0000) is not allowed")
        return value

    # -- handlers (in the API's thread) ---------------------------------------------

    def _search(self, request: Request, actor: str) -> Response:
        query = query_from(request.query)
        limit = _limit(request.query.get("limit"))
        try:
            results = self.archive.search(query, limit=limit)
        except ValueError as e:
            raise ApiError("400 Bad Request", str(e)) from None
        self.archive.access(actor, "search", query=query.to_dict(), results=len(results))
        if request.query.get("format") == "csv":
            csv = report.to_csv(report.with_last_attempts(self.archive, results))
            return Response("200 OK", "text/csv; charset=utf-8", csv.encode())
        return _json("200 OK", {"messages": results})

    def _proof(self, request: Request, actor: str, queue_id: str) -> Response:
        try:
            proof = report.delivery_proof(self.archive, queue_id)
        except KeyError:
            raise ApiError("404 Not Found", f"{queue_id} is not in the archive") from None
        self.archive.access(actor, "proof", queue_id)
        return _json("200 OK", proof)

    def _content(self, request: Request, actor: str, queue_id: str) -> Response:
        try:
            _, data = self.archive.message(queue_id)
        except KeyError:
            raise ApiError("404 Not Found", f"{queue_id} is not in the archive") from None
        self.archive.access(actor, "view", queue_id)
        return Response("200 OK", "message/rfc822", data)

    def _export(self, request: Request, actor: str) -> Response:
        case = request.query.get("case")
        query = query_from(request.query)
        ids: list[str] = sorted(self.archive.held_by(case)) if case else []
        if query.to_dict():
            ids += [m["queue_id"] for m in self.archive.search(query, limit=MAX_RESULTS)]
        if not case and not query.to_dict():
            raise ApiError("400 Bad Request", "name a case or search fields")
        scope = (f"case {case}; " if case else "") + json.dumps(query.to_dict(), sort_keys=True)
        data = export_bytes(self.archive, list(dict.fromkeys(ids)), actor, scope)
        name = time.strftime("sealgate-export-%Y%m%d-%H%M%S.zip", time.gmtime())
        return Response(
            "200 OK",
            "application/zip",
            data,
            {"Content-Disposition": f'attachment; filename="{name}"'},
        )

    def _holds(self, request: Request, actor: str) -> Response:
        return _json("200 OK", {"cases": self.archive.cases()})

    def _hold(self, request: Request, actor: str) -> Response:
        body = self._body(request)
        unknown = set(body) - {"case", "queue_ids", "query"}
        if unknown:
            raise ApiError("400 Bad Request", f"unknown field(s): {', '.join(sorted(unknown))}")
        case, ids, scope = body.get("case"), body.get("queue_ids", []), body.get("query")
        if not isinstance(case, str) or not case.strip():
            raise ApiError("400 Bad Request", "case: must be a non-empty string")
        if not isinstance(ids, list) or not all(isinstance(q, str) for q in ids):
            raise ApiError("400 Bad Request", "queue_ids: must be a list of queue id strings")
        if scope is not None and not isinstance(scope, dict):
            raise ApiError("400 Bad Request", "query: must be an object of search fields")
        query = query_from(scope) if scope is not None else None
        try:
            held = self.archive.hold(case, actor, ids, query)
        except ValueError as e:
            raise ApiError("400 Bad Request", str(e)) from None
        return _json("200 OK", {"case": case, "messages": held})

    def _release(self, request: Request, actor: str, case: str) -> Response:
        try:
            released = self.archive.release(case, actor)
        except KeyError:
            raise ApiError("404 Not Found", f"no case {case!r}") from None
        return _json("200 OK", {"case": case, "released": released})

    def _purge(self, request: Request, actor: str) -> Response:
        body = self._body(request)
        expired = self.archive.expired()
        if body.get("confirm") is not True:
            return _json("200 OK", {"dry_run": True, "would_purge": expired})
        reason = str(body.get("reason") or "retention period over")
        purged = self.archive.purge(expired, reason, actor)
        self.archive.access(actor, "purge", purged=len(purged), reason=reason)
        return _json("200 OK", {"dry_run": False, "purged": purged})

    def _access(self, request: Request, actor: str) -> Response:
        since = _time(request.query.get("since"), "since") or 0.0
        return _json("200 OK", {"access": self.archive.access_log(since, limit=MAX_RESULTS)})

    def _verify(self, request: Request, actor: str, method: str) -> Response:
        if method == "POST":
            started = time.monotonic()
            result = self.archive.verify()
            self.archive.note_verification(result, time.monotonic() - started, actor)
            return _json("200 OK", result.to_dict())
        last = self.archive.setting("last_verify")
        return _json("200 OK", json.loads(last) if last else {"at": None})
