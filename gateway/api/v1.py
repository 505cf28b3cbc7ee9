"""v1 - the message API on the HTTPS API listener, for applications (an EHR sending
results, a CRM sending statements) and for administrators' tools.

Described by the OpenAPI 3.1 document ``gateway/api/openapi.json``, served at
``/api/openapi.json`` (the suite runs it against the live API with schemathesis
and checks every route is in it).  Bearer keys from ``api.keys`` with scopes
(`gateway.api.keys`); errors are RFC 9457 problem details; every call - refused
ones too - goes into the archive's access record with the key's name.

- ``POST /api/v1/messages`` [send]: a message as JSON or ``message/rfc822``
  (`gateway.api.compose`), checked like SMTP (addresses, size, recipients, lines,
  ``relay.sender_domains``), spooled and fsynced like SMTP, then ``202`` with its
  queue id; the same policy, archive and delivery follow.  ``Idempotency-Key``: a
  retry within 24 h gets the first request's answer and sends nothing again.
- ``GET /api/v1/messages/{id}`` [read-status]: each recipient's state, decision
  and every attempt's evidence.
- ``POST /api/v1/messages/{id}/revoke`` [send: its own messages; admin]: withdraw
  its portal items.
- ``POST /api/v1/messages/{id}/{retry|hold|release|delete}`` [admin].
- ``POST /api/v1/explain`` [read-status]: what the policy decides, and why.
- ``GET|POST /api/v1/keys`` [admin]: the key directory's keys; import one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote

from gateway.addresses import check_mailbox
from gateway.api.compose import Composed, Invalid, from_json, from_raw
from gateway.api.keys import Caller, caller_of
from gateway.api.server import Request, Response
from gateway.api.store import ApiStore
from gateway.config import Config
from gateway.errors import SealgateError, SpoolError
from gateway.events import Event
from gateway.model import ClientInfo, Envelope, Recipient
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.queue.store import QueueStore
from gateway.smtp.context import make_binding
from gateway.smtp.data import DataProblem, MessageScanner
from gateway.smtp.passphrase import PassphraseFilter
from gateway.smtp.server import received_header
from gateway.spool import Spool
from gateway.spool.store import is_queue_id
from gateway.spool.submit import Submitter, mail_options_for
from gateway.storage.stores import Storage

log = get_logger("gateway.api.v1")
T = TypeVar("T")

QUEUE_ACTIONS = ("retry", "hold", "release", "delete")
# an Idempotency-Key request not done within this long is taken for failed (a request
# takes far less; its handler is cut off at 300 s, the record stays for 24 h)
IN_PROGRESS = 330.0


def openapi_document() -> bytes:
    return resources.files("gateway.api").joinpath("openapi.json").read_bytes()


class Problem(SealgateError):
    """An answer other than success: RFC 9457 problem details."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return Response(
        f"{status} {title}",
        "application/problem+json",
        (json.dumps(body) + "\n").encode(),
        headers or {},
    )


def _not_allowed(method: str, allowed: list[str]) -> Problem:
    return Problem(
        405,
        "Method Not Allowed",
        f"{method} is not allowed here",
        headers={"Allow": ", ".join(allowed)},
    )


def _json(status: str, value: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, "application/json", (json.dumps(value) + "\n").encode(), headers or {})


class Journal(Protocol):
    def access(self, queue_id: str, actor: str, action: str, **detail: Any) -> None: ...


class PortalItems(Protocol):
    async def revoke_message(self, queue_id: str, actor: str) -> list[str]: ...


