"""SMTP worker processes: several aiosmtpd event loops sharing one listening socket.

One Python event loop accepts a few hundred messages a second; a gateway has more
cores than that.  The main process binds the listener (so a port conflict is reported
once, clearly), recovers the spool, and starts ``smtp.workers`` children that inherit
the socket and accept from it, the way Postfix's smtpd processes share theirs.  A
worker writes each message to the spool itself (a small one on its event loop, see
`gateway.spool.store`) and answers 250 only after the fsync; then it tells the main
process ``queued`` over a control socket, so the main process counts the spool and
queues the message.  A large message in one worker cannot stall the sessions of
another.

Control protocol (one JSON object per line, child -> main): ``ready``; ``queued``
with ``queue_id`` and ``size``, and with ``envelope`` (a length) when the message's
envelope (the canonical JSON the spool file holds) and then its bytes follow the line
- a message kept in memory, up to `HANDOVER_MAX`, while the line is not behind
(`HANDOVER_BACKLOG`): the main process then need not read back what it was just
written (else it reads the spool file); ``metrics`` with a snapshot of the worker's
samples (every second and on exit).  The main process adds the snapshots to its own
metrics.
Main -> child: ``reload`` (SIGHUP, after the main process checked the file): the
worker reads the configuration again for its certificate, relay rules and binding.

Workers can run at a lower scheduling priority (``smtp.worker_nice``) than the main
process, which delivers: under CPU saturation senders then wait longer for 250
rather than the queue growing (Postfix's ``in_flow_delay`` has the same aim).  Off by
default: it costs acceptance latency, and on the benchmark it did not pay for that.

Lifecycle: SIGTERM to a worker stops it gracefully (stop accepting, let DATA finish).
A worker dies with the main process (PR_SET_PDEATHSIG) or when the control socket
closes.  A worker that dies unexpectedly is logged and restarted after a pause, and
the main process looks in the spool for what it acknowledged but could not announce
(``on_exited``: `gateway.queue.manager.QueueManager.adopt_strays`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from gateway import heap
from gateway.background import Background
from gateway.config import Config, HostPort, load_config
from gateway.errors import ConfigError, SpoolError
from gateway.events import Event
from gateway.layout import StateLayout
from gateway.model import Envelope
from gateway.observability.logging import configure_logging, get_logger
from gateway.observability.metrics import Metrics
from gateway.spool.store import handed_envelope
from gateway.webhooks import ROUND_GAP

log = get_logger("gateway.smtp.workers")

METRICS_INTERVAL = 1.0
RESTART_DELAY = 1.0
# a message handed over with its ``queued`` line at most (the main process keeps one
# that size for its first attempt: `gateway.queue.manager.CACHE_MESSAGE_MAX`) ...
HANDOVER_MAX = 256 * 1024
# ... while the bytes waiting to go down the line are fewer than this (a main process
# that falls behind reads the spool instead: the worker's memory stays bounded)
HANDOVER_BACKLOG = 4 * 1024**2
ENVELOPE_MAX = 4 * 1024**2  # an envelope handed over: longer is not one a worker wrote
_GAUGES = (
    "sealgate_smtp_connections_active",
    "sealgate_spool_",
    "sealgate_webhook_outbox_events",
    "sealgate_webhook_oldest_event_age_seconds",
)


# the niceness of the webhook process's posting, the lowest: when the CPU is saturated
# mail goes first and the events wait, durable, in the outbox (posted as soon as there
# is time); its outbox's thread keeps the normal one (`_post_webhooks`)
WEBHOOK_NICE = 19
# the shortest time between two wake-ups of the webhook process: its rounds' gap
WAKE_GAP = ROUND_GAP


def worker_count(config: Config) -> int:
    return config.smtp.workers or os.cpu_count() or 1


def listening_socket(config: Config) -> socket.socket:
    return bind(config.listen.smtp)


def bind(listen: HostPort) -> socket.socket:
    """A listening socket the main process binds and its workers inherit."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.create_server(
        (listen.host, listen.port), family=family, backlog=512, reuse_port=False
    )
    sock.setblocking(False)
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    task: asyncio.Task[None] | None = None
    control: asyncio.StreamWriter | None = None  # held: dropping it closes the socket
    snapshot: dict[str, float] = dataclasses.field(default_factory=dict)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    started: float = dataclasses.field(default_factory=time.time)


