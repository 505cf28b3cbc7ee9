"""The console's pages (aiohttp, server-rendered with Jinja2; no JavaScript at all).

Security: every response carries a strict Content-Security-Policy (this origin's
stylesheet and images only; no script), frame and referrer denial, no caching.
Cookies are ``__Host-`` prefixed, Secure, HttpOnly, SameSite=Strict; every form
carries a CSRF token (before sign-in a double-submit cookie, after it the
session's).  A session ends after ``console.idle_timeout`` without a request and
``console.session_lifetime`` after sign-in.  Every route names what it needs -
read (auditor, investigator, admin), content (investigator), manage (admin) - as
the archive API's roles do; a refusal is recorded.  Every page that shows a
message, every download, export, hold and sign-in (failed ones too) is in the
archive's access record with the signed-in person as the actor.
"""

from __future__ import annotations

import datetime
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from gateway.archive.api import ALLOWED, CONTENT, MANAGE, QUERY_FIELDS, READ
from gateway.archive.query import Query
from gateway.config import Config, OidcProviderConfig
from gateway.console import charts
from gateway.console.accounts import matcher
from gateway.console.service import CSV_PAGE, MAX_CSV, MAX_EXPORT, Actor, ConsoleData
from gateway.console.store import Check, Session
from gateway.events import Event
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.portal import render
from gateway.portal.oidc import OidcClient, OidcError
from gateway.portal.web import SECURITY_HEADERS, RateLimit, set_host_cookie

log = get_logger("gateway.console")

SESSION = "__Host-sealgate-console"
PRE_CSRF = "__Host-sealgate-console-csrf"
OIDC_BROWSER = "__Host-sealgate-console-oidc"
SESSION_KEY = web.RequestKey("session", Session)  # the signed-in person's, once checked
FORM_KEY = web.RequestKey("form", MultiDictProxy)  # a POST's fields, once its token is
PAGE_SIZE = 50
MAX_PAGE = 2000  # 100,000 results deep: narrow the search beyond that
SIGNINS_PER_MINUTE = 20  # per client address
HERE = Path(__file__).parent
MODES = ("tls", "smime", "pgp", "portal", "hold", "bounce")
MODE_LABELS = {
    "tls": "TLS",
    "smime": "S/MIME",
    "pgp": "PGP",
    "portal": "Secure portal",
    "hold": "Held",
    "bounce": "Refused",
}
STATES = ("queued", "deferred", "delivered", "bounced", "expired", "held", "portal")

