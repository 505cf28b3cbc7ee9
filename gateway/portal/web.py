"""The portal's pages (aiohttp): the link's landing page, a one-time code to the
recipient's address, the message, its parts, a secure reply, and clear pages for a
link that is unknown, expired, revoked or locked.

Security: every response carries a strict Content-Security-Policy (nothing but this
origin's images and stylesheet; no scripts at all), frame and referrer denial, and
no caching.  Forms carry a CSRF token (before sign-in a double-submit cookie, after
it the session's token); cookies are ``__Host-`` prefixed, Secure, HttpOnly,
SameSite=Strict.  Requests are limited per client address; wrong codes lock the link
(`PortalStore.check_code`).  Every code sent, failed code, lockout, view, download
and reply is recorded in the archive's access record for that message.
"""

from __future__ import annotations

import hmac
import html
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from gateway.config import PortalConfig
from gateway.events import Event
from gateway.model import PortalAuth
from gateway.observability.logging import get_logger
from gateway.portal import render
from gateway.portal.credentials import MIN_PASSWORD
from gateway.portal.oidc import OidcError
from gateway.portal.store import OPEN, SET_PASSWORD, CodeCheck, Item

log = get_logger("gateway.portal.http")


class PortalService(Protocol):
    """What the web layer asks of the portal (`gateway.portal.service.Portal`): items
    by link, codes, sessions, the message and its parts, replies - each recorded in
    the archive's access record there, not here."""

    async def item(self, token: str) -> Item | None: ...

    async def allow(self, key: str, limit: int, window: float) -> bool: ...

    async def send_code(self, item: Item, actor: str) -> None: ...

    async def check_code(self, item: Item, code: str, actor: str) -> CodeCheck: ...

    async def new_session(self, item: Item, stage: str = OPEN) -> tuple[str, str]: ...

    async def session(self, sid: str, item: Item, stage: str = OPEN) -> str | None: ...

    async def promote(self, sid: str) -> None: ...

    async def has_password(self, item: Item) -> bool: ...

    async def password_locked_until(self, item: Item) -> float: ...

    async def check_password(self, item: Item, password: str, actor: str) -> CodeCheck: ...

    async def check_passphrase(self, item: Item, passphrase: str, actor: str) -> CodeCheck: ...

    async def may_reset(self, item: Item) -> bool: ...

    async def set_password(self, item: Item, password: str, actor: str) -> str | None: ...

    def oidc_providers(self) -> list[tuple[str, str]]: ...

    async def oidc_start(self, item: Item, provider: str, browser: str) -> str | None: ...

    async def oidc_finish(
        self, state: str, code: str, browser: str, client_ip: str
    ) -> tuple[Item | None, str | None]: ...

    async def end_session(self, sid: str) -> None: ...

    async def open(self, item: Item, actor: str) -> bytes: ...

    async def part(self, item: Item, index: int, actor: str) -> tuple[render.Part, bytes]: ...

    async def reply(
        self, item: Item, text: str, files: list[tuple[str, str, bytes]], actor: str
    ) -> str: ...

    def rate_limited(self) -> None: ...

    def now(self) -> float: ...


SESSION = "__Host-sealgate-session"
OIDC_BROWSER = "__Host-sealgate-oidc"  # binds a sign-in under way to this browser
OIDC_RETURN = "__Host-sealgate-oidc-link"  # the link it started from
PRE_CSRF = "__Host-sealgate-csrf"
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# on every response of the portal and the console: no script, no frame, no referrer,
# nothing cached, HTTPS only
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Strict-Transport-Security": "max-age=31536000",
}


def set_host_cookie(
    response: web.StreamResponse,
    name: str,
    value: str,
    samesite: str = "Strict",
    max_age: int | None = None,
) -> None:
    """A ``__Host-`` cookie of the portal or the console, as the prefix requires it
    (Secure, Path=/, no Domain) and never readable by script (HttpOnly)."""
    response.set_cookie(
        name, value, secure=True, httponly=True, samesite=samesite, path="/", max_age=max_age
    )


CODE_REQUESTS = 5  # codes a link may ask for per CODE_WINDOW
CODE_WINDOW = 900.0