class WorkerPool:
    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        on_queued: Callable[[str, int, Envelope | None, bytes | None], Awaitable[None] | None],
        on_access: Callable[[dict[str, Any]], None] | None = None,
        api_socket: Path | None = None,
        on_exited: Callable[[float], None] | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.on_queued = on_queued
        # a worker died (it had started at the time given): what it spooled but could
        # not announce is looked for
        self.on_exited = on_exited
        self.on_access = on_access  # the message API's access records, from the workers
        # where the main process serves the API the workers forward to (None: the
        # workers serve no API)
        self.api_socket = api_socket
        self.count = worker_count(config)
        self.sock: socket.socket | None = None
        self.api_sock: socket.socket | None = None
        self.workers: dict[int, _Worker] = {}
        self.retired: dict[str, float] = {}  # counters of workers that have exited
        self._answers = Background()  # replies to the workers' requests, being made
        self._wake_due: float | None = None  # when the next wake-up is sent
        self._woken = -WAKE_GAP  # when the last one was
        self.stopping = False

    async def start(self, timeout: float = 30) -> None:
        self.sock = listening_socket(self.config)
        if self.api_socket is not None:
            self.api_sock = bind(self.config.api.listen)
        for index in range(self.count):
            await self._spawn(index)
        if self.config.webhooks.endpoints:
            await self._spawn(self.hooks_index)  # a process of its own posts the events
        waits = [asyncio.wait_for(w.ready.wait(), timeout) for w in self.workers.values()]
        try:
            await asyncio.gather(*waits)
        except TimeoutError:
            await self.stop(grace=1)
            raise RuntimeError("SMTP workers did not become ready") from None

    def snapshots(self) -> list[dict[str, float]]:
        return [w.snapshot for w in self.workers.values()] + [self.retired]

    @property
    def ready(self) -> bool:
        smtp = [w for w in self.workers.values() if w.index != self.hooks_index]
        return bool(smtp) and all(w.ready.is_set() and w.proc.poll() is None for w in smtp)

    async def _spawn(self, index: int) -> None:
        assert self.sock is not None
        ours, theirs = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "gateway.smtp.workers",
            "--state-dir",
            str(self.config.state_dir),
            "--listen-fd",
            str(self.sock.fileno()),
            "--control-fd",
            str(theirs.fileno()),
            "--index",
            str(index),
        ]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        fds = [self.sock.fileno(), theirs.fileno()]
        if index == self.hooks_index:
            argv += ["--webhooks-only"]
        elif self.api_sock is not None and self.api_socket is not None:
            argv += ["--api-fd", str(self.api_sock.fileno()), "--api-socket", str(self.api_socket)]
            fds.append(self.api_sock.fileno())
        # Our own interpreter and module, arguments from our own configuration.
        proc = subprocess.Popen(argv, pass_fds=fds)  # noqa: S603
        theirs.close()
        worker = _Worker(index, proc)
        self.workers[index] = worker
        reader, worker.control = await asyncio.open_connection(sock=ours)
        worker.task = asyncio.get_running_loop().create_task(self._listen(worker, reader))

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("type")
            if kind == "queued":
                queue_id, size = str(message["queue_id"]), int(message["size"])
                handed_over = await self._handed_over(worker, reader, message, queue_id, size)
                if handed_over is None:
                    break  # the line's framing is lost, or the worker went away
                handed = self.on_queued(queue_id, size, *handed_over)
                if handed is not None:  # cluster.ack: shared - the worker waits for this
                    self._answer(worker, queue_id, handed)
            elif kind == "metrics":
                worker.snapshot = message["samples"]
            elif kind == "access" and self.on_access is not None:
                self.on_access(message)
            elif kind == "ready":
                worker.ready.set()
        await self._exited(worker)

    async def _handed_over(
        self,
        worker: _Worker,
        reader: asyncio.StreamReader,
        message: dict[str, Any],
        queue_id: str,
        size: int,
    ) -> tuple[Envelope | None, bytes | None] | None:
        """A ``queued`` message's envelope and bytes when they follow its line ((None,
        None) when they do not, or do not describe it: then read from the spool);
        None when the line's framing is lost (the worker is ended) or it went away."""
        if "envelope" not in message:
            return None, None
        length = message["envelope"]
        if not (type(length) is int and 0 < length <= ENVELOPE_MAX):
            self._unframed(worker, f"an envelope of {length!r} bytes")
            return None
        if not 0 <= size <= HANDOVER_MAX:
            self._unframed(worker, f"a message of {size} bytes")
            return None
        try:
            payload = await reader.readexactly(length + size)
        except asyncio.IncompleteReadError:
            return None  # it died meanwhile: what it spooled is looked for
        try:
            return handed_envelope(payload[:length], queue_id, size), payload[length:]
        except SpoolError as e:  # then read from the spool, and checked there
            log.error(
                Event.WORKER_HANDOVER_INVALID,
                worker=worker.index,
                error=str(e)[:300],
                action="read from the spool",
            )
            return None, None

    def _unframed(self, worker: _Worker, what: str) -> None:
        """A ``queued`` line announcing what no worker hands over: where its next
        line begins is lost, so the worker is ended (and started again; what it
        spooled but could not announce is looked for, `_exited`)."""
        log.error(
            Event.WORKER_HANDOVER_INVALID,
            worker=worker.index,
            error=f"handed over {what}",
            action="worker restarted",
        )
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()

    async def _exited(self, worker: _Worker) -> None:
        """A worker's control socket closed: keep its counters, and start another
        unless the gateway is stopping."""
        code = await asyncio.get_running_loop().run_in_executor(None, worker.proc.wait)
        for key, value in worker.snapshot.items():
            if not key.startswith(_GAUGES):
                self.retired[key] = self.retired.get(key, 0.0) + value
        worker.snapshot = {}
        if self.stopping:
            return
        log.error(Event.WORKER_EXITED, worker=worker.index, exit_code=code)
        if self.on_exited is not None and worker.index != self.hooks_index:
            self.on_exited(worker.started)
        await asyncio.sleep(RESTART_DELAY)
        if not self.stopping:
            await self._spawn(worker.index)

    def _answer(self, worker: _Worker, queue_id: str, handed: Awaitable[None]) -> None:
        async def answer() -> None:
            try:
                await handed
                reply: dict[str, Any] = {"type": "recorded", "queue_id": queue_id, "ok": True}
            except Exception as e:  # noqa: BLE001 - told to the worker, which answers 451
                reply = {"type": "recorded", "queue_id": queue_id, "ok": False, "error": str(e)}
            if worker.control is not None and not worker.control.is_closing():
                worker.control.write(json.dumps(reply).encode() + b"\n")

        self._answers.run(answer())

    @property
    def hooks_index(self) -> int:
        """The webhook process's place among the workers: after the SMTP ones."""
        return self.count

    def wake_webhooks(self) -> None:
        """The main process wrote webhook events: the webhook process posts them.  At
        most one message per `WAKE_GAP` (a later wake-up within it is sent at its
        end): the dispatcher waits as long between its rounds anyway, and hundreds
        of messages a second would cost both processes more than the posts."""
        if self._wake_due is not None:
            return
        loop = asyncio.get_running_loop()
        self._wake_due = max(loop.time(), self._woken + WAKE_GAP)

        def send() -> None:
            self._wake_due, self._woken = None, loop.time()
            hooks = self.workers.get(self.hooks_index)
            if hooks is not None and hooks.control is not None and not hooks.control.is_closing():
                hooks.control.write(b'{"type": "events"}\n')

        loop.call_at(self._wake_due, send)

    def reload(self) -> None:
        """SIGHUP, once the main process has checked the file: each worker reads the
        configuration again and applies its certificate, relay rules and binding."""
        for w in self.workers.values():
            if w.control is not None and not w.control.is_closing():
                w.control.write(b'{"type": "reload"}\n')

    async def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        tasks = [w.task for w in self.workers.values() if w.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace + 5)
            for w in self.workers.values():
                if w.proc.poll() is None:
                    w.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for w in self.workers.values():
            if w.control is not None:
                w.control.close()
        for sock in (self.sock, self.api_sock):
            if sock is not None:
                sock.close()
        self.sock = self.api_sock = None


