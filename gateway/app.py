"""app - the one place where the stages are wired together and run.

`Gateway.start` prepares the state directory (self-signed certificate, address-hash
key), recovers the spool, then opens the SMTP listener (in this process, or shared by
``smtp.workers`` worker processes, see `gateway.smtp.workers`) and the ops HTTP
listener; `stop` closes them gracefully.  `serve` adds signal handling (SIGTERM and
SIGINT stop, letting messages in DATA finish) and systemd readiness notification
(``Type=notify``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway import heap
from gateway.api.server import ApiServer, api_tls
from gateway.api.v1 import MessagesApi
from gateway.archive.api import ArchiveApi
from gateway.archive.service import ArchiveService, open_archive
from gateway.background import Background
from gateway.config import Config, ConsoleConfig, HostPort, PortalConfig, load_config
from gateway.config_check import check_references
from gateway.config_check import warnings as config_warnings
from gateway.console.server import ConsoleServer
from gateway.crypto.keydir import DirectoryKeyStore, KeyDirectory
from gateway.delivery.attempt import DeliveryAgent
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.layout import StateLayout
from gateway.model import Envelope
from gateway.observability.http import OpsHttpServer
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.portal.service import Portal
from gateway.probe.dns import Resolver
from gateway.probe.keys import KeyStore
from gateway.probe.wkd import WkdKeyStore
from gateway.queue.manager import QueueManager
from gateway.smtp.context import (
    apply_edge,
    make_edge,
    make_redactor,
    make_smtp_context,
    smtp_hostname,
)
from gateway.smtp.server import SmtpServer
from gateway.smtp.workers import WorkerPool, worker_count
from gateway.spool import Spool
from gateway.spool.store import Recycler, Reuse
from gateway.spool.submit import Submitter
from gateway.statelock import StateLock
from gateway.storage.stores import Storage
from gateway.tls import ensure_self_signed, listener_pair, not_after, server_context
from gateway.tlsrpt.service import TlsRptService
from gateway.webhooks.dispatcher import Dispatcher
from gateway.webhooks.events import Events, endpoints_of
from gateway.webhooks.outbox import Outbox

log = get_logger("gateway.app")


class Gateway:
    def __init__(self, config: Config, source: str = "<defaults>", config_path: Path | None = None):
        self.config = config
        self.source = source
        self.config_path = config_path
        self.metrics = Metrics()
        layout = StateLayout(config.state_dir)
        self.spool = Spool(layout.spool, config.spool.io_threads)
        self._lock = StateLock(layout.lock)
        self.hostname = smtp_hostname(config)
        # the one way into the queue; it is told where to hand messages once the
        # queue exists (SMTP opens after that)
        self.submitter = Submitter(
            self.spool, self.hostname, config.smtp.marker_header, lambda envelope, data: None
        )
        self.delivery: DeliveryAgent | None = None
        self.tlsrpt: TlsRptService | None = None
        self.webhooks: Dispatcher | None = None
        self._background = Background()  # portal events on their way to the webhooks
        self._api_socket: Path | None = None  # the main process's API, for the workers
        self.smtp_address = (config.listen.smtp.host, config.listen.smtp.port)  # at start: taken
        self.smtp: SmtpServer | None = None
        self.workers: WorkerPool | None = None
        self.http: OpsHttpServer | None = None
        self.api: ApiServer | None = None
        self.queue: QueueManager | None = None
        self.keydir: KeyDirectory | None = None
        self.keydir_writer: KeyDirectory | None = None
        self.archive: ArchiveService | None = None
        # the one thread that writes the node's local (SQLite) queue state and
        # archive index (`_start`); None with shared stores or without the archive
        self._stores_thread: ThreadPoolExecutor | None = None
        self.archive_api: ArchiveApi | None = None
        self.messages_api: MessagesApi | None = None
        self.portal: Portal | None = None
        self.console: ConsoleServer | None = None
        self._stopped = False

    async def start(self) -> None:
        """Start every part; if one cannot start, what did is stopped again (its
        connections and files closed) and the error goes on to the caller."""
        try:
            await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        cfg = self.config
        policy = check_references(cfg, self.source)
        log.info(Event.STARTING, config=self.source, state_dir=str(cfg.state_dir))
        for warning in config_warnings(cfg):
            log.warning(Event.CONFIG_WARNING, warning=warning)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._lock.acquire()  # StateInUse: another gateway runs on this state_dir
        if cfg.tls.cert_file is None:
            cert, _key, generated = ensure_self_signed(cfg.state_dir, self.hostname)
            if generated:
                log.info(Event.CERT_GENERATED, cert_file=str(cert))
        await self._open_spool()
        # Read from the spool at each scrape: never stale after a removal.
        self.metrics.spool_messages.set_function(lambda: self.spool.messages)
        self.metrics.spool_bytes.set_function(lambda: self.spool.bytes)
        storage = Storage(cfg)
        self.keydir = KeyDirectory(storage.open("keydir"))
        keys: KeyStore = DirectoryKeyStore(self.keydir, metrics=self.metrics)
        if cfg.wkd.enabled:
            # WKD writes through a connection of its own: a connection is never
            # shared by a writing and a reading thread
            self.keydir_writer = KeyDirectory(storage.open("keydir"))
            keys = WkdKeyStore(
                DirectoryKeyStore(self.keydir, metrics=self.metrics),
                self.keydir_writer,
                Resolver(cfg.dns.nameservers),
                port=cfg.wkd.port,
                ca_file=cfg.tls.ca_file,
                timeout=cfg.wkd.timeout,
                cache_ttl=cfg.wkd.cache_ttl,
                negative_ttl=cfg.wkd.negative_ttl,
                metrics=self.metrics,
            )
        if cfg.archive.enabled:
            archive = await asyncio.to_thread(open_archive, cfg, self.hostname)
            if not Storage(cfg).shared:
                # Two threads writing beside the event loop, each waiting for the
                # interpreter lock at every statement, cost more than one doing both
                # in turn (measured: 12 % of the main process's CPU per message and
                # 13 % of the relay rate); a server's stores keep a thread each (a
                # round trip each statement: waiting in turn would add up).
                self._stores_thread = ThreadPoolExecutor(1, thread_name_prefix="stores")
            self.archive = ArchiveService(
                archive, cfg, self.spool, self.metrics, thread=self._stores_thread
            )
        self.delivery = DeliveryAgent(
            cfg, self.metrics, make_redactor(cfg), self.hostname, policy, keys, self.archive
        )
        self.queue = QueueManager(
            cfg,
            self.spool,
            self.metrics,
            make_redactor(cfg),
            self.hostname,
            self.submitter.submit,
            self.delivery,
            self.archive,
            thread=self._stores_thread,
        )
        self.submitter.on_submitted = self.queue.submitted
        await self._start_integrations(self.queue, self.delivery)
        await self.queue.start()
        if self.archive is not None:
            self.archive.start()
        if self.portal is not None:
            await self.portal.start(None if cfg.portal.behind_proxy else self._tls(cfg.portal))
        if worker_count(cfg) > 1:
            make_smtp_context(cfg, self.submitter, self.metrics)  # fail here, not in a worker
            self._api_socket = _internal_socket(cfg) if cfg.api.enabled else None
            self.workers = WorkerPool(
                cfg,
                self.config_path,
                self._worker_queued,
                self._worker_access,
                self._api_socket,
                on_exited=self._worker_exited,
            )
            await self.workers.start()
        else:
            self.smtp = SmtpServer(make_smtp_context(cfg, self.submitter, self.metrics))
            await self.smtp.start()
        self.smtp_address = self._listening_at()
        await self._start_http()
        if cfg.console.enabled:
            await self._start_console()
        self._note_certificates()
        assert self.http is not None
        log.info(
            Event.READY,
            smtp=str(HostPort(*self.smtp_address)),
            http=str(HostPort(*self.http.address)),
            api=str(HostPort(*self.api.address)) if self.api is not None else None,
            portal=str(HostPort(*self.portal.address)) if self.portal is not None else None,
            console=str(HostPort(*self.console.address)) if self.console is not None else None,
            hostname=self.hostname,
            workers=worker_count(cfg),
        )

    async def _open_spool(self) -> None:
        """Recover the spool; done messages' files are recycled for the processes that
        accept mail to write over (`gateway.spool.store.Recycler`)."""
        cfg = self.config
        report = await asyncio.get_running_loop().run_in_executor(None, self.spool.open)
        log.info(
            Event.SPOOL_RECOVERED,
            messages=report.recovered,
            bytes=report.recovered_bytes,
            incomplete_removed=report.incomplete_removed,
            corrupt=len(report.corrupt),
        )
        for name in report.corrupt:
            log.error(Event.SPOOL_CORRUPT, queue_id=name)
        self.spool.recycler = Recycler(
            self.spool.free_dir, worker_count(cfg), cfg.spool.min_free_space
        )
        # this process writes its own mail and the API's (and accepts the SMTP mail
        # too when there are no SMTP workers)
        self.spool.reuse = Reuse(self.spool.free_dir, self.spool.recycler.own)

    async def _start_integrations(self, queue: QueueManager, delivery: DeliveryAgent) -> None:
        """What delivery reports to before the queue starts: TLS-RPT's counts,
        webhook events, the portal."""
        cfg = self.config
        if cfg.tlsrpt.enabled:
            await self._start_tlsrpt(delivery)
        if cfg.webhooks.endpoints:
            await self._start_webhooks(queue, delivery)
        if cfg.portal.enabled:
            self.portal = Portal(
                cfg,
                self.hostname,
                self.submitter.submit,
                self.metrics,
                make_redactor(cfg),
                self.archive,
            )
            delivery.portal = self.portal
            if self.webhooks is not None:
                self.portal.events = self._portal_event

    async def _start_tlsrpt(self, delivery: DeliveryAgent) -> None:
        """TLS-RPT: delivery counts sessions into it; it reports once a day."""
        self.tlsrpt = TlsRptService(
            self.config,
            self.hostname,
            self.metrics,
            self.submitter,
            self.archive,
            lambda: delivery.resolver,  # the resolvers of the configuration in force
        )
        await self.tlsrpt.start()
        delivery.tlsrpt = self.tlsrpt

    async def _start_webhooks(self, queue: QueueManager, delivery: DeliveryAgent) -> None:
        """Webhooks: the queue writes events into the outbox with the states they
        report; the dispatcher posts them."""
        storage = Storage(self.config)
        outbox = await asyncio.to_thread(lambda: Outbox(storage.open("queue")))
        self.webhooks = Dispatcher(
            self.config, outbox, storage.node_id, self.metrics, lambda: delivery.resolver
        )
        queue.webhooks = Events(tuple(self.webhooks.endpoints.values()))
        queue.events_written = self.webhooks.wake
        if worker_count(self.config) > 1:
            # a process of their own posts them, after mail when the CPU is busy
            self.webhooks.remote_wake = self._wake_webhook_process
        else:
            self.webhooks.start()

    def _wake_webhook_process(self) -> None:
        if self.workers is not None:
            self.workers.wake_webhooks()

    def _portal_event(self, queue_id: str, kind: str, data: dict[str, Any]) -> None:
        if self.webhooks is not None:
            self._background.run(self.webhooks.emit(queue_id, kind, data))

    async def _explain(
        self, sender: str, recipients: list[str], message: bytes | None
    ) -> dict[str, Any]:
        """The message API's explain: as ``sealgate explain --json`` (nothing sent)."""
        from gateway.explain import as_json, explain

        assert self.delivery is not None
        policy = self.delivery.policy
        features, explained = await explain(
            self.config, policy, sender, recipients, message, self.hostname, self.delivery.keys
        )
        return as_json(policy, features, explained)

    async def _start_http(self) -> None:
        """The HTTPS API listener (with the archive API when tokens are set) and the
        ops listener."""
        cfg = self.config
        if self.archive is not None and cfg.api.enabled:
            # a connection of its own: API reads never wait behind the journal's thread;
            # without tokens it answers 404 (SIGHUP can add them)
            api_archive = await asyncio.to_thread(open_archive, cfg, self.hostname)
            self.archive_api = ArchiveApi(
                api_archive, cfg.archive.api_tokens, self.metrics, cfg.api.keys
            )
        if cfg.api.enabled:
            self.messages_api = MessagesApi(
                cfg,
                self.hostname,
                self.submitter,
                self.spool,
                self.metrics,
                self.archive,
                self._explain,
            )
            self.messages_api.portal = self.portal
            self.api = ApiServer(
                cfg.api.listen,
                api_tls(self.config, self.hostname),
                self.archive_api,
                self.messages_api,
                cfg.smtp.max_message_size,
            )
            if self.workers is not None and self.workers.api_sock is not None:
                # the workers serve the listener; here, what they forward
                assert self._api_socket is not None
                await self.api.start(unix=self._api_socket)
                self.api.address = self.workers.api_sock.getsockname()[:2]
            else:
                await self.api.start()
        self.http = OpsHttpServer(cfg.listen.http, self.render_metrics, self.readiness)
        await self.http.start()

    async def _start_console(self) -> None:
        """The compliance console's listener (it reads the archive: none without one)."""
        cfg = self.config
        if not cfg.archive.enabled:
            return  # config_warnings said so at start
        self.console = ConsoleServer(cfg, self.hostname, self._explain, self.metrics)
        await self.console.start(self._tls(cfg.console))

    def _listening_at(self) -> tuple[str, int]:
        """Where the SMTP listener listens (the port taken, when it names port 0)."""
        if self.workers is not None:
            assert self.workers.sock is not None
            host, port = self.workers.sock.getsockname()[:2]
        else:
            assert self.smtp is not None
            host, port = self.smtp.sockets[0].getsockname()[:2]
        return host, port

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and apply what can change live.

        Applied to what starts afterwards, no connection dropped: the policy file and
        the delivery settings (routes, smart host, CA file, resolvers, timeouts), the
        DKIM and S/MIME/PGP signing keys, the TLS certificates and keys of the SMTP
        listener, the portal, the API and the console (renewals), the relay rules and
        the tenant binding (in every SMTP worker too), the archive API's tokens, the
        console's providers, role mapping and timeouts, TLS-RPT's organization and
        contact, the webhook endpoints and their secrets.  Listener
        addresses, the state directory, worker counts, turning TLS-RPT on or off
        and webhooks from none to some need a restart.  A bad file
        is reported (file, line, key or the file that fails) and changes nothing: the
        old settings stay in force.
        """
        if self.config_path is None:
            log.info(Event.RELOADED, changed=False, reason="running on embedded defaults")
            return
        try:
            new = load_config(self.config_path)
            new = dataclasses.replace(new, state_dir=self.config.state_dir)
            policy = check_references(new, str(self.config_path))
            edge = make_edge(new) if self.smtp is not None else None
            https = self._https_renewals(new)
            endpoints = endpoints_of(new) if self.webhooks is not None else ()
            if self.queue is not None:
                self.queue.apply(new, policy)  # the last step that can fail
        except (ConfigError, OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.error(Event.RELOAD_FAILED, error=str(e)[:500])
            return
        # Everything has been read and checked: from here on nothing raises.
        self.config = new
        if self.smtp is not None and edge is not None:
            apply_edge(self.smtp.ctx, new, edge)
        if self.workers is not None:
            self.workers.reload()
        for live, cert, key in https:
            live.load_cert_chain(str(cert), str(key))
        if self.archive_api is not None:
            self.archive_api.tokens, self.archive_api.keys = new.archive.api_tokens, new.api.keys
        if self.messages_api is not None:
            self.messages_api.apply(new)
        if self.tlsrpt is not None:
            self.tlsrpt.apply(new)
        if self.console is not None:
            self.console.apply(new)
        if self.webhooks is not None and self.queue is not None:
            self.webhooks.apply(new, endpoints)
            self.queue.webhooks = Events(endpoints)
        self._note_certificates()
        log.info(Event.RELOADED, changed=True, config=str(self.config_path), policy=policy.stamp)

    def _https_renewals(self, new: Config) -> list[tuple[ssl.SSLContext, Path, Path]]:
        """The portal's and the API's live TLS contexts with the certificate and key
        ``new`` names, each pair checked on a scratch context first (a live context
        that failed half-way would serve a certificate without its key)."""
        out = []
        servers = ((self.portal, new.portal), (self.api, new.api), (self.console, new.console))
        for server, section in servers:
            live = getattr(server, "tls", None)
            if live is None:
                continue
            cert, key = self._cert_and_key(new, section.cert_file, section.key_file)
            server_context(cert, key)
            out.append((live, cert, key))
        return out

    def _note_certificates(self) -> None:
        """``sealgate_certificate_expiry_timestamp_seconds`` for each certificate the
        gateway presents or signs with."""
        cfg = self.config
        smtp, _ = self._cert_and_key(cfg, None, None)
        uses: dict[str, Path | None] = {"smtp": smtp}
        if self.portal is not None and not cfg.portal.behind_proxy:
            uses["portal"] = self._cert_and_key(cfg, cfg.portal.cert_file, cfg.portal.key_file)[0]
        if self.api is not None:
            uses["api"] = self._cert_and_key(cfg, cfg.api.cert_file, cfg.api.key_file)[0]
        if self.console is not None:
            uses["console"] = self._cert_and_key(cfg, cfg.console.cert_file, cfg.console.key_file)[
                0
            ]
        uses["smime_signing"] = cfg.smime.signing_cert_file
        for use, path in uses.items():
            if path is None:
                continue
            try:
                self.metrics.certificate_expiry.labels(use).set(not_after(path))
            except (OSError, ValueError, IndexError):
                self.metrics.certificate_expiry.remove(use)

    def _worker_access(self, message: dict[str, Any]) -> None:
        """A worker answered a message API call: the access record keeps it."""
        if self.archive is not None:
            detail = message.get("detail") or {}
            self.archive.access(
                str(message.get("queue_id", "")),
                str(message.get("actor", "")),
                str(message.get("action", "")),
                **(detail if isinstance(detail, dict) else {}),
            )

    def _worker_exited(self, started: float) -> None:
        """An SMTP worker died (it is started again): counted, and what it spooled
        but could not announce is looked for."""
        self.metrics.worker_exits.inc()
        if self.queue is not None:
            self.queue.adopt_strays_soon(started)

    def _worker_queued(
        self, queue_id: str, size: int, envelope: Envelope | None, data: bytes | None
    ) -> Awaitable[None] | None:
        """A worker process spooled a message: count it here, then queue it - with
        its envelope and bytes when the worker handed them over, else read back from
        the spool."""
        self.spool.note_committed(size)
        if self.queue is not None:
            return self.queue.queued(queue_id, envelope, size=size, data=data)
        return None

    def _tls(self, section: PortalConfig | ConsoleConfig) -> ssl.SSLContext:
        """A web listener's HTTPS: its own certificate, else the SMTP listener's."""
        return server_context(*self._cert_and_key(self.config, section.cert_file, section.key_file))

    def _cert_and_key(
        self, config: Config, cert: Path | None, key: Path | None
    ) -> tuple[Path, Path]:
        """A listener's own pair, else the SMTP listener's, else the self-signed one."""
        return listener_pair(config, self.hostname, cert, key)

    def render_metrics(self) -> bytes:
        if self.workers is not None:
            return self.metrics.render(*self.workers.snapshots())
        return self.metrics.render()

    def readiness(self) -> str | None:
        if self.workers is not None:
            if not self.workers.ready or self.workers.stopping:
                return "smtp workers not running"
        elif self.smtp is None or not self.smtp.sockets or self.smtp.ctx.stopping:
            return "smtp listener not running"
        if not os.access(self.spool.queue_dir, os.W_OK):
            return "spool not writable"
        try:
            free = self.spool.free_space()
        except OSError:
            return "spool not writable"
        if free < self.config.spool.min_free_space:
            return f"spool file system has {free} bytes free (spool.min_free_space)"
        return None

    async def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        log.info(Event.STOPPING)
        if self.workers is not None:
            await self.workers.stop(grace)
        if self.smtp is not None:
            await self.smtp.stop(grace)
        if self.portal is not None:
            await self.portal.stop()
        if self.console is not None:
            await self.console.stop()
        if self.api is not None:
            await self.api.stop()
        if self.queue is not None:
            await self.queue.stop(grace)
        await self._close_stores()
        if self._stores_thread is not None:
            self._stores_thread.shutdown(wait=True)
        if self.http is not None:
            await self.http.stop()
        if self.archive_api is not None:
            self.archive_api.close()
        if self.messages_api is not None:
            self.messages_api.close()
        self.spool.close()
        self._lock.release()
        log.info(Event.STOPPED)

    async def _close_stores(self) -> None:
        """After the queue stopped: the last sessions' TLS-RPT counts are written,
        the archive's last records, the key directory closed; events not posted
        wait in the outbox."""
        await self._background.settle(5)
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.tlsrpt is not None:
            await self.tlsrpt.close()
        if self.archive is not None:
            await self.archive.close()
        for directory in (self.keydir, self.keydir_writer):
            if directory is not None:
                directory.close()


def _internal_socket(config: Config) -> Path:
    """Where the main process serves the API the workers forward to: in the state
    directory, or - a Unix socket's path is at most 107 bytes - a private temporary
    directory."""
    run = config.state_dir.resolve() / "run"
    if len(str(run / "api.sock")) > 100:
        return Path(tempfile.mkdtemp(prefix="sealgate-")) / "api.sock"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    run.chmod(0o700)
    return run / "api.sock"


def _sd_notify(message: str) -> None:
    """systemd readiness protocol (sd_notify(3)); a no-op outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(target)
        sock.sendall(message.encode())


async def serve(gateway: Gateway) -> None:
    """Run until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    await gateway.start()
    heap.settle()  # the daemon's own process only: not a test's that starts a Gateway
    _sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        _sd_notify("STOPPING=1")
        await gateway.stop()