Explain = Callable[[str, list[str], bytes | None], Awaitable[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class Refused(Exception):
    """A form that cannot be acted on: the page says why (400)."""


def may(roles: frozenset[str], need: str) -> bool:
    return any(need in ALLOWED.get(r, set()) for r in roles)


def roles_of(claims: dict[str, Any], provider: str, config: Config) -> frozenset[str]:
    """The console roles ``console.role_claims`` grant for these ID token claims."""
    roles = set()
    for rule in config.console.role_claims:
        if rule.provider not in (None, provider):
            continue
        value = claims.get(rule.claim)
        values = value if isinstance(value, list) else [value]
        if rule.value in [str(v) for v in values if v is not None]:
            roles.add(rule.role)
    return frozenset(roles)


def _day_start(value: str, name: str) -> float | None:
    if not value:
        return None
    try:
        day = datetime.date.fromisoformat(value)
    except ValueError:
        raise Refused(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def query_of(params: Any) -> Query:
    """A search from a form's fields (``domain``: the recipients' domain; ``since``
    and ``until``: days, both included)."""
    fields = {k: str(params.get(k, "")).strip() for k in QUERY_FIELDS}
    domain = str(params.get("domain", "")).strip().lstrip("@")
    if domain and not fields["recipient"]:
        fields["recipient"] = "@" + domain
    until = _day_start(str(params.get("until", "")).strip(), "until")
    for name in ("mode", "status"):
        allowed = MODES if name == "mode" else STATES
        if fields[name] and fields[name] not in allowed:
            raise Refused(f"{name}: {fields[name]!r} is not one of {', '.join(allowed)}")
    return Query(
        **{k: v for k, v in fields.items() if v},
        since=_day_start(str(params.get("since", "")).strip(), "since"),
        until=until + 86400 if until is not None else None,
    )


async def _form(request: web.Request) -> MultiDictProxy[Any]:
    """A POST's fields; a body that is not a form (not UTF-8, a broken multipart), or
    a field with NUL (no name or id holds one, and PostgreSQL's text refuses it), is
    the client's mistake: 400."""
    try:
        form = await request.post()
    except (UnicodeDecodeError, ValueError) as e:
        raise web.HTTPBadRequest(reason="the form cannot be read") from e
    if any(isinstance(v, str) and "\x00" in v for v in form.values()):
        raise web.HTTPBadRequest(reason="a NUL character is not allowed in a form")
    return form


def _local_path(target: str) -> bool:
    """Whether a ``next`` address is a path on this console - not another site:
    ``//host``, and ``/\\host``, which browsers read as ``//host``, are not."""
    parts = urlsplit(target)
    return (
        target.startswith("/")
        and not parts.scheme
        and not parts.netloc
        and not target.startswith("//")
        and "\\" not in target
        and target.isprintable()
        and len(target) < 2000
    )


def _when(value: float | str | None) -> str:
    """A time as the pages show it (from a Unix time or an ISO 8601 text)."""
    if not value:
        return ""
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return value
    else:
        when = value
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Console:
    def __init__(
        self,
        config: Config,
        data: ConsoleData,
        explain: Explain | None = None,
        client_tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.data, self.explainer, self.clock = data, explain, clock
        self.metrics = metrics
        self.public_url = ""  # the listener's address once it listens (port 0: the one taken)
        self.client_tls = client_tls or ssl.create_default_context()
        self.signins = RateLimit(SIGNINS_PER_MINUTE, 60.0)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.env.filters["mode"] = lambda m: MODE_LABELS.get(m, m) if m else "-"
        self.env.globals["may"] = may
        self.apply(config)

    def apply(self, config: Config) -> None:
        """The settings (start, SIGHUP): providers, role mapping, timeouts."""
        self.config = config
        self.providers: dict[str, OidcProviderConfig] = {
            p.name: p for p in config.console.oidc_providers
        }
        old: dict[str, OidcClient] = getattr(self, "_oidc", {})
        self._oidc = {
            name: old[name]
            if name in old and old[name].provider == p
            else OidcClient(p, self.client_tls)
            for name, p in self.providers.items()
        }

    @property
    def base_url(self) -> str:
        c = self.config.console
        return (c.base_url or self.public_url or f"https://{c.listen}").rstrip("/")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=4 * 1024 * 1024)
        r = app.router
        r.add_get("/static/console.css", self.css)
        r.add_get("/", self.home)
        r.add_get("/signin", self.signin_form)
        r.add_post("/signin", self.signin)
        r.add_get("/oidc/callback", self.oidc_callback)
        r.add_get("/oidc/{provider}", self.oidc_start)
        r.add_post("/signout", self.signout)
        pages: list[tuple[str, str, str, Handler]] = [
            ("GET", "/overview", READ, self.overview),
            ("GET", "/search", READ, self.search),
            ("GET", "/search.csv", READ, self.search_csv),
            ("GET", "/messages/{queue_id}", READ, self.message),
            ("GET", "/messages/{queue_id}/proof.json", READ, self.proof),
            ("GET", "/messages/{queue_id}/content", CONTENT, self.content),
            ("GET", "/messages/{queue_id}/part/{n:\\d+}", CONTENT, self.part),
            ("GET", "/holds", READ, self.holds),
            ("POST", "/holds", MANAGE, self.hold),
            ("POST", "/holds/release", MANAGE, self.release),
            ("GET", "/retention", MANAGE, self.retention),
            ("GET", "/exports", CONTENT, self.exports),
            ("POST", "/exports", CONTENT, self.export),
            ("GET", "/access", READ, self.access),
            ("GET", "/explain", READ, self.explain_form),
            ("POST", "/explain", READ, self.explain),
        ]
        for method, path, need, handler in pages:
            r.add_route(method, path, self._signed_in(need, handler))
        return app

    # -- plumbing -------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if "\x00" in request.path or any("\x00" in v for v in request.query.values()):
                raise Refused("A NUL character is not allowed in a page's address.")
            response = await handler(request)
        except Refused as e:
            response = self.page(request, "error.html", "Cannot do that", status=400, error=str(e))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = self.page(
                request,
                "error.html",
                "Not found" if e.status == 404 else e.reason,
                status=e.status,
                error="This page does not exist." if e.status == 404 else e.reason,
            )
        if not response.prepared:  # (a streamed answer set them before its first byte)
            response.headers.update(SECURITY_HEADERS)
        return response

    def _signed_in(self, need: str, handler: Handler) -> Handler:
        """The route behind sign-in and a role; POSTs also behind the CSRF token."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = await self._session(request)
            if session is None:
                if request.method == "GET":
                    raise web.HTTPSeeOther("/signin?" + urlencode({"next": request.path_qs}))
                return self.page(
                    request,
                    "error.html",
                    "Signed out",
                    status=401,
                    error="Your session has ended. Please sign in again.",
                )
            request[SESSION_KEY] = session
            actor = self.actor(request)
            if not may(session.roles, need):
                await self.data.note(
                    actor,
                    "denied",
                    request.match_info.get("queue_id", ""),
                    request=f"{request.method} {request.path}",
                )
                log.warning(Event.ARCHIVE_ACCESS, actor=session.identity, outcome="denied")
                return self.page(
                    request,
                    "error.html",
                    "Not allowed",
                    status=403,
                    error="Your role does not allow this page.",
                )
            if request.method == "POST":
                form = await _form(request)
                sent = form.get("csrf")
                if not (isinstance(sent, str) and hmac.compare_digest(sent, session.csrf)):
                    return self.page(
                        request,
                        "error.html",
                        "Form expired",
                        status=403,
                        error="This form is too old. Please go back, reload and try again.",
                    )
                request[FORM_KEY] = form
            return await handler(request)

        guarded.need = need  # type: ignore[attr-defined]  # what the tests check
        return guarded

    async def _session(self, request: web.Request) -> Session | None:
        """The live session the request's cookie names (marked as seen), or None."""
        sid = request.cookies.get(SESSION, "")
        if not 0 < len(sid) < 100:
            return None
        idle = float(self.config.console.idle_timeout)
        return await self.data.run(self.data.store.session, sid, idle)

    def client(self, request: web.Request) -> str:
        return request.remote or "?"

    def actor(self, request: web.Request) -> Actor:
        s = request[SESSION_KEY]
        return Actor(s.identity, s.display, s.roles, self.client(request))

    def page(
        self, request: web.Request, template: str, title: str, status: int = 200, **values: Any
    ) -> web.Response:
        session = request.get(SESSION_KEY)
        text = self.env.get_template(template).render(
            title=title,
            session=session,
            roles=session.roles if session else frozenset(),
            csrf=session.csrf if session else values.pop("pre_csrf", ""),
            READ=READ,
            CONTENT=CONTENT,
            MANAGE=MANAGE,
            path=request.path,
            **values,
        )
        return web.Response(text=text, content_type="text/html", charset="utf-8", status=status)

    async def css(self, request: web.Request) -> web.Response:
        return web.FileResponse(HERE / "static" / "console.css")  # type: ignore[return-value]

    async def home(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/overview")

    # -- signing in -----------------------------------------------------------------

    def _pre_csrf(self, request: web.Request) -> str:
        value = request.cookies.get(PRE_CSRF, "")
        return value if 20 < len(value) < 100 else secrets.token_urlsafe(24)

    def _signin_page(
        self, request: web.Request, error: str = "", status: int = 200
    ) -> web.Response:
        pre = self._pre_csrf(request)
        nxt = request.query.get("next", "")
        response = self.page(
            request,
            "signin.html",
            "Sign in",
            status=status,
            error=error,
            pre_csrf=pre,
            next=nxt if _local_path(nxt) else "",
            local=self.config.console.local_accounts,
            providers=[(p.name, p.label or p.name) for p in self.providers.values()],
        )
        set_host_cookie(response, PRE_CSRF, pre)
        return response

    async def signin_form(self, request: web.Request) -> web.Response:
        return self._signin_page(request)

    async def signin(self, request: web.Request) -> web.Response:
        form = await _form(request)
        sent, expected = form.get("csrf"), request.cookies.get(PRE_CSRF, "")
        if not (isinstance(sent, str) and expected and hmac.compare_digest(sent, expected)):
            return self._signin_page(request, "The form expired. Please try again.", 403)
        if not self.config.console.local_accounts:
            return self._signin_page(request, "Local accounts are turned off here.", 403)
        client = self.client(request)
        if not await self.signins.check(client):
            return self._signin_page(request, "Too many attempts. Please wait a minute.", 429)
        name = str(form.get("name", "")).strip()[:64]
        password, code = str(form.get("password", "")), str(form.get("code", ""))
        c = self.config.console
        store = self.data.store
        check = matcher(password, code, store.totp_secret)
        result = await self.data.run(store.check, name, check, c.max_failures, float(c.lockout))
        if result is not Check.RIGHT:
            who = f"{name or '?'} (local; console sign-in, from {client})"
            await self._signin_failed(who, "local", result.value)
            return self._signin_page(
                request,
                "Sign-in failed: the name, password or code is wrong, or the account is "
                f"locked (after {c.max_failures} failures, for {c.lockout}).",
                401,
            )
        user = await self.data.run(store.user, name)
        assert user is not None
        return await self._start_session(
            request,
            f"local:{name}",
            name,
            frozenset(user.roles),
            "local",
            str(form.get("next", "")),
        )

    async def _start_session(
        self,
        request: web.Request,
        identity: str,
        display: str,
        roles: frozenset[str],
        method: str,
        nxt: str,
        refresh: bool = False,
    ) -> web.Response:
        c = self.config.console
        sid, _ = await self.data.run(
            self.data.store.new_session, identity, display, roles, float(c.session_lifetime)
        )
        actor = Actor(identity, display, roles, self.client(request))
        await self.data.note(actor, "signin", "", method=method)
        log.info(Event.CONSOLE_SIGNIN, method=method, outcome="right")
        self._count(method.split()[0], "right")
        target = nxt if _local_path(nxt) else "/overview"
        response: web.Response
        if refresh:
            # Strict session cookies are not sent on the navigation the provider began:
            # a page of our own moves on (a same-site navigation)
            response = self.page(request, "moving.html", "Signed in", target=target)
            response.headers["Refresh"] = f"0; url={target}"
        else:
            response = web.Response(status=303, headers={"Location": target})
        set_host_cookie(response, SESSION, sid, max_age=int(c.session_lifetime))
        response.del_cookie(PRE_CSRF, path="/", secure=True, samesite="Strict")
        return response

    async def _signin_failed(self, who: str, method: str, outcome: str, **detail: Any) -> None:
        """A refused sign-in, in the access record, the log and the count."""
        await self.data.note(who, "signin-failed", "", method=method, outcome=outcome, **detail)
        log.warning(Event.CONSOLE_SIGNIN, method=method, outcome=outcome, **detail)
        self._count(method, outcome)

    def _count(self, method: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.console_signins.labels(method, outcome).inc()

    async def oidc_start(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        client = self._oidc.get(name)
        if client is None:
            raise web.HTTPNotFound()
        browser = secrets.token_urlsafe(24)
        try:
            started = await client.start(
                f"{self.base_url}/oidc/callback", scope="openid email profile"
            )
        except OidcError as e:
            log.warning(Event.CONSOLE_SIGNIN, method="oidc", provider=name, error=str(e)[:300])
            return self._signin_page(
                request, f"{client.provider.label or name} cannot be reached just now.", 502
            )
        await self.data.run(
            self.data.store.put_oidc_state,
            started.state,
            name,
            started.nonce,
            started.verifier,
            browser,
        )
        response = web.HTTPSeeOther(started.url)
        set_host_cookie(response, OIDC_BROWSER, browser, samesite="Lax", max_age=600)
        raise response

    async def oidc_callback(self, request: web.Request) -> web.Response:
        state, code = request.query.get("state", ""), request.query.get("code", "")
        browser = request.cookies.get(OIDC_BROWSER, "")
        client_ip = self.client(request)
        taken = (
            await self.data.run(self.data.store.take_oidc_state, state, browser)
            if state and code and browser
            else None
        )
        if taken is None:
            return self._signin_page(
                request,
                "That sign-in was not started here or took too long. Please try again.",
                400,
            )
        name, nonce, verifier = taken
        client = self._oidc.get(name)
        if client is None:
            raise web.HTTPNotFound()
        refused = ""
        try:
            claims = await client.finish(code, f"{self.base_url}/oidc/callback", nonce, verifier)
        except OidcError as e:
            claims, refused = {}, str(e)
        sub = str(claims.get("sub", ""))
        identity = f"{name}:{sub}"
        display = str(
            claims.get("email") or claims.get("preferred_username") or claims.get("name") or sub
        )
        roles = roles_of(claims, name, self.config) if claims else frozenset()
        if not refused and client.provider.domains and client.verified_email(claims) is None:
            refused = "no verified email within the provider's domains"
        if not refused and not roles:
            refused = "no console role in the token's claims (console.role_claims)"
            if "groups" in claims.get("_claim_names", {}):
                refused += "; the groups claim overflowed: map app roles instead"
        if refused:
            who = f"{display or '?'} ({identity}; console sign-in, from {client_ip})"
            await self._signin_failed(who, "oidc", "refused", provider=name, reason=refused[:300])
            return self._signin_page(request, f"Sign-in refused: {refused}.", 403)
        response = await self._start_session(
            request, identity, display, roles, f"oidc {name}", "", refresh=True
        )
        response.del_cookie(OIDC_BROWSER, path="/", secure=True, samesite="Lax")
        return response

    async def signout(self, request: web.Request) -> web.Response:
        form = await _form(request)
        sid = request.cookies.get(SESSION, "")
        session = await self._session(request)
        sent = form.get("csrf")
        if (
            session is not None
            and isinstance(sent, str)
            and hmac.compare_digest(sent, session.csrf)
        ):
            await self.data.run(self.data.store.end_session, sid)
            request[SESSION_KEY] = session
            await self.data.note(self.actor(request), "signout", "")
        response = web.HTTPSeeOther("/signin")
        response.del_cookie(SESSION, path="/", secure=True, samesite="Strict")
        raise response

    # -- pages ------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        days = 365 if request.query.get("days") == "365" else 30
        counts = await self.data.run(self.data.overview, days, self.clock())
        status = await self.data.run(self.data.status)
        totals = charts.totals(counts)
        return self.page(
            request,
            "overview.html",
            "Overview",
            days=days,
            totals=totals,
            modes_chart=charts.stacked_days(counts, "modes", charts.MODE_COLOURS),
            transports=charts.bars(totals["transports"], charts.TRANSPORT_LABELS),
            tls_versions=charts.bars(totals["tls_versions"], {}),
            states=charts.bars(totals["states"], {}),
            archive_status=status,
            stale=self._stale(status),
        )

    def _stale(self, status: dict[str, Any]) -> bool:
        verify = status.get("verify")
        return verify is None or self.clock() - float(verify.get("at") or 0) > 2 * 86400

    async def search(self, request: web.Request) -> web.Response:
        params = request.query
        asked = any(params.get(k) for k in (*QUERY_FIELDS, "domain", "since", "until"))
        page = params.get("page", "1")
        page_no = int(page) if page.isdigit() and 0 < int(page) <= MAX_PAGE else 1
        results: list[dict[str, Any]] = []
        error = ""
        try:
            query = query_of(params)
        except Refused as e:
            query, error = Query(), str(e)
        if asked and not error:
            try:
                results = await self.data.run(
                    self.data.search,
                    self.actor(request),
                    query,
                    PAGE_SIZE + 1,
                    (page_no - 1) * PAGE_SIZE,
                )
            except ValueError as e:  # subjects not indexed
                error = str(e)
        more = len(results) > PAGE_SIZE
        kept = {k: v for k, v in params.items() if k != "page" and v}
        return self.page(
            request,
            "search.html",
            "Search",
            params=params,
            asked=asked,
            error=error,
            results=results[:PAGE_SIZE],
            page=page_no,
            more=more,
            query_string=urlencode(kept),
            page_link=lambda n: "/search?" + urlencode({**kept, "page": n}),
            modes=MODES,
            states=STATES,
            subjects=self.config.archive.index_subjects,
            query_fields=query.to_dict(),
        )

    async def search_csv(self, request: web.Request) -> web.StreamResponse:
        """The search's load file (a row per recipient), up to `MAX_CSV` messages,
        written as it is read, a page at a time."""
        query = query_of(request.query)
        if not query.to_dict():
            raise Refused("name at least one search field")
        try:
            first, count = await self.data.run(self.data.csv_page, query, 0, True)
        except ValueError as e:  # subjects not indexed
            raise Refused(str(e)) from None
        name = time.strftime("sealgate-search-%Y%m%d-%H%M%S.csv", time.gmtime())
        response = web.StreamResponse(
            headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )
        response.content_type, response.charset = "text/csv", "utf-8"
        response.headers.update(SECURITY_HEADERS)
        await response.prepare(request)
        await response.write(first.encode())
        total = count
        while count == CSV_PAGE and total < MAX_CSV:
            text, count = await self.data.run(self.data.csv_page, query, total, False)
            await response.write(text.encode())
            total += count
        await self.data.note(
            self.actor(request), "search-csv", "", query=query.to_dict(), results=total
        )
        await response.write_eof()
        return response

    async def _of_message(
        self, request: web.Request, read: Callable[..., T], *args: Any
    ) -> tuple[str, T]:
        """The page's message id and what ``read(actor, queue_id, *args)`` says of
        it; 404 when the archive does not have it."""
        queue_id = request.match_info["queue_id"]
        try:
            return queue_id, await self.data.run(read, self.actor(request), queue_id, *args)
        except KeyError:
            raise web.HTTPNotFound() from None

    async def message(self, request: web.Request) -> web.Response:
        queue_id, story = await self._of_message(request, self.data.story)
        return self.page(request, "message.html", f"Message {queue_id}", m=story)

    async def proof(self, request: web.Request) -> web.Response:
        queue_id, proof = await self._of_message(request, self.data.proof)
        return web.Response(
            text=json.dumps(proof, indent=1, sort_keys=True) + "\n",
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="proof-{queue_id}.json"'},
        )

    async def content(self, request: web.Request) -> web.Response:
        queue_id, data = await self._of_message(request, self.data.content)
        shown = render.render(data, f"/messages/{queue_id}/part/{{n}}")
        return self.page(
            request, "content.html", shown.subject or "(no subject)", queue_id=queue_id, shown=shown
        )

    async def part(self, request: web.Request) -> web.Response:
        index = int(request.match_info["n"])
        _, data = await self._of_message(request, self.data.part, index)
        try:
            info, body = render.part_bytes(data, index)
        except KeyError:
            raise web.HTTPNotFound() from None
        response = web.Response(body=body, content_type="application/octet-stream")
        inline = info.content_type.startswith("image/") and info.filename is None
        if inline and info.content_type in ("image/png", "image/jpeg", "image/gif"):
            response.content_type = info.content_type
        else:
            name = info.filename or f"part-{index}"
            response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return response

    async def holds(self, request: web.Request) -> web.Response:
        cases = await self.data.run(self.data.cases)
        shown = request.query.get("case", "")
        held: list[str] = []
        if shown:
            if shown not in {c["case"] for c in cases}:
                raise web.HTTPNotFound()
            held = await self.data.run(self.data.case_ids, shown)
            await self.data.note(self.actor(request), "case-view", "", case=shown)
        return self.page(
            request, "holds.html", "Legal holds", cases=cases, shown=shown, held=held[:1000],
            more=max(0, len(held) - 1000),
        )  # fmt: skip

    async def hold(self, request: web.Request) -> web.Response:
        form = request[FORM_KEY]
        case = str(form.get("case", "")).strip()[:200]
        ids = [str(v) for v in form.getall("selected", []) if v]
        query = query_of(form) if form.get("by_search") else None
        if not case:
            raise Refused("name the case the hold is for")
        if query is not None and not query.to_dict():
            raise Refused("a hold by search needs at least one search field")
        if query is None and not ids:
            raise Refused("select messages, or hold by the search")
        try:
            await self.data.run(self.data.hold, self.actor(request), case, ids, query)
        except ValueError as e:
            raise Refused(str(e)) from None
        raise web.HTTPSeeOther("/holds")

    async def release(self, request: web.Request) -> web.Response:
        case = str(request[FORM_KEY].get("case", ""))
        try:
            await self.data.run(self.data.release, self.actor(request), case)
        except KeyError:
            raise Refused(f"there is no case {case!r}") from None
        raise web.HTTPSeeOther("/holds")

    async def retention(self, request: web.Request) -> web.Response:
        expired = await self.data.run(self.data.expired, self.actor(request))
        a = self.config.archive
        return self.page(
            request,
            "retention.html",
            "Retention",
            archive=a,
            expired=expired[:200],
            expired_count=len(expired),
        )

    async def exports(self, request: web.Request) -> web.Response:
        cases = await self.data.run(self.data.cases)
        return self.page(request, "exports.html", "Exports", cases=cases)

    async def export(self, request: web.Request) -> web.Response:
        form = request[FORM_KEY]
        case = str(form.get("export_case", "")).strip()
        ids = [str(v) for v in form.getall("selected", []) if v]
        query = query_of(form) if form.get("by_search") else Query()
        if case:
            ids += await self.data.run(self.data.case_ids, case)
        if query.to_dict():
            found = await self.data.run(
                self.data.search, self.actor(request), query, MAX_EXPORT + 1, 0, False
            )
            ids += [m["queue_id"] for m in found]
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise Refused("nothing to export: select messages, a case or a search that finds some")
        scope = (f"case {case}; " if case else "") + json.dumps(query.to_dict(), sort_keys=True)
        try:
            data = await self.data.run(self.data.export, self.actor(request), ids, scope)
        except ValueError as e:
            raise Refused(str(e)) from None
        name = time.strftime("sealgate-export-%Y%m%d-%H%M%S.zip", time.gmtime())
        return web.Response(
            body=data,
            content_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def access(self, request: web.Request) -> web.Response:
        q = request.query
        since = _day_start(q.get("since", ""), "since") or self.clock() - 30 * 86400
        until = _day_start(q.get("until", ""), "until")
        rows = await self.data.run(
            self.data.access_log,
            since,
            until + 86400 if until is not None else None,
            q.get("actor", "").strip()[:200],
            q.get("action", "").strip()[:64],
            q.get("queue_id", "").strip()[:64],
        )
        return self.page(request, "access.html", "Access record", rows=rows, params=q)

    async def explain_form(self, request: web.Request) -> web.Response:
        return self.page(request, "explain.html", "Policy explain", result=None, form={})

    async def explain(self, request: web.Request) -> web.Response:
        form = request[FORM_KEY]
        sender = str(form.get("sender", "")).strip()
        recipients = [r.strip() for r in str(form.get("recipients", "")).split() if r.strip()]
        if not sender or "@" not in sender or not recipients:
            raise Refused("give a sender address and at least one recipient")
        if len(recipients) > 20:
            raise Refused("at most 20 recipients at a time")
        text = str(form.get("content", ""))
        subject = str(form.get("subject", "")).replace("\r", " ").replace("\n", " ")
        message = None
        if text or subject:
            message = (
                f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\nSubject: {subject}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            ).encode() + text.replace("\n", "\r\n").encode()
        if self.explainer is None:
            raise Refused("policy explain is not available on this node")
        result = await self.explainer(sender, recipients, message)
        await self.data.note(self.actor(request), "explain", "", recipients=len(recipients))
        return self.page(
            request,
            "explain.html",
            "Policy explain",
            result=result,
            form={
                "sender": sender,
                "recipients": "\n".join(recipients),
                "subject": subject,
                "content": text,
            },
        )