# -- the worker process -----------------------------------------------------------------


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the main process died before we could ask to follow it
        raise SystemExit(1)


class _Recording:
    """A worker's side of ``queued``: with ``cluster.ack: shared`` a message is
    acknowledged only when the main process says it is in the shared store."""

    def __init__(self, waiting: bool, control: _Control):
        self.waiting, self.control = waiting, control
        self._futures: dict[str, asyncio.Future[None]] = {}

    def queued(self, env: Envelope, data: bytes | None) -> asyncio.Future[None] | None:
        """The main process queues it: handed over with its envelope and bytes when
        they are in memory (``data``), small enough and the line not behind, else
        read back from the spool there."""
        message: dict[str, Any] = {"type": "queued", "queue_id": env.queue_id, "size": env.size}
        meta = env.spooled_json
        if (
            data is not None
            and meta is not None
            and len(data) == env.size <= HANDOVER_MAX
            and len(meta) <= ENVELOPE_MAX
            and self.control.backlog() < HANDOVER_BACKLOG
        ):
            message["envelope"] = len(meta)
            self.control.send(message, meta, data)
        else:
            self.control.send(message)
        if not self.waiting:
            return None
        self._futures[env.queue_id] = asyncio.get_running_loop().create_future()
        return self._futures[env.queue_id]

    def recorded(self, message: dict[str, Any]) -> None:
        future = self._futures.pop(str(message.get("queue_id")), None)
        if future is not None and not future.done():
            if message.get("ok"):
                future.set_result(None)
            else:
                future.set_exception(SpoolError(str(message.get("error", "not recorded"))))

    def fail_all(self) -> None:
        """The main process went away: nothing more is acknowledged (the senders
        try again)."""
        for future in self._futures.values():
            if not future.done():
                future.set_exception(SpoolError("the main process went away"))
        self._futures.clear()