CSS = """
:root { --accent: %(colour)s; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: #1a1a1a; background: #f4f5f7; }
header { background: var(--accent); color: #fff; padding: .75rem 1rem; }
header img { max-height: 2.5rem; vertical-align: middle; margin-right: .5rem; }
header span { font-weight: 600; }
main { max-width: 46rem; margin: 0 auto; padding: 1rem; }
.card { background: #fff; border-radius: .5rem; padding: 1rem 1.25rem;
        box-shadow: 0 1px 3px rgba(0,0,0,.12); margin-bottom: 1rem; overflow-wrap: anywhere; }
h1 { font-size: 1.35rem; margin: .25rem 0 1rem; }
button, input[type=submit], a.button { background: var(--accent); color: #fff; border: 0;
        border-radius: .4rem; padding: .75rem 1.25rem; font-size: 1rem; min-height: 44px; }
a.button { display: inline-block; text-decoration: none; }
input[type=text], input[type=password], textarea { width: 100%%; font-size: 1.1rem;
        padding: .6rem;
        border: 1px solid #888; border-radius: .4rem; }
label { display: block; font-weight: 600; margin: .75rem 0 .25rem; }
.meta { color: #444; font-size: .95rem; }
.meta dt { font-weight: 600; } .meta dd { margin: 0 0 .4rem; }
.body img { max-width: 100%%; height: auto; }
.body table { border-collapse: collapse; max-width: 100%%; }
pre.plain { white-space: pre-wrap; font: inherit; margin: 0; }
.error { color: #9b1c1c; font-weight: 600; }
ul.files { padding-left: 1.2rem; } ul.files li { margin: .4rem 0; }
a { color: var(--accent); }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


class RateLimit:
    """At most ``limit`` events per key in ``window`` seconds (in memory: one node)."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    async def check(self, key: str) -> bool:
        return self.allow(key, time.monotonic())

    def allow(self, key: str, now: float) -> bool:
        seen = self._seen[key]
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) >= self.limit:
            return False
        seen.append(now)
        if len(self._seen) > 100_000:  # forget idle keys
            for k in [k for k, v in self._seen.items() if not v]:
                del self._seen[k]
        return True


class SharedRateLimit:
    """At most ``limit`` events per key in each window of ``window`` seconds, counted
    in the portal store: every node of a cluster counts together."""

    def __init__(self, portal: PortalService, name: str, limit: int, window: float):
        self.portal, self.name, self.limit, self.window = portal, name, limit, window

    async def check(self, key: str) -> bool:
        return await self.portal.allow(f"{self.name}:{key}", self.limit, self.window)


