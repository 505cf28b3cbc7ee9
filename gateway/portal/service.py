"""The portal in the daemon: deposits for recipients decided ``portal`` (the message
sealed in the store, a notification through the normal delivery path), one-time
codes, pickups, replies, expiry, metrics, the access record - and the web server
(`gateway.portal.web`) on its own listener.

Notifications and codes carry no message content; the queue sends them as they
are (verified TLS is not required for them: a recipient whose server has no
STARTTLS is exactly who the portal is for).  A notification's envelope sender is
the original sender, so one that cannot be delivered comes back to them as a DSN.
Replies are new messages from the portal's address to the original sender, decided
by the policy and journaled like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from gateway.archive.service import ArchiveService, master_keys
from gateway.batching import Batcher
from gateway.config import Config, HostPort
from gateway.delivery.results import Deposited, RecipientResult
from gateway.events import Event
from gateway.model import Envelope, PortalAuth, Purpose, strongest_auth
from gateway.observability.logging import AddressRedactor, get_logger
from gateway.observability.metrics import Metrics
from gateway.portal import mail, render
from gateway.portal.credentials import (
    RESETS_PER_DAY,
    hash_secret,
    password_problem,
    verify_secret,
)
from gateway.portal.oidc import OidcClient, OidcError
from gateway.portal.store import OPEN, CodeCheck, Deposit, Item, PortalStore
from gateway.spool.submit import Submit
from gateway.storage.stores import Storage
from gateway.tls import client_context

log = get_logger("gateway.portal")
T = TypeVar("T")

SWEEP_INTERVAL = 60.0


class Portal:
    def __init__(
        self,
        config: Config,
        hostname: str,
        submit: Submit,
        metrics: Metrics,
        redact: AddressRedactor,
        archive: ArchiveService | None,
    ):
        self.config = config
        self.hostname = hostname
        self.submit = submit
        self.metrics = metrics
        self.redact = redact
        self.archive = archive
        # webhook events (queue id, type, data), set by the app when webhooks are on
        self.events: Callable[[str, str, dict[str, Any]], None] | None = None
        pc = config.portal
        self.sender = pc.from_address or f"no-reply@{hostname}"
        self.base_url = (pc.base_url or f"https://{pc.listen}").rstrip("/")
        storage = Storage(config)
        self.store = PortalStore(storage.open("portal"), master_keys(config, True))
        self._shared = storage.shared  # several nodes: rates counted in the store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="portal")
        # Deposits made while the one before is committing share one transaction (a
        # group commit, as the queue's and the archive's writes: a burst of portal
        # mail waits for one commit, not one each), each in a savepoint of its own
        self._deposits = Batcher(self._thread, self.store.deposit_all)
        self._runner: web.AppRunner | None = None
        self._hasher = ThreadPoolExecutor(2, thread_name_prefix="portal-hash")
        self._checking: dict[str, asyncio.Lock] = {}
        self._oidc = self._oidc_clients(config)
        self.tls: ssl.SSLContext | None = None
        self.address: tuple[str, int] = (pc.listen.host, pc.listen.port)  # at start: taken
        self._sweeper: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def allow(self, key: str, limit: int, window: float) -> bool:
        """A request counted against a rate kept in the store (shared by the nodes)."""
        return await self.run(self.store.hit, key, limit, window)

    # -- lifecycle ------------------------------------------------------------------

    def _oidc_clients(self, config: Config) -> dict[str, OidcClient]:
        ctx = client_context(config.tls.ca_file)
        return {p.name: OidcClient(p, ctx) for p in config.portal.oidc_providers}

    async def start(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls  # kept: SIGHUP loads a renewed certificate into it
        from gateway.api.server import ServerLog
        from gateway.portal.web import PortalWeb

        web_app = PortalWeb(self, self.config.portal, self._shared).app()
        server_log = ServerLog("gateway.portal.http", Event.PORTAL_BAD_REQUEST, Event.PORTAL_ERROR)
        self._runner = web.AppRunner(web_app, access_log=None, logger=server_log)
        await self._runner.setup()
        listen = self.config.portal.listen
        site = web.TCPSite(self._runner, listen.host, listen.port, ssl_context=tls)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.address = (host, port)
        if self.config.portal.base_url is None:  # the links name the port taken
            self.base_url = f"https://{HostPort(host, port)}"
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._runner is not None:
            await self._runner.cleanup()
        self._thread.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self.store.close()

    async def _sweep(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001 - the next sweep tries again
                log.error(
                    Event.PORTAL_SWEEP_FAILED, error_type=type(e).__name__, error=str(e)[:200]
                )
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self) -> None:
        """Delete the content of expired messages (counting those never opened) and
        update the gauges."""
        unread = await self.run(self.store.sweep, self.now())
        for item in unread:
            self.metrics.portal_expired_unread.inc()
            self._access(item, "portal", "expired-unread")
            self._event(item, "portal.expired")
        for state, count in await self.run(lambda: list(self.store.stats())):
            self.metrics.portal_messages.labels(state).set(count)

    def _access(self, item: Item, actor: str, action: str, **detail: Any) -> None:
        if self.archive is not None:
            self.archive.access(item.queue_id, actor, action, portal_item=item.id, **detail)
        log.info(Event.PORTAL_ACCESS, queue_id=item.queue_id, item=item.id, action=action)

    def _event(self, item: Item, kind: str) -> None:
        """A webhook event about the item (`gateway.webhooks`), when they are on."""
        if self.events is not None:
            self.events(item.queue_id, kind, {"recipient": item.recipient, "portal_item": item.id})

    # -- the mail path ----------------------------------------------------------------

    def auth_for(self, envelope: Envelope, asked: PortalAuth | None) -> PortalAuth:
        """How the recipient signs in: the strongest of ``portal.auth``, the policy's
        ``portal_auth`` and - when the sender set one - the passphrase."""
        modes = [PortalAuth(self.config.portal.auth)]
        if asked is not None:
            modes.append(asked)
        if envelope.portal_passphrase:
            modes.append(PortalAuth.PASSPHRASE)
        return strongest_auth(*modes)

    async def deposit(
        self,
        envelope: Envelope,
        data: bytes,
        address: str,
        stay: float | None = None,
        auth: PortalAuth | None = None,
    ) -> tuple[RecipientResult, Deposited | None]:
        """Keep the message for ``address`` (``stay`` seconds: the policy's
        portal_expiry, else portal.expiry), opened by the sign-in `auth_for` says, and
        send the notification; the recipient's result (delivered to the portal) and
        the evidence.  A message that needs a passphrase the sender did not set is
        refused (5.7.0): nobody could open it."""
        how = self.auth_for(envelope, auth)
        if how is PortalAuth.PASSPHRASE and not envelope.portal_passphrase:
            header = self.config.portal.passphrase_header
            why = (
                f"the secure portal needs a passphrase for this message and none was set ({header})"
            )
            return RecipientResult(address, "bounced", "5.7.0", why), None
        expires = self.now() + (stay or self.config.portal.expiry)
        item, token = await self._deposits.run(
            Deposit(
                self.store,
                envelope.queue_id,
                address,
                envelope.mail_from,
                data,
                expires,
                how,
                envelope.portal_passphrase or None,
            )
        )
        link = f"{self.base_url}/m/{token}"
        note = mail.notification(
            self.config.portal, self.sender, address, link, expires, self.hostname
        )
        # The original sender is the notification's envelope sender: if it cannot be
        # delivered, the sender gets the delivery status notification (no content).
        notification_id = await self.submit(
            envelope.mail_from or self.sender,
            [address],
            note,
            Purpose.PORTAL_NOTIFICATION,
            {"portal_item": item.id},
        )
        self.metrics.portal_notifications.inc()
        until = datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat(timespec="seconds")
        log.info(
            Event.PORTAL_DEPOSITED,
            queue_id=envelope.queue_id,
            rcpt=self.redact(address),
            item=item.id,
            notification=notification_id,
        )
        why = (
            f"kept in the secure portal until {until} (sign-in: {how.value}); notification "
            f"queued as {notification_id}"
        )
        return RecipientResult(address, "delivered", "2.0.0", why), Deposited(
            item.id, until, notification_id
        )

    # -- the recipient's side --------------------------------------------------------

    # -- what the web layer asks for (gateway.portal.web.PortalService) -------------

    async def item(self, token: str) -> Item | None:
        """The item a link's token opens (its state says whether it can be used)."""
        return await self.run(self.store.item, token)

    async def new_session(self, item: Item, stage: str = OPEN) -> tuple[str, str]:
        """A signed-in session for ``portal.session_ttl``: (session id, CSRF token).
        ``stage``: OPEN, or SET_PASSWORD (it must set a password before it may read)."""
        return await self.run(self.store.new_session, item, self.config.portal.session_ttl, stage)

    async def session(self, sid: str, item: Item, stage: str = OPEN) -> str | None:
        """The CSRF token of a live session of this item at ``stage``, or None."""
        return await self.run(self.store.session, sid, item, stage)

    async def promote(self, sid: str) -> None:
        await self.run(self.store.promote, sid)

    # -- passwords and passphrases (hashing in threads of its own: it is slow) ------

    async def _hashing(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._hasher, fn, *args)

    def _one_at_a_time(self, key: str) -> asyncio.Lock:
        """Checks of one secret run one after the other: simultaneous guesses cannot
        all be compared before the first failure is counted."""
        lock = self._checking.get(key)
        if lock is None:
            if len(self._checking) > 10_000:
                self._checking = {k: v for k, v in self._checking.items() if v.locked()}
            lock = self._checking[key] = asyncio.Lock()
        return lock

    async def has_password(self, item: Item) -> bool:
        return await self.run(self.store.password_of, item.recipient) is not None

    async def password_locked_until(self, item: Item) -> float:
        return await self.run(self.store.account_locked, item.recipient)

    async def check_password(self, item: Item, password: str, actor: str) -> CodeCheck:
        pc = self.config.portal
        async with self._one_at_a_time("password:" + item.recipient.casefold()):
            if await self.run(self.store.account_locked, item.recipient):
                checked = CodeCheck.REFUSED
            else:
                encoded = await self.run(self.store.password_of, item.recipient)
                right = encoded is not None and await self._hashing(
                    verify_secret, encoded, password
                )
                checked = await self.run(
                    self.store.count_password,
                    item.recipient,
                    right,
                    pc.max_code_attempts,
                    pc.lockout,
                )
        self._count_check(item, actor, checked, "password")
        return checked

    async def check_passphrase(self, item: Item, passphrase: str, actor: str) -> CodeCheck:
        pc = self.config.portal
        async with self._one_at_a_time("item:" + item.id):
            encoded = await self.run(self.store.passphrase_of, item)
            right = encoded is not None and await self._hashing(verify_secret, encoded, passphrase)
            checked = await self.run(
                self.store.count_attempt, item, right, pc.max_code_attempts, pc.lockout
            )
        self._count_check(item, actor, checked, "passphrase")
        return checked

    def _count_check(self, item: Item, actor: str, checked: CodeCheck, what: str) -> None:
        if checked is CodeCheck.RIGHT:
            self._access(item, actor, "signed-in", method=what)
        elif checked is CodeCheck.REFUSED:
            self._access(item, actor, "refused-locked", method=what)
        else:
            self.metrics.portal_failed_codes.inc()
            self._access(item, actor, f"wrong-{what}")
        if checked is CodeCheck.LOCKED:
            self.metrics.portal_lockouts.inc()
            self._access(item, actor, "locked", method=what)

    async def may_reset(self, item: Item) -> bool:
        """Whether a code may be sent to reset the address's password today."""
        return await self.run(self.store.resets_today, item.recipient) < RESETS_PER_DAY

    async def set_password(self, item: Item, password: str, actor: str) -> str | None:
        """Set the recipient's password; why it cannot be this one, or None."""
        problem = password_problem(password, item.recipient)
        if problem is not None:
            return problem
        encoded = await self._hashing(hash_secret, password)
        replaced = await self.run(self.store.set_password, item.recipient, encoded)
        if replaced:
            await self.run(self.store.note_reset, item.recipient)
        self._access(item, actor, "password-reset" if replaced else "password-set")
        return None

    # -- OpenID Connect ---------------------------------------------------------------

    def oidc_providers(self) -> list[tuple[str, str]]:
        """(name, label) of each provider, for the sign-in buttons."""
        return [(p.name, p.label or p.name) for p in self.config.portal.oidc_providers]

    @property
    def oidc_redirect(self) -> str:
        return f"{self.base_url}/oidc/callback"

    async def oidc_start(self, item: Item, provider: str, browser: str) -> str | None:
        """Where to send the browser to sign in with ``provider``; None when unknown."""
        client = self._oidc.get(provider)
        if client is None:
            return None
        started = await client.start(self.oidc_redirect, item.recipient)
        await self.run(
            self.store.save_oidc,
            started.state,
            item,
            provider,
            started.nonce,
            started.verifier,
            browser,
        )
        return started.url

    async def oidc_finish(
        self, state: str, code: str, browser: str, client_ip: str
    ) -> tuple[Item | None, str | None]:
        """(the item, None) when the provider proved the recipient's address; else
        (the item if known, why not)."""
        pending = await self.run(self.store.take_oidc, state, browser)
        if pending is None:
            return None, "this sign-in was not started here, or it took too long"
        item_id, provider, nonce, verifier = pending
        item = await self.run(self.store.item_by_id, item_id)
        client = self._oidc.get(provider)
        if item is None or client is None:
            return None, "unknown message or provider"
        actor = f"recipient {item.recipient} from {client_ip} via {provider}"
        try:
            claims = await client.finish(code, self.oidc_redirect, nonce, verifier)
        except OidcError as e:
            self._access(item, actor, "oidc-refused", reason=str(e)[:300])
            return item, "the sign-in could not be verified"
        email = client.verified_email(claims)
        if email is None or email.casefold() != item.recipient.casefold():
            self._access(item, actor, "oidc-refused", reason="not the recipient's verified address")
            return (
                item,
                "the account you signed in with is not the address this message was sent to",
            )
        self._access(
            item, actor, "signed-in", method="oidc", provider=provider, issuer=client.issuer
        )
        return item, None

    async def end_session(self, sid: str) -> None:
        await self.run(self.store.end_session, sid)

    def now(self) -> float:
        """The portal's clock (the store's: tests move it instead of waiting)."""
        return self.store.clock()

    def rate_limited(self) -> None:
        self.metrics.portal_rate_limited.inc()

    async def send_code(self, item: Item, actor: str) -> None:
        code = await self.run(self.store.new_code, item, self.config.portal.code_ttl)
        message = mail.code_message(
            self.config.portal, self.sender, item.recipient, code, self.hostname
        )
        await self.submit(
            self.sender, [item.recipient], message, Purpose.PORTAL_CODE, {"portal_item": item.id}
        )
        self._access(item, actor, "code-sent")

    async def check_code(self, item: Item, code: str, actor: str) -> CodeCheck:
        pc = self.config.portal
        checked = await self.run(
            self.store.check_code, item, code, pc.max_code_attempts, pc.lockout
        )
        if checked is CodeCheck.RIGHT:
            self._access(item, actor, "signed-in")
        elif checked is CodeCheck.REFUSED:
            self._access(item, actor, "refused-locked")
        else:
            self.metrics.portal_failed_codes.inc()
            self._access(item, actor, "wrong-code")
        if checked is CodeCheck.LOCKED:
            self.metrics.portal_lockouts.inc()
            self._access(item, actor, "locked")
        return checked

    async def open(self, item: Item, actor: str) -> bytes:
        data = await self.run(self.store.content, item)
        now = self.now()
        if await self.run(self.store.picked_up, item, now):
            self.metrics.portal_pickups.inc()
            self.metrics.portal_time_to_pickup.observe(now - item.created)
            self._event(item, "portal.opened")  # the first time
        self._access(item, actor, "view")
        return data

    async def part(self, item: Item, index: int, actor: str) -> tuple[render.Part, bytes]:
        data = await self.run(self.store.content, item)
        info, body = render.part_bytes(data, index)
        if info.filename is not None:
            self._access(item, actor, "download", part=index, size=len(body))
        return info, body

    async def reply(
        self, item: Item, text: str, files: list[tuple[str, str, bytes]], actor: str
    ) -> str:
        original = render.parse(await self.run(self.store.content, item))
        message = mail.reply(
            self.config.portal,
            self.sender,
            item.recipient,
            item.sender,
            str(original.get("Subject", "")),
            original.get("Message-ID"),
            text,
            files,
            self.hostname,
        )
        queue_id = await self.submit(
            self.sender, [item.sender], message, Purpose.PORTAL_REPLY, {"portal_item": item.id}
        )
        self.metrics.portal_replies.inc()
        self._access(item, actor, "reply", reply_queue_id=queue_id, attachments=len(files))
        self._event(item, "portal.replied")
        return queue_id

    async def revoke_message(self, queue_id: str, actor: str) -> list[str]:
        """Withdraw every portal item of a message; the ids revoked now."""
        done = []
        for item in await self.run(self.store.items_of, queue_id):
            if await self.revoke(item.id, actor):
                done.append(item.id)
        return done

    async def revoke(self, item_id: str, actor: str) -> bool:
        item = await self.run(self.store.item_by_id, item_id)
        if item is None or not await self.run(self.store.revoke, item_id, actor):
            return False
        self._access(item, actor, "revoked")
        self._event(item, "revoked")
        return True