class MessagesApi:
    def __init__(
        self,
        config: Config,
        hostname: str,
        submitter: Submitter,
        spool: Spool,
        metrics: Metrics,
        journal: Journal | None = None,
        explain: Callable[[str, list[str], bytes | None], Awaitable[dict[str, Any]]] | None = None,
    ):
        self.hostname, self.submitter, self.spool, self.metrics = (
            hostname,
            submitter,
            spool,
            metrics,
        )
        self.journal, self.explain = journal, explain
        self.portal: PortalItems | None = None  # set by the app when the portal runs
        self.apply(config)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="api")
        self._store: ApiStore | None = None
        self._queue: QueueStore | None = None

    def apply(self, config: Config) -> None:
        """The keys, limits and sender rules of ``config`` (start, SIGHUP)."""
        self.config, self.binding = config, make_binding(config)

    def close(self) -> None:
        def close_all() -> None:
            for store in (self._store, self._queue):
                if store is not None:
                    store.close()

        self._thread.submit(close_all).result()
        self._thread.shutdown(wait=True)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _stores(self) -> tuple[ApiStore, QueueStore]:
        """In the API's thread: its connections to the queue's database."""
        if self._store is None or self._queue is None:
            storage = Storage(self.config)
            self._store = ApiStore(storage.open("queue"))
            self._queue = QueueStore(storage.open("queue"))
        return self._store, self._queue

    # -- dispatch ---------------------------------------------------------------------

    def _route(self, request: Request) -> tuple[str, str, Any, tuple[str, ...]]:
        """(scope, operation, handler, arguments) of a request; Problem 404/405."""
        parts = [unquote(p) for p in request.path.strip("/").split("/")]
        m = request.method
        if parts[:2] != ["api", "v1"]:
            raise Problem(404, "Not Found", "no such endpoint")
        rest = parts[2:]
        table: list[tuple[list[str] | None, str, str, str, Any]] = [
            (["messages"], "POST", "send", "submit", self._submit),
            (["explain"], "POST", "read-status", "explain", self._explain),
            (["keys"], "GET", "admin", "keys-list", self._keys),
            (["keys"], "POST", "admin", "keys-import", self._import_key),
        ]
        for path, method, scope, operation, handler in table:
            if rest == path and m == method:
                return scope, operation, handler, ()
        allowed = [method for path, method, *_ in table if path == rest]
        if allowed:
            raise _not_allowed(m, allowed)
        if len(rest) == 2 and rest[0] == "messages":
            if m != "GET":
                raise _not_allowed(m, ["GET"])
            return "read-status", "status", self._status, (rest[1],)
        if len(rest) == 3 and rest[0] == "messages" and rest[2] in ("revoke", *QUEUE_ACTIONS):
            if m != "POST":
                raise _not_allowed(m, ["POST"])
            if rest[2] == "revoke":
                return "send", "revoke", self._revoke, (rest[1],)
            return "admin", rest[2], self._queue_action, (rest[1], rest[2])
        raise Problem(404, "Not Found", "no such endpoint")

    async def __call__(self, request: Request) -> Response:
        if request.path == "/api/openapi.json":
            if request.method != "GET":
                return problem(405, "Method Not Allowed", "GET only", {"Allow": "GET"})
            return Response("200 OK", "application/json", openapi_document())
        started = time.perf_counter()
        operation, caller, queue_id = "unknown", None, ""
        try:
            scope, operation, handler, args = self._route(request)
            queue_id = args[0] if args else ""
            caller = caller_of(request.headers.get("authorization", ""), self.config.api.keys)
            if caller is None:
                raise Problem(401, "Unauthorized", "a valid API key is needed (Bearer)")
            if not caller.may(scope):
                raise Problem(403, "Forbidden", f"this key's scopes do not include {scope}")
            if queue_id and not is_queue_id(queue_id):
                raise Problem(404, "Not Found", "no such message (not a queue id)")
            answer: Response = await handler(request, caller, *args)
        except Problem as p:
            headers = {"WWW-Authenticate": 'Bearer realm="sealgate"'} if p.status == 401 else {}
            answer = problem(p.status, p.title, p.detail, headers | p.extra.get("headers", {}))
        status = int(answer.status[:3])
        self.metrics.api_requests.labels(operation, str(status)).inc()
        actor = f"{caller.name} (api {request.peer})" if caller else f"no key (api {request.peer})"
        if self.journal is not None and (caller is not None or status != 404):
            self.journal.access(
                answer.headers.get(
                    "X-Sealgate-Queue-Id", queue_id if is_queue_id(queue_id) else ""
                ),
                actor,
                f"api-{operation}",
                request=f"{request.method} {request.path}",
                status=status,
            )
        log.info(
            Event.API_REQUEST,
            operation=operation,
            status=status,
            key=caller.name if caller else None,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        answer.headers.pop("X-Sealgate-Queue-Id", None)
        return answer

    # -- submitting -------------------------------------------------------------------

    def _compose(self, request: Request) -> Composed:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                try:
                    body = json.loads(request.body)
                except (ValueError, UnicodeDecodeError):
                    raise Invalid("the body is not JSON") from None
                return from_json(body, self.hostname)
            if ctype == "message/rfc822":
                query = parse_qs(request.query_string, keep_blank_values=True)
                sender = query.get("from", [None])[-1]
                return from_raw(request.body, sender, query.get("to", []))
        except Invalid as e:
            raise Problem(422, "Unprocessable Content", str(e)) from None
        raise Problem(415, "Unsupported Media Type", "send application/json or message/rfc822")

    def _check(self, composed: Composed) -> None:
        """The checks SMTP makes at MAIL, RCPT and DATA."""
        smtp = self.config.smtp
        problem_of = check_mailbox(composed.sender, True)
        if problem_of is not None:
            raise Problem(422, "Unprocessable Content", f"from: {problem_of.detail}")
        refusal = self.binding.check_sender(composed.sender, None)
        if refusal is not None:
            raise Problem(403, "Forbidden", f"from: {refusal.reply}")
        if len(composed.recipients) > smtp.max_recipients:
            raise Problem(
                422, "Unprocessable Content", f"more than {smtp.max_recipients} recipients"
            )
        for address in composed.recipients:
            found = check_mailbox(address, True)
            if found is not None:
                raise Problem(422, "Unprocessable Content", f"{address!r}: {found.detail}")
        if len(composed.data) > smtp.max_message_size:
            raise Problem(
                413,
                "Content Too Large",
                f"the message is larger than {smtp.max_message_size} bytes",
            )
        scanner = MessageScanner(
            smtp.max_message_size, smtp.max_line_length, smtp.max_received_headers
        )
        scanner.feed(composed.data)
        scanner.finish()
        if scanner.problem is DataProblem.TOO_BIG:
            raise Problem(413, "Content Too Large", "the message is too large")
        if scanner.problem is not None:
            why = scanner.problem.value
            raise Problem(422, "Unprocessable Content", f"the message: {why}")
        if self.spool.free_space() < self.config.spool.min_free_space + len(composed.data):
            raise Problem(507, "Insufficient Storage", "the spool is full; try again later")

    async def _submit(self, request: Request, caller: Caller) -> Response:
        composed = self._compose(request)
        self._check(composed)
        idempotency = request.headers.get("idempotency-key", "").strip()
        if len(idempotency) > 255:
            raise Problem(400, "Bad Request", "Idempotency-Key: at most 255 characters")
        submission = self.submitter.begin()
        try:
            if idempotency:
                earlier = await self._earlier(caller, idempotency, request, submission.queue_id)
                if earlier is not None:
                    await submission.abort()
                    return earlier
        except BaseException:
            await submission.abort()
            raise
        try:
            answer = await self._spool(submission, composed, caller, request)
        except Problem:
            if idempotency:  # not stored: a retry may try again at once
                store, _ = await self._db(self._stores)
                await self._db(store.forget, caller.name, idempotency, submission.queue_id)
            raise
        if idempotency:
            store, _ = await self._db(self._stores)
            await self._db(store.stored, caller.name, idempotency)
        return answer

    async def _earlier(
        self, caller: Caller, idempotency: str, request: Request, queue_id: str
    ) -> Response | None:
        """The answer to a request seen before under this Idempotency-Key (None: a
        new request, now recorded with ``queue_id``)."""
        digest = hashlib.sha256(
            request.headers.get("content-type", "").encode()
            + b"\0"
            + request.query_string.encode()
            + b"\0"
            + request.body
        ).hexdigest()
        store, queue = await self._db(self._stores)
        now = time.time()
        earlier = await self._db(store.remember, caller.name, idempotency, digest, queue_id, now)
        if earlier is None:
            return None
        if earlier.request_sha256 != digest:
            raise Problem(
                422, "Unprocessable Content", "Idempotency-Key was used for another request"
            )
        if earlier.done or await self._db(self._exists, queue, earlier.queue_id):
            return self._accepted(earlier.queue_id, replayed=True)
        if now - earlier.created < IN_PROGRESS:  # in this process or another
            raise Problem(409, "Conflict", "a request with this Idempotency-Key is in progress")
        # the first request never stored its message (it failed, or a crash came first)
        if not await self._db(
            store.take_over, caller.name, idempotency, earlier.queue_id, queue_id, now
        ):
            raise Problem(409, "Conflict", "a request with this Idempotency-Key is in progress")
        return None

    def _exists(self, queue: QueueStore, queue_id: str) -> bool:
        return self.spool.path_of(queue_id).exists() or queue.message(queue_id) is not None

    async def _spool(
        self, submission: Any, composed: Composed, caller: Caller, request: Request
    ) -> Response:
        passphrase = PassphraseFilter(self.config.portal.passphrase_header)
        try:
            await submission.write(passphrase.feed(composed.data))
            await submission.write(passphrase.finish())
        except BaseException:
            await submission.abort()
            raise
        hashed = ""
        if passphrase.value:
            from gateway.portal.credentials import hash_secret

            hashed = await asyncio.get_running_loop().run_in_executor(
                None, hash_secret, passphrase.value
            )
        queue_id = submission.queue_id
        now = datetime.datetime.now(datetime.UTC)
        client = ClientInfo(
            ip=request.peer,
            port=0,
            helo="api",
            tls_version=request.tls_version,
            tls_cipher=request.tls_cipher,
            authorized_by="api-key",
            auth_user=caller.name,
        )
        trace = received_header(client, self.hostname, queue_id, False, False, now, "HTTPS")
        trace += f"{self.config.smtp.marker_header}: {self.hostname}\r\n"
        started = time.perf_counter()
        try:
            envelope = await submission.commit(
                lambda size, sha: Envelope(
                    queue_id=queue_id,
                    received_at=now.isoformat(timespec="microseconds"),
                    mail_from=composed.sender,
                    mail_options=mail_options_for(
                        composed.sender, composed.recipients, composed.data
                    ),
                    recipients=tuple(Recipient(r) for r in composed.recipients),
                    client=client,
                    size=size,
                    sha256=sha,
                    trace_headers=trace,
                    portal_passphrase=hashed,
                )
            )
        except SpoolError as e:
            log.error(Event.SPOOL_WRITE_FAILED, queue_id=queue_id, error=str(e))
            raise Problem(
                503, "Service Unavailable", "the message could not be stored; retry"
            ) from e
        m = self.metrics
        m.messages_accepted.labels("api").inc()
        m.accepted_bytes.inc(envelope.size)
        m.message_size.observe(envelope.size)
        m.acceptance_latency.observe(time.perf_counter() - started)
        return self._accepted(queue_id)  # the queue records which key sent it

    @staticmethod
    def _accepted(queue_id: str, replayed: bool = False) -> Response:
        headers = {"Location": f"/api/v1/messages/{queue_id}", "X-Sealgate-Queue-Id": queue_id}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return _json(
            "202 Accepted", {"id": queue_id, "status_url": f"/api/v1/messages/{queue_id}"}, headers
        )

    # -- reading and acting -----------------------------------------------------------

    async def _status(self, request: Request, caller: Caller, queue_id: str) -> Response:
        def read() -> dict[str, Any] | None:
            _, queue = self._stores()
            message = queue.message(queue_id)
            if message is None:
                return None
            decisions = queue.decisions(queue_id)
            attempts = queue.attempts(queue_id)
            recipients = []
            for row in queue.recipients(queue_id):
                decision = decisions.get(row.idx)
                recipients.append(
                    {
                        "address": row.address,
                        "state": row.state.value,
                        "status": row.status,
                        "diagnostic": row.diagnostic,
                        "attempts": row.attempts,
                        "mode": decision.get("mode") if decision else None,
                        "decision": decision,
                        "evidence": [
                            {k: v for k, v in a.items() if k != "recipient_index"}
                            for a in attempts
                            if a["recipient_index"] == row.idx
                        ],
                    }
                )
            return {
                "id": queue_id,
                "received_at": message["received_at"],
                "sender": message["mail_from"],
                "size": message["size"],
                "done": bool(message["done"]),
                "held": bool(message["hold"]),
                "recipients": recipients,
            }

        found = await self._db(read)
        if found is None:
            raise Problem(404, "Not Found", f"no message {queue_id} in the queue")
        return _json("200 OK", found)

    async def _revoke(self, request: Request, caller: Caller, queue_id: str) -> Response:
        store, queue = await self._db(self._stores)
        if not caller.may("admin") and await self._db(store.submitter, queue_id) != caller.name:
            raise Problem(403, "Forbidden", "a send key revokes only the messages it sent")
        if not await self._db(self._exists, queue, queue_id):
            raise Problem(404, "Not Found", f"no message {queue_id} in the queue")
        if self.portal is None:
            raise Problem(409, "Conflict", "the portal is not enabled")
        revoked = await self.portal.revoke_message(queue_id, f"{caller.name} (api)")
        if not revoked:
            raise Problem(409, "Conflict", f"nothing of {queue_id} is in the portal to revoke")
        return _json("200 OK", {"id": queue_id, "revoked": revoked})

    async def _queue_action(
        self, request: Request, caller: Caller, queue_id: str, action: str
    ) -> Response:
        def act() -> bool:
            _, queue = self._stores()
            return queue.admin(queue_id, action, f"{caller.name} (api)")

        if not await self._db(act):
            raise Problem(404, "Not Found", f"no message {queue_id} in the queue")
        return _json("200 OK", {"id": queue_id, "action": action, "done": True})

    async def _explain(self, request: Request, caller: Caller) -> Response:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise Problem(422, "Unprocessable Content", "the body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("sender"), str):
            raise Problem(422, "Unprocessable Content", "sender: an address")
        recipients = body.get("recipients")
        if (
            not isinstance(recipients, list)
            or not recipients
            or len(recipients) > 100
            or not all(isinstance(r, str) for r in recipients)
        ):
            raise Problem(422, "Unprocessable Content", "recipients: 1 to 100 addresses")
        for address in [body["sender"], *recipients]:
            if check_mailbox(address, True) is not None:
                raise Problem(422, "Unprocessable Content", f"{address!r} is not an address")
        message = body.get("message")
        if message is not None and not isinstance(message, str):
            raise Problem(422, "Unprocessable Content", "message: the raw message as text")
        assert self.explain is not None
        data = message.replace("\n", "\r\n").encode() if message is not None else None
        return _json("200 OK", await self.explain(body["sender"], recipients, data))

    async def _keys(self, request: Request, caller: Caller) -> Response:
        from gateway.crypto.keydir import KeyDirectory

        def listed() -> list[dict[str, Any]]:
            directory = KeyDirectory(Storage(self.config).open("keydir"))
            try:
                return [dataclasses.asdict(k) for k in directory.stored()]
            finally:
                directory.close()

        return _json("200 OK", {"keys": await self._db(listed)})

    async def _import_key(self, request: Request, caller: Caller) -> Response:
        from gateway.crypto.keydir import KeyDirectory

        query = parse_qs(request.query_string)
        address = query.get("address", [None])[-1]

        def imported() -> dict[str, Any]:
            directory = KeyDirectory(Storage(self.config).open("keydir"))
            try:
                report = directory.import_any(request.body, address)
            finally:
                directory.close()
            return {
                "imported": [dataclasses.asdict(k) for k in report.imported],
                "skipped": list(report.skipped),
            }

        if not request.body:
            raise Problem(422, "Unprocessable Content", "the body is the key (PEM, DER, PGP)")
        try:
            found = await self._db(imported)
        except ValueError as e:
            raise Problem(422, "Unprocessable Content", str(e)[:300]) from None
        return _json("200 OK", found)