def _reload(
    ctx: Any,
    config: Config,
    config_path: Path | None,
    index: int,
    api: Any = None,
) -> None:
    """The main process checked the configuration file and says to read it again."""
    from gateway.smtp.context import apply_edge, make_edge

    if config_path is None:
        return
    try:
        new = dataclasses.replace(load_config(config_path), state_dir=config.state_dir)
        edge = make_edge(new)
        if api is not None:
            from gateway.api.server import api_cert_paths
            from gateway.tls import server_context

            cert, key = api_cert_paths(new, ctx.hostname)
            server_context(cert, key)  # checked before anything changes
        apply_edge(ctx, new, edge)
        if api is not None:
            api.messages.messages.apply(new)
            api.tls.load_cert_chain(str(cert), str(key))  # for new connections
    except (ConfigError, OSError, ValueError) as e:  # ssl.SSLError is an OSError
        log.error(Event.RELOAD_FAILED, worker=index, error=str(e)[:300])
        return
    log.info(Event.RELOADED, worker=index, changed=True)


@dataclasses.dataclass
class _Api:
    """A worker's share of the HTTPS API listener (`gateway.api.front`)."""

    server: Any  # ApiServer
    messages: Any  # WorkerApi
    tls: Any  # its TLS context (a reload loads the renewed certificate into it)

    async def stop(self) -> None:
        await self.server.stop()
        await self.messages.forward.close()
        await asyncio.to_thread(self.messages.messages.close)


