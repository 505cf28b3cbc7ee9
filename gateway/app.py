"""app - the one place where the stages are wired together and run.

`Gateway.start` prepares the state directory (self-signed certificate, address-hash
key), recovers the spool, then opens the SMTP and ops HTTP listeners; `stop` closes
them gracefully.  `run` adds signal handling (SIGTERM/SIGINT stop, letting messages
in DATA finish) and systemd readiness notification (``Type=notify``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from gateway.config import Config
from gateway.config_check import check_references
from gateway.events import Event
from gateway.observability.http import OpsHttpServer
from gateway.observability.logging import AddressRedactor, get_logger, load_or_create_key
from gateway.observability.metrics import Metrics
from gateway.smtp.auth import RelayPolicy, load_users
from gateway.smtp.server import SmtpContext, SmtpServer
from gateway.spool import Spool
from gateway.tls import ensure_self_signed, server_context

log = get_logger("gateway.app")


class Gateway:
    def __init__(self, config: Config, source: str = "<defaults>"):
        self.config = config
        self.source = source
        self.metrics = Metrics()
        self.spool = Spool(config.state_dir / "spool", config.spool.io_threads)
        self.hostname = config.smtp.hostname or socket.getfqdn()
        self.smtp: SmtpServer | None = None
        self.http: OpsHttpServer | None = None

    async def start(self) -> None:
        cfg = self.config
        check_references(cfg, self.source)
        log.info(Event.STARTING, config=self.source, state_dir=str(cfg.state_dir))
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        cert, key = cfg.tls.cert_file, cfg.tls.key_file
        if cert is None or key is None:
            cert, key, generated = ensure_self_signed(cfg.state_dir, self.hostname)
            if generated:
                log.info(Event.CERT_GENERATED, cert_file=str(cert))
        relay = RelayPolicy(cfg.relay.networks, cfg.relay.client_certs,
                            load_users(cfg.relay.users_file) if cfg.relay.users_file else {})
        tls_context = server_context(cert, key, cfg.tls.min_version, cfg.relay.client_ca_file,
                                     ask_client_cert=relay.asks_client_cert)
        redact = self._redactor()
        report = await asyncio.get_running_loop().run_in_executor(None, self.spool.open)
        log.info(Event.SPOOL_RECOVERED, messages=report.recovered, bytes=report.recovered_bytes,
                 incomplete_removed=report.incomplete_removed, corrupt=len(report.corrupt))
        for name in report.corrupt:
            log.error(Event.SPOOL_CORRUPT, queue_id=name)
        self.metrics.spool_messages.set(self.spool.messages)
        self.metrics.spool_bytes.set(self.spool.bytes)
        ctx = SmtpContext(cfg, self.hostname, relay, self.spool, self.metrics, redact, tls_context)
        self.smtp = SmtpServer(ctx)
        await self.smtp.start()
        self.http = OpsHttpServer(cfg.listen.http, self.metrics, self.readiness)
        await self.http.start()
        log.info(Event.READY, smtp=str(cfg.listen.smtp), http=str(cfg.listen.http),
                 hostname=self.hostname)

    def _redactor(self) -> AddressRedactor:
        lc = self.config.logging
        if lc.addresses != "hash":
            return AddressRedactor(lc.addresses)
        key_file = lc.address_hash_key_file or address_key_path(self.config.state_dir)
        return AddressRedactor("hash", load_or_create_key(key_file))

    def readiness(self) -> str | None:
        if self.smtp is None or not self.smtp.sockets or self.smtp.ctx.stopping:
            return "smtp listener not running"
        if not os.access(self.spool.queue_dir, os.W_OK):
            return "spool not writable"
        return None

    async def stop(self, grace: float = 10.0) -> None:
        log.info(Event.STOPPING)
        if self.smtp is not None:
            await self.smtp.stop(grace)
        if self.http is not None:
            await self.http.stop()
        self.spool.close()
        log.info(Event.STOPPED)


def address_key_path(state_dir: Path) -> Path:
    return state_dir / "keys" / "address-hash.key"


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
    await gateway.start()
    _sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        _sd_notify("STOPPING=1")
        await gateway.stop()
