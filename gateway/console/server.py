"""server - the console's HTTPS listener (``console.listen``) in the main process: its
own connection to the archive and to the console store, its pages
(`gateway.console.web`), an hourly sweep of ended sessions, and the overview's daily
counts kept ahead of the first look."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

from aiohttp import web

from gateway.config import Config, HostPort
from gateway.events import Event
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics

log = get_logger("gateway.console")
SWEEP_INTERVAL = 3600.0
COUNT_INTERVAL = 6 * 3600.0


class ConsoleServer:
    def __init__(
        self, config: Config, hostname: str, explain: Any = None, metrics: Metrics | None = None
    ):
        self.config, self.hostname, self.explain = config, hostname, explain
        self.metrics = metrics
        self.tls: ssl.SSLContext | None = None
        self.address: tuple[str, int] = (config.console.listen.host, config.console.listen.port)
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._counter: asyncio.Task[None] | None = None
        self.console: Any = None

    async def start(self, tls: ssl.SSLContext) -> None:
        from gateway.api.server import ServerLog
        from gateway.archive.service import master_keys, open_archive
        from gateway.console.service import ConsoleData
        from gateway.console.store import ConsoleStore
        from gateway.console.web import Console
        from gateway.storage.stores import Storage
        from gateway.tls import client_context

        self.tls = tls  # kept: SIGHUP loads a renewed certificate into it
        cfg = self.config
        archive = await asyncio.to_thread(open_archive, cfg, self.hostname)
        store = ConsoleStore(Storage(cfg).open("console"), master_keys(cfg, create=True))
        self.data = ConsoleData(archive, store)
        self.console = Console(
            cfg, self.data, self.explain, client_context(cfg.tls.ca_file), metrics=self.metrics
        )
        server_log = ServerLog("gateway.console.http", Event.CONSOLE_ERROR, Event.CONSOLE_ERROR)
        self._runner = web.AppRunner(self.console.app(), access_log=None, logger=server_log)
        await self._runner.setup()
        listen = cfg.console.listen
        await web.TCPSite(self._runner, listen.host, listen.port, ssl_context=tls).start()
        host, port = self._runner.addresses[0][:2]
        self.address = (host, port)
        if cfg.console.base_url is None:  # the redirect URI names the port taken
            self.console.public_url = f"https://{HostPort(host, port)}"
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._counter = asyncio.get_running_loop().create_task(self._keep_days())

    def apply(self, config: Config) -> None:
        """SIGHUP: providers, role mapping, timeouts, retention shown."""
        self.config = config
        if self.console is not None:
            public = self.console.public_url
            self.console.apply(config)
            if config.console.base_url is None:
                self.console.public_url = public

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.data.run(self.data.store.prune)
            except Exception as e:  # noqa: BLE001 - a full disk, a lost database: next hour
                log.warning(Event.CONSOLE_ERROR, error_type=type(e).__name__, error=str(e)[:300])

    async def _keep_days(self) -> None:
        """The overview's counts of finished days, counted ahead of the first look (a
        day at a time: pages are served in between) and again as days finish."""
        while True:
            await self.keep_days()
            await asyncio.sleep(COUNT_INTERVAL)

    async def keep_days(self) -> None:
        """One round: every finished day of the last 400 not kept yet.  A full disk or
        a lost database is logged: the overview counts what it lacks itself, and the
        next round tries again."""
        try:
            for day in await self.data.run(self.data.settled_days_missing, time.time(), 400):
                await self.data.run(self.data.keep_day, day)
        except Exception as e:  # noqa: BLE001 - see above: never the daemon's end
            log.warning(Event.CONSOLE_ERROR, error_type=type(e).__name__, error=str(e)[:300])

    async def stop(self) -> None:
        for task in (self._sweeper, self._counter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self.console is not None:
            self.data.close()