async def _serve_api(
    config: Config,
    listen: socket.socket | None,
    main_socket: Path | None,
    submitter: Any,
    spool: Any,
    metrics: Metrics,
    send: Callable[[dict[str, Any]], None],
) -> _Api | None:
    """Serve the message API's submissions on the shared socket, the rest forwarded."""
    if listen is None or main_socket is None:
        return None
    from gateway.api.front import ControlJournal, Forwarder, WorkerApi
    from gateway.api.server import ApiServer, api_tls
    from gateway.api.v1 import MessagesApi

    hostname = submitter.hostname
    messages = MessagesApi(config, hostname, submitter, spool, metrics, ControlJournal(send))
    front = WorkerApi(messages, Forwarder(main_socket))
    tls = api_tls(config, hostname)
    server = ApiServer(config.api.listen, tls, front, front, config.smtp.max_message_size)
    await server.start(sock=listen)
    return _Api(server, front, tls)


def _post_webhooks(config: Config, metrics: Metrics) -> Any:
    """The webhook process's dispatcher (`gateway.webhooks.dispatcher`), started -
    its posting at `WEBHOOK_NICE`, its outbox's thread not: that thread writes in
    the queue's database beside the main process's writer, and a writer at the
    lowest priority, preempted by mail while it holds the database's write lock,
    keeps the queue waiting (measured: the main process's writer waited for the
    lock 100-160 times in 6,000 relayed messages, 0.15-0.26 s, against 20-60 times,
    0.04-0.09 s, with the outbox's thread at the normal priority).  So the thread
    is made first, then the event loop's (the posting: HTTP, TLS, signatures) is
    lowered - threads made after it inherit its priority (Linux: per thread)."""
    from gateway.probe.dns import Resolver
    from gateway.storage.stores import Storage
    from gateway.webhooks.dispatcher import Dispatcher
    from gateway.webhooks.outbox import Outbox

    storage = Storage(config)
    outbox = Outbox(storage.open("queue"))  # at start: the loop has nothing else to do
    resolver = Resolver(config.dns.nameservers)
    dispatcher = Dispatcher(config, outbox, storage.node_id, metrics, lambda: resolver)
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WEBHOOK_NICE)
    dispatcher.start()
    return dispatcher