class PortalWeb:
    def __init__(self, portal: PortalService, config: PortalConfig, shared: bool = False):
        self.portal = portal
        self.config = config
        self.per_ip: RateLimit | SharedRateLimit
        self.per_link: RateLimit | SharedRateLimit
        if shared:  # several nodes: one count for all of them
            self.per_ip = SharedRateLimit(portal, "ip", self.config.requests_per_minute, 60.0)
            self.per_link = SharedRateLimit(portal, "link", CODE_REQUESTS, CODE_WINDOW)
        else:
            self.per_ip = RateLimit(self.config.requests_per_minute, 60.0)
            self.per_link = RateLimit(CODE_REQUESTS, CODE_WINDOW)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._guard], client_max_size=int(self.config.max_reply_size) + 65536
        )
        app.router.add_get("/static/portal.css", self.css)
        app.router.add_get("/static/logo.png", self.logo)
        app.router.add_get("/m/{token}", self.landing)
        app.router.add_post("/m/{token}/code", self.send_code)
        app.router.add_get("/m/{token}/enter", self.enter)
        app.router.add_post("/m/{token}/login", self.login)
        app.router.add_get("/m/{token}/read", self.read)
        app.router.add_get("/m/{token}/part/{n:\\d+}", self.part)
        app.router.add_post("/m/{token}/reply", self.reply)
        app.router.add_post("/m/{token}/logout", self.logout)
        app.router.add_post("/m/{token}/password", self.password)
        app.router.add_get("/m/{token}/password/new", self.new_password_form)
        app.router.add_post("/m/{token}/password/new", self.new_password)
        app.router.add_post("/m/{token}/passphrase", self.passphrase)
        app.router.add_get("/m/{token}/oidc/{provider}", self.oidc_start)
        app.router.add_get("/oidc/callback", self.oidc_callback)
        return app

    # -- plumbing -------------------------------------------------------------------

    def client(self, request: web.Request) -> str:
        if self.config.behind_proxy:
            forwarded = request.headers.get("X-Forwarded-For", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        return request.remote or "?"

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not await self.per_ip.check(self.client(request)):
            self.portal.rate_limited()
            response: web.StreamResponse = self.page(
                "Too many requests", "<p>Please wait a minute and try again.</p>", status=429
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                if e.status >= 400:
                    response = self.page("Not found", "<p>This page does not exist.</p>", e.status)
                else:
                    raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(self, title: str, body: str, status: int = 200) -> web.Response:
        logo = '<img src="/static/logo.png" alt="">' if self.config.logo_file else ""
        text = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)} - {_e(self.config.organization)}</title>"
            '<link rel="stylesheet" href="/static/portal.css"></head><body>'
            f"<header>{logo}<span>{_e(self.config.organization)}</span> secure messages</header>"
            f'<main><div class="card"><h1>{_e(title)}</h1>{body}</div></main></body></html>'
        )
        return web.Response(text=text, content_type="text/html", charset="utf-8", status=status)

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=CSS % {"colour": self.config.colour}, content_type="text/css")

    async def logo(self, request: web.Request) -> web.Response:
        if self.config.logo_file is None:
            raise web.HTTPNotFound()
        return web.Response(body=self.config.logo_file.read_bytes(), content_type="image/png")

    async def _item(self, request: web.Request) -> tuple[str, Item | web.Response]:
        """The link's item if it can be used now, else the page that says why."""
        token = request.match_info["token"]
        item = await self.portal.item(token) if len(token) < 100 else None
        if item is None:
            return token, self.page(
                "This link is not valid",
                "<p>Please check that you opened the whole link from the message you received.</p>",
                404,
            )
        state = item.state(self.portal.now())
        if state == "revoked":
            return token, self.page(
                "This message was withdrawn",
                "<p>The sender has withdrawn this message. Please contact them if you "
                "still need it.</p>",
                410,
            )
        if state == "expired":
            return token, self.page(
                "This message has expired",
                "<p>This message is no longer available. Please contact the sender if you "
                "still need it.</p>",
                410,
            )
        if state == "locked":
            until = time.strftime("%H:%M UTC", time.gmtime(item.locked_until))
            return token, self.page(
                "This link is locked",
                f"<p>Too many wrong codes were entered. Please try again after {until}.</p>",
                423,
            )
        return token, item

    async def _signed_in(self, request: web.Request, item: Item, stage: str = OPEN) -> str | None:
        """The session's CSRF token when the request carries a live session at
        ``stage``."""
        sid = request.cookies.get(SESSION)
        if not sid:
            return None
        return await self.portal.session(sid, item, stage)

    async def _session_of(self, request: web.Request) -> tuple[str, Item, str] | web.Response:
        """A page that needs sign-in: the link's item and the session's CSRF token;
        without a live session, back to the link's first page."""
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        csrf = await self._signed_in(request, item)
        if csrf is None:
            raise web.HTTPSeeOther(f"/m/{token}")
        return token, item, csrf

    def _actor(self, request: web.Request, item: Item) -> str:
        return f"recipient {item.recipient} from {self.client(request)}"

    def _masked(self, address: str) -> str:
        local, _, domain = address.partition("@")
        return f"{local[:1]}{'*' * max(1, len(local) - 1)}@{domain}"

    def _code_form(self, token: str, csrf: str, error: str = "") -> str:
        err = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
        return (
            f'{err}<form method=post action="/m/{_e(token)}/login">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            '<label for="code">One-time code</label>'
            '<input type=text id="code" name=code inputmode=numeric autocomplete="one-time-code" '
            "required maxlength=20>"
            "<p><button type=submit>Open the message</button></p></form>"
            f'<form method=post action="/m/{_e(token)}/code">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            "<p><button type=submit>Send a new code</button></p></form>"
        )

    def _pre_csrf(self, request: web.Request) -> str:
        return request.cookies.get(PRE_CSRF) or secrets.token_urlsafe(24)

    def _with_pre_csrf(self, response: web.Response, value: str) -> web.Response:
        set_host_cookie(response, PRE_CSRF, value)
        return response

    def _csrf_ok(self, sent: object, expected: str | None) -> bool:
        return (
            isinstance(sent, str)
            and expected is not None
            and hmac.compare_digest(sent.encode(), expected.encode())
        )

    def _forbidden(self) -> web.Response:
        return self.page(
            "Please try again",
            "<p>This form has expired. Go back to the link in your message and try again.</p>",
            403,
        )

    # -- pages ------------------------------------------------------------------------

    async def landing(self, request: web.Request) -> web.Response:
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        if await self._signed_in(request, item):
            raise web.HTTPSeeOther(f"/m/{token}/read")
        csrf = self._pre_csrf(request)
        until = time.strftime("%d %B %Y", time.gmtime(item.expires))
        intro = (
            f"<p>{_e(self.config.organization)} has sent you a secure message. It can be "
            f"opened until {_e(until)}.</p>"
        )
        body = intro + await self._sign_in_form(item, token, csrf)
        return self._with_pre_csrf(self.page("You have a secure message", body), csrf)

    async def _sign_in_form(self, item: Item, token: str, csrf: str, error: str = "") -> str:
        """How this item's recipient proves who they are (`portal.auth`)."""
        err = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
        hidden = f'<input type=hidden name=csrf value="{_e(csrf)}">'
        code_button = (
            f'<form method=post action="/m/{_e(token)}/code">{hidden}'
            "<p><button type=submit>{label}</button></p></form>"
        )
        if item.auth is PortalAuth.PASSPHRASE:
            return (
                f"{err}<p>The sender protected this message with a passphrase, which they "
                "will have given you another way (by phone, for example).</p>"
                f'<form method=post action="/m/{_e(token)}/passphrase">{hidden}'
                '<label for="passphrase">Passphrase</label>'
                '<input type=password id="passphrase" name=passphrase required '
                'autocomplete="off" maxlength=256>'
                "<p><button type=submit>Open the message</button></p></form>"
            )
        if item.auth is PortalAuth.OIDC:
            buttons = "".join(
                f'<p><a class="button" href="/m/{_e(token)}/oidc/{_e(name)}">'
                f"Sign in with {_e(label)}</a></p>"
                for name, label in self.portal.oidc_providers()
            )
            return (
                f"{err}<p>Sign in with the account of "
                f"<strong>{_e(self._masked(item.recipient))}</strong> to open it.</p>{buttons}"
            )
        if item.auth is PortalAuth.PASSWORD and await self.portal.has_password(item):
            return (
                f'{err}<form method=post action="/m/{_e(token)}/password">{hidden}'
                f'<label for="password">Your password for '
                f"{_e(self._masked(item.recipient))}</label>"
                '<input type=password id="password" name=password required '
                'autocomplete="current-password" maxlength=256>'
                "<p><button type=submit>Open the message</button></p></form>"
                + code_button.format(label="Forgot your password? Email me a code")
            )
        if item.auth is PortalAuth.PASSWORD:
            return (
                f"{err}<p>This is your first secure message: we will send a one-time code to "
                f"<strong>{_e(self._masked(item.recipient))}</strong>, then you choose a "
                "password for the next ones.</p>" + code_button.format(label="Email me a code")
            )
        return (
            f"{err}<p>To make sure it is you, we will send a one-time code to "
            f"<strong>{_e(self._masked(item.recipient))}</strong>.</p>"
            + code_button.format(label="Email me a code")
        )

    async def _posted(
        self, request: web.Request
    ) -> tuple[str, Item, dict[str, Any]] | web.Response:
        """A form sent before sign-in: the link's item and the form's fields, when its
        CSRF token matches the cookie's; else the page to answer with."""
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        form = dict(await request.post())
        if not self._csrf_ok(form.get("csrf"), request.cookies.get(PRE_CSRF)):
            return self._forbidden()
        return token, item, form

    async def send_code(self, request: web.Request) -> web.Response:
        posted = await self._posted(request)
        if isinstance(posted, web.Response):
            return posted
        token, item, _ = posted
        if item.auth not in (PortalAuth.CODE, PortalAuth.PASSWORD):
            return self._forbidden()  # a code opens nothing here
        if not await self.per_link.check(item.id):
            raise web.HTTPSeeOther(f"/m/{token}/enter?said=many")
        resetting = item.auth is PortalAuth.PASSWORD and await self.portal.has_password(item)
        if resetting and not await self.portal.may_reset(item):
            return self.page(
                "Too many password resets",
                "<p>The password for this address was reset several times today. Please "
                "try again tomorrow, or contact the sender.</p>",
                429,
            )
        await self.portal.send_code(item, self._actor(request, item))
        raise web.HTTPSeeOther(f"/m/{token}/enter?said=sent")

    async def enter(self, request: web.Request) -> web.Response:
        """The code form, reached by a redirect after each POST (post/redirect/get:
        reloading never sends a form twice)."""
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        csrf = self._pre_csrf(request)
        said = request.query.get("said")
        body, error = "", ""
        if said == "sent":
            body = (
                f"<p>We sent a one-time code to <strong>{_e(self._masked(item.recipient))}"
                "</strong>. It may take a minute to arrive.</p>"
            )
        elif said == "many":
            body = "<p>Several codes were sent already. Please use the latest one.</p>"
        elif said == "wrong":
            error = "That code is not right, or it has expired."
        page = self.page("Enter your code", body + self._code_form(token, csrf, error))
        return self._with_pre_csrf(page, csrf)

    async def login(self, request: web.Request) -> web.Response:
        posted = await self._posted(request)
        if isinstance(posted, web.Response):
            return posted
        token, item, form = posted
        if item.auth not in (PortalAuth.CODE, PortalAuth.PASSWORD):
            return self._forbidden()
        checked = await self.portal.check_code(
            item, str(form.get("code", "")), self._actor(request, item)
        )
        if checked in (CodeCheck.LOCKED, CodeCheck.REFUSED):
            _, page = await self._item(request)  # the locked page
            assert isinstance(page, web.Response)
            return page
        if checked is not CodeCheck.RIGHT:
            raise web.HTTPSeeOther(f"/m/{token}/enter?said=wrong")
        if item.auth is PortalAuth.PASSWORD:  # the code proved the address: now a password
            await self._sign_in(item, f"/m/{token}/password/new", SET_PASSWORD)
        await self._sign_in(item, f"/m/{token}/read")

    async def _sign_in(self, item: Item, to: str, stage: str = OPEN) -> NoReturn:
        """A new session's cookie, and on to ``to``."""
        sid, _ = await self.portal.new_session(item, stage)
        response = web.HTTPSeeOther(to)
        self._set_session(response, sid)
        raise response

    def _set_session(self, response: web.StreamResponse, sid: str) -> None:
        set_host_cookie(response, SESSION, sid, max_age=int(self.config.session_ttl))

    # -- passwords, passphrases, OpenID Connect (portal.auth) ------------------------

    async def password(self, request: web.Request) -> web.Response:
        return await self._secret(request, PortalAuth.PASSWORD, self.portal.check_password)

    async def passphrase(self, request: web.Request) -> web.Response:
        return await self._secret(request, PortalAuth.PASSPHRASE, self.portal.check_passphrase)

    async def _secret(
        self,
        request: web.Request,
        auth: PortalAuth,
        check: Callable[[Item, str, str], Awaitable[CodeCheck]],
    ) -> web.Response:
        """A password or passphrase form sent: on to the message, or why not."""
        posted = await self._posted(request)
        if isinstance(posted, web.Response):
            return posted
        token, item, form = posted
        if item.auth is not auth:
            return self._forbidden()
        checked = await check(item, str(form.get(auth.value, "")), self._actor(request, item))
        if checked is CodeCheck.RIGHT:
            await self._sign_in(item, f"/m/{token}/read")
        csrf = self._pre_csrf(request)
        if checked in (CodeCheck.LOCKED, CodeCheck.REFUSED) and auth is PortalAuth.PASSWORD:
            until = await self.portal.password_locked_until(item)
            return self.page(
                "Your password is locked",
                "<p>Too many wrong passwords were entered. Please try again after "
                f"{_e(time.strftime('%H:%M UTC', time.gmtime(until)))}, or reset your "
                "password with a code sent to your address.</p>"
                + await self._sign_in_form(item, token, csrf),
                423,
            )
        if checked in (CodeCheck.LOCKED, CodeCheck.REFUSED):
            _, page = await self._item(request)  # the link's locked page
            assert isinstance(page, web.Response)
            return page
        body = await self._sign_in_form(item, token, csrf, f"That {auth.value} is not right.")
        return self._with_pre_csrf(self.page("You have a secure message", body, 401), csrf)

    async def new_password_form(self, request: web.Request, error: str = "") -> web.Response:
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        csrf = await self._signed_in(request, item, SET_PASSWORD)
        if csrf is None:
            raise web.HTTPSeeOther(f"/m/{token}")
        err = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
        body = (
            f"{err}<p>Choose a password for messages to "
            f"<strong>{_e(self._masked(item.recipient))}</strong>: at least "
            f"{MIN_PASSWORD} characters - a few words you will remember work well.</p>"
            f'<form method=post action="/m/{_e(token)}/password/new">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            '<label for="new">New password</label>'
            '<input type=password id="new" name=password required autocomplete="new-password" '
            f"minlength={MIN_PASSWORD} maxlength=256>"
            '<label for="again">The same again</label>'
            '<input type=password id="again" name=again required autocomplete="new-password" '
            "maxlength=256>"
            "<p><button type=submit>Save and open the message</button></p></form>"
        )
        return self.page("Choose a password", body, 400 if error else 200)

    async def new_password(self, request: web.Request) -> web.Response:
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        csrf = await self._signed_in(request, item, SET_PASSWORD)
        if csrf is None:
            raise web.HTTPSeeOther(f"/m/{token}")
        form = await request.post()
        if not self._csrf_ok(form.get("csrf"), csrf):
            return self._forbidden()
        password, again = str(form.get("password", "")), str(form.get("again", ""))
        if password != again:
            return await self.new_password_form(request, "The two passwords are not the same.")
        problem = await self.portal.set_password(item, password, self._actor(request, item))
        if problem is not None:
            return await self.new_password_form(request, problem)
        await self.portal.promote(request.cookies[SESSION])  # the session just found
        raise web.HTTPSeeOther(f"/m/{token}/read")

    async def oidc_start(self, request: web.Request) -> web.Response:
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        if item.auth is not PortalAuth.OIDC:
            return self._forbidden()
        browser = secrets.token_urlsafe(24)
        try:
            url = await self.portal.oidc_start(item, request.match_info["provider"], browser)
        except OidcError as e:
            log.warning(Event.PORTAL_OIDC_FAILED, item=item.id, error=str(e)[:300])
            return self.page(
                "Sign-in is not available",
                "<p>The sign-in service cannot be reached just now. Please try again later.</p>",
                503,
            )
        if url is None:
            raise web.HTTPNotFound()
        response = web.HTTPSeeOther(url)
        # Lax: the provider sends the browser back with a cross-site navigation.  The
        # link's token rides along in the browser that already holds it (the store
        # keeps only its digest), for the way back to the message.
        for name, value in ((OIDC_BROWSER, browser), (OIDC_RETURN, token)):
            set_host_cookie(response, name, value, samesite="Lax", max_age=600)
        raise response

    async def oidc_callback(self, request: web.Request) -> web.Response:
        state, code = request.query.get("state", ""), request.query.get("code", "")
        browser = request.cookies.get(OIDC_BROWSER, "")
        if not (state and code and browser):
            return self.page(
                "Sign-in was not completed",
                "<p>Please go back to the link in your message and try again.</p>",
                400,
            )
        item, problem = await self.portal.oidc_finish(state, code, browser, self.client(request))
        if item is None or problem is not None:
            return self.page(
                "Sign-in did not open the message",
                f"<p>{_e((problem or 'unknown message').capitalize())}.</p>"
                "<p>Please sign in with the account of the address the message was sent "
                "to, or contact the sender.</p>",
                403,
            )
        token = request.cookies.get(OIDC_RETURN, "")
        linked = await self.portal.item(token) if 0 < len(token) < 100 else None
        if linked is None or linked.id != item.id:
            return self._forbidden()
        sid, _ = await self.portal.new_session(item)
        # Strict session cookies are not sent on the navigation the provider began: a
        # page of our own moves on to the message (a same-site navigation)
        target = f"/m/{token}/read"
        response = self.page(
            "Signed in",
            f'<p><a href="{_e(target)}">Open the message</a></p>',
        )
        response.headers["Refresh"] = f"0; url={target}"
        self._set_session(response, sid)
        for name in (OIDC_BROWSER, OIDC_RETURN):
            response.del_cookie(name, path="/", secure=True, samesite="Lax")
        return response

    async def read(self, request: web.Request) -> web.Response:
        signed_in = await self._session_of(request)
        if isinstance(signed_in, web.Response):
            return signed_in
        token, item, csrf = signed_in
        data = await self.portal.open(item, self._actor(request, item))
        shown = render.render(data, f"/m/{token}/part/{{n}}")
        files = "".join(
            f'<li><a href="/m/{_e(token)}/part/{p.index}" download>{_e(p.filename or "attachment")}'
            f"</a> <span class=meta>({_e(p.content_type)}, {p.size:,} bytes)</span></li>"
            for p in shown.attachments
        )
        attachments = f'<h2>Attachments</h2><ul class="files">{files}</ul>' if files else ""
        date = f"<dt>Date</dt><dd>{_e(shown.date)}</dd>" if shown.date else ""
        body = (
            '<dl class="meta">'
            f"<dt>From</dt><dd>{_e(shown.sender)}</dd>{date}</dl>"
            f'<div class="body">{shown.body_html}</div>{attachments}'
            f"</div><div class=card><h2>Reply securely</h2>"
            f'<form method=post action="/m/{_e(token)}/reply" enctype="multipart/form-data">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            '<label for="text">Your reply</label>'
            '<textarea id="text" name=text rows=6 required></textarea>'
            '<label for="files">Attach files (optional)</label>'
            '<input type=file id="files" name=files multiple>'
            "<p><button type=submit>Send reply</button></p></form>"
            f'<form method=post action="/m/{_e(token)}/logout">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            "<p><button type=submit>Sign out</button></p></form>"
        )
        return self.page(shown.subject or "(no subject)", body)

    async def part(self, request: web.Request) -> web.Response:
        signed_in = await self._session_of(request)
        if isinstance(signed_in, web.Response):
            return signed_in
        token, item, _ = signed_in
        index = int(request.match_info["n"])
        try:
            info, data = await self.portal.part(item, index, self._actor(request, item))
        except KeyError:
            raise web.HTTPNotFound() from None
        inline = info.content_type.startswith("image/") and info.filename is None
        name = info.filename or f"part-{index}"  # render.safe_filename made it safe
        response = web.Response(body=data, content_type="application/octet-stream")
        if inline and info.content_type in ("image/png", "image/jpeg", "image/gif"):
            response.content_type = info.content_type
        else:
            response.headers["Content-Disposition"] = _attachment(name)
        return response

    async def reply(self, request: web.Request) -> web.Response:
        signed_in = await self._session_of(request)
        if isinstance(signed_in, web.Response):
            return signed_in
        token, item, csrf = signed_in
        text, sent_csrf, files = "", None, []
        room = int(self.config.max_reply_size)
        if not request.content_type.startswith("multipart/"):  # the form sends multipart
            return self.page("Bad request", "<p>The reply form was not sent whole.</p>", 400)
        async for field in await request.multipart():
            if not isinstance(field, BodyPartReader):
                continue  # a nested multipart: browsers do not send one
            data = bytearray()
            while chunk := await field.read_chunk(65536):
                data += chunk
                room -= len(chunk)
                if room < 0:
                    limit = f"{int(self.config.max_reply_size) // (1024 * 1024)} MB"
                    return self.page(
                        "Reply too large",
                        f"<p>A reply with its files can be at most {limit}.</p>",
                        413,
                    )
            if field.name == "csrf":
                sent_csrf = data.decode("utf-8", "replace")
            elif field.name == "text":
                text = data.decode("utf-8", "replace")
            elif field.name == "files" and field.filename:
                ctype = field.headers.get("Content-Type", "application/octet-stream")
                name = render.safe_filename(field.filename) or "attachment"
                files.append((name, ctype, bytes(data)))
        if not self._csrf_ok(sent_csrf, csrf):
            return self._forbidden()
        if not text.strip() and not files:
            raise web.HTTPSeeOther(f"/m/{token}/read")
        await self.portal.reply(item, text, files, self._actor(request, item))
        return self.page(
            "Reply sent",
            f"<p>Your reply was sent securely to the sender.</p>"
            f'<p><a href="/m/{_e(token)}/read">Back to the message</a></p>',
        )

    async def logout(self, request: web.Request) -> web.Response:
        token, item = await self._item(request)
        if isinstance(item, web.Response):
            return item
        csrf = await self._signed_in(request, item)
        sid = request.cookies.get(SESSION)
        if csrf is not None and sid:
            if not self._csrf_ok((await request.post()).get("csrf"), csrf):
                return self._forbidden()
            await self.portal.end_session(sid)
        response = self.page("Signed out", "<p>You have signed out.</p>")
        response.del_cookie(SESSION, path="/", secure=True, samesite="Strict")
        return response


def _attachment(name: str) -> str:
    """Content-Disposition for a download (RFC 6266): the name, and for a name that is
    not ASCII an ASCII fallback with the name itself in RFC 8187 encoding."""
    if name.isascii():
        return f'attachment; filename="{name}"'
    fallback = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