class _Control:
    """A worker's line to the main process: messages out (`send`), the main
    process's messages in (each to ``handle``) until it goes away (then ``gone``),
    metrics reported every `METRICS_INTERVAL`, and SIGTERM/SIGINT to stop.  The
    line stays open until `close`, so what the worker finishes while stopping is
    still answered and reported."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, sock: socket.socket) -> _Control:
        return cls(*await asyncio.open_connection(sock=sock))

    def send(self, message: dict[str, Any], *payload: bytes) -> None:
        """``message`` as a line, and the bytes that follow it (``payload``, joined
        with the line: one copy, one write)."""
        if not self.writer.is_closing():
            self.writer.write(b"".join((json.dumps(message).encode(), b"\n", *payload)))

    def backlog(self) -> int:
        """Bytes written and not yet taken by the socket."""
        return self.writer.transport.get_write_buffer_size()

    def start(
        self,
        index: int,
        metrics: Metrics,
        handle: Callable[[dict[str, Any]], None],
        gone: Callable[[], None] = lambda: None,
    ) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        # Reloading is the main process's business; a HUP sent to the whole process
        # group must not end a worker.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        heap.settle()
        self.send({"type": "ready", "worker": index})
        self._metrics = metrics

        async def report() -> None:
            while True:
                self.send({"type": "metrics", "samples": metrics.snapshot()})
                await asyncio.sleep(METRICS_INTERVAL)

        async def listen() -> None:
            # Lines from the main process, until EOF: the main process went away.
            while line := await self.reader.readline():
                with contextlib.suppress(ValueError):
                    handle(json.loads(line))
            gone()
            self.stop.set()

        self._tasks = [loop.create_task(report()), loop.create_task(listen())]

    async def close(self) -> None:
        """The last metrics, then the line closed."""
        for t in self._tasks:
            t.cancel()
        self.send({"type": "metrics", "samples": self._metrics.snapshot()})
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()


async def _serve(
    config: Config,
    config_path: Path | None,
    listen: socket.socket,
    control_sock: socket.socket,
    index: int,
    api_listen: socket.socket | None = None,
    api_socket: Path | None = None,
) -> None:
    from gateway.smtp.context import make_smtp_context, smtp_hostname
    from gateway.smtp.server import SmtpServer
    from gateway.spool import Spool
    from gateway.spool.store import Reuse
    from gateway.spool.submit import Submitter

    control = await _Control.open(control_sock)
    metrics = Metrics()
    spool = Spool(StateLayout(config.state_dir).spool, config.spool.io_threads)
    spool.reuse = Reuse(spool.free_dir, index)  # the main process recycles into it
    spool.inline_commits = True  # small messages fsynced on the event loop
    spool.start_io()
    recording = _Recording(config.cluster.ack == "shared", control)
    submitter = Submitter(spool, smtp_hostname(config), config.smtp.marker_header, recording.queued)
    ctx = make_smtp_context(config, submitter, metrics, divide_limits_by=worker_count(config))
    spool.siblings = lambda: len(ctx.sessions) - 1  # (whose commits may share a batch)
    server = SmtpServer(ctx)
    await server.start(sock=listen)
    api = await _serve_api(config, api_listen, api_socket, submitter, spool, metrics, control.send)

    def handle(message: dict[str, Any]) -> None:
        if message.get("type") == "reload":
            _reload(ctx, config, config_path, index, api)
        elif message.get("type") == "recorded":
            recording.recorded(message)

    control.start(index, metrics, handle, gone=recording.fail_all)
    await control.stop.wait()
    if api is not None:
        await api.stop()
    await server.stop(grace=10)
    await control.close()
    spool.close()


async def _serve_webhooks(
    config: Config, config_path: Path | None, control_sock: socket.socket, index: int
) -> None:
    """The webhook process (``--webhooks-only``): posts the outbox's events, at a
    lower priority than mail (`WEBHOOK_NICE`) - when the CPU is saturated, events
    wait in the outbox (durable) and mail goes first; they are posted as soon as
    there is time.  Reloads its endpoints when told; ends with the main process."""
    from gateway.webhooks.events import endpoints_of

    control = await _Control.open(control_sock)
    metrics = Metrics()
    hooks = _post_webhooks(config, metrics)

    def handle(message: dict[str, Any]) -> None:
        if message.get("type") == "events":
            hooks.wake()
        elif message.get("type") == "reload" and config_path is not None:
            try:
                new = dataclasses.replace(load_config(config_path), state_dir=config.state_dir)
                hooks.apply(new, endpoints_of(new))
            except (ConfigError, OSError, ValueError) as e:
                log.error(Event.RELOAD_FAILED, worker=index, error=str(e)[:300])

    control.start(index, metrics, handle)
    await control.stop.wait()
    await hooks.close()
    await control.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sealgate-smtp-worker")
    p.add_argument("--config", type=Path)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--api-fd", type=int, default=None)
    p.add_argument("--api-socket", type=Path, default=None)
    p.add_argument("--webhooks-only", action="store_true", help="post webhook events, no SMTP")
    args = p.parse_args(argv)
    _die_with_parent()
    config = dataclasses.replace(load_config(args.config), state_dir=args.state_dir)
    if config.smtp.worker_nice:
        os.nice(config.smtp.worker_nice)  # delivery (the main process) first
    configure_logging(config.logging.level)
    structlog.contextvars.bind_contextvars(worker=args.index)
    listen = socket.socket(fileno=args.listen_fd)
    control = socket.socket(fileno=args.control_fd)
    # libuv's loop (uvloop), as in the main process: the webhook process's posts cost
    # a quarter less CPU than on asyncio's (its TLS in C); an SMTP worker's connection
    # - accept, greeting, HELO, QUIT, close - a fifth to a quarter less (0.19-0.21
    # against 0.23-0.30 ms, four alternating pairs); whole relayed messages: within
    # the noise (bench/compare.py, two runs of 6 rounds: -5 % and 0 %)
    import uvloop

    if args.webhooks_only:
        listen.close()  # it accepts nothing (its posting runs at WEBHOOK_NICE: `_post_webhooks`)
        uvloop.run(_serve_webhooks(config, args.config, control, args.index))
        return 0
    api = socket.socket(fileno=args.api_fd) if args.api_fd is not None else None
    uvloop.run(_serve(config, args.config, listen, control, args.index, api, args.api_socket))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
