#!/usr/bin/env python3
"""Sealgate on PostgreSQL (issue 16): the same relay on SQLite and on a PostgreSQL
server on this machine, in the same run; two nodes against one database; how long a
killed node's recipients wait for another node; what the shared stores grow by.

    .venv/bin/python bench/cluster.py [--messages 3000] [--sizes 4096,51200] [--rounds 3]
                                      [--only relay|two|takeover]

1. Relay (smtp-source, 20 sessions -> Sealgate -> smtp-sink), alternating rounds, medians,
   machine CPU per message beside them: SQLite (the default), PostgreSQL with
   ``cluster.ack: local`` (target >= 0.8x SQLite) and with ``ack: shared`` (reported).
2. Two nodes on one database (ack: local), smtp-source sending half to each at once:
   total throughput (target: not lower than one node's) and CPU per message per node.
3. Takeover: node A is sent 20 messages for a destination that does not answer.  A
   leases the attempts it starts; the rest wait unleased, and once A has shared them
   (``ack: local`` shares what is still open after 10 s) node B delivers those at
   once.  When B has no more to deliver, A is killed with SIGKILL: the time until
   node B delivers the first message A held leased (target <= cluster.lease_timeout
   + 5 s, with the shipped lease timeout of 60 s), and until all 20 are delivered.
4. Growth: bytes per message in each PostgreSQL schema after the runs (for the sizing
   in the README).

PostgreSQL runs with fsync on, as in production.  Needs root (smtp-source,
smtp-sink, and PostgreSQL run as its own user).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from accept import Sealgate, smtp_source  # noqa: E402
from compare import TICK, _children, _ticks  # noqa: E402
from relay import PLAINTEXT_SINK_POLICY, busy_cpu_seconds, counting_sink, run_to  # noqa: E402

from tests.cluster.support import shared_keys  # noqa: E402
from tests.support.postgres import start_postgres, stop_postgres  # noqa: E402


def yaml_of(settings: dict[str, object]) -> str:
    """Dotted settings as YAML lines (flow style for the values)."""
    import yaml

    tree: dict[str, object] = {}
    for dotted, value in settings.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    return yaml.safe_dump(tree)


def process_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and their children so far."""
    return sum(_ticks(p) for pid in pids for p in [pid, *_children(pid)]) / TICK


def relay(args: argparse.Namespace, workdir: Path, db_url: str, password: Path) -> None:
    keys = shared_keys(workdir / "keys")
    variants = {
        "sqlite": {},
        "pg-local": {"cluster.ack": "local"},
        "pg-shared": {"cluster.ack": "shared"},
    }
    sinks, gateways = [], {}
    try:
        for name, cluster in variants.items():
            sink, port, log = counting_sink(workdir)
            sinks.append(sink)
            settings = dict(keys)
            if name != "sqlite":
                settings.update(
                    {
                        "storage.database": f"{db_url}_{name.replace('-', '_')}",
                        "storage.password_file": str(password),
                        "storage.auto_migrate": True,
                        "cluster.node_id": name,
                        **cluster,
                    }
                )
            directory = workdir / name
            directory.mkdir()
            gw = Sealgate(
                directory,
                delivery_extra=f"  smart_host: '127.0.0.1:{port}'\n",
                policy=PLAINTEXT_SINK_POLICY,
                extra=yaml_of(settings),
            )
            gateways[name] = (gw.__enter__(), log)
        for size in (int(s) for s in args.sizes.split(",")):
            runs: dict[str, list[tuple[float, float]]] = {n: [] for n in variants}
            for i in range(args.rounds):
                order = list(variants)
                order = order[i % len(order) :] + order[: i % len(order)]  # who goes first
                for name in order:
                    gw, log = gateways[name]
                    runs[name].append(run_to(gw.smtp_port, args.messages, size, log))
            rate = {k: statistics.median(r for r, _ in v) for k, v in runs.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
            every = "; ".join(f"{k} {', '.join(f'{r:.0f}' for r, _ in v)}" for k, v in runs.items())
            local = rate["pg-local"] / rate["sqlite"]
            print(
                f"relay {size} B, {args.messages} messages, 20 sessions, median of {args.rounds}: "
                f"sqlite {rate['sqlite']:.0f}/s  postgresql ack:local {rate['pg-local']:.0f}/s "
                f"({local:.2f}x, target >= 0.80: {'met' if local >= 0.8 else 'NOT met'})  "
                f"ack:shared {rate['pg-shared']:.0f}/s "
                f"({rate['pg-shared'] / rate['sqlite']:.2f}x)  [every run: {every}]; machine CPU "
                f"per message: sqlite {cpu['sqlite']:.2f} ms, ack:local {cpu['pg-local']:.2f} ms, "
                f"ack:shared {cpu['pg-shared']:.2f} ms",
                flush=True,
            )
    finally:
        for gw, _ in gateways.values():
            gw.__exit__(None, None, None)
        for sink in sinks:
            sink.terminate()


def two_nodes(args: argparse.Namespace, workdir: Path, db_url: str, password: Path) -> None:
    keys = shared_keys(workdir / "keys2")
    sink, port, log = counting_sink(workdir)
    nodes = []
    try:
        for name in ("one", "two"):
            directory = workdir / f"node-{name}"
            directory.mkdir()
            settings = {
                **keys,
                "storage.database": f"{db_url}_two",
                "storage.password_file": str(password),
                "storage.auto_migrate": True,
                "cluster.node_id": name,
            }
            gw = Sealgate(
                directory,
                delivery_extra=f"  smart_host: '127.0.0.1:{port}'\n",
                policy=PLAINTEXT_SINK_POLICY,
                extra=yaml_of(settings),
            )
            nodes.append(gw.__enter__())
        size = 4096
        single, _ = run_to(nodes[0].smtp_port, args.messages, size, log)  # one node alone
        from relay import DeliveryCounter

        delivered = DeliveryCounter(log)
        before = delivered()
        cpu = [process_cpu([n.proc.pid]) for n in nodes]  # type: ignore[union-attr]
        machine = busy_cpu_seconds()
        started = time.monotonic()
        half = args.messages // 2
        senders = [
            threading.Thread(target=smtp_source, args=(n.smtp_port, half, 10, size)) for n in nodes
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        while delivered() - before < 2 * half and time.monotonic() - started < 600:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        per_node = [
            1000 * (process_cpu([n.proc.pid]) - c) / half  # type: ignore[union-attr]
            for n, c in zip(nodes, cpu, strict=True)
        ]
        total = 2 * half / elapsed
        print(
            f"two nodes, one PostgreSQL, {2 * half} messages of {size} B: {total:.0f}/s together, "
            f"one node alone {single:.0f}/s ({total / single:.2f}x, target >= 1.00: "
            f"{'met' if total >= single else 'NOT met'} - 2 cores for both nodes, PostgreSQL, "
            f"source and sink); Sealgate CPU per message per node: "
            f"{', '.join(f'{c:.2f} ms' for c in per_node)}; machine CPU per message "
            f"{1000 * (busy_cpu_seconds() - machine) / (2 * half):.2f} ms",
            flush=True,
        )
    finally:
        for n in nodes:
            n.__exit__(None, None, None)
        sink.terminate()


def silent_server() -> tuple[socket.socket, int]:
    """Accepts connections and never says a word: attempts hang, leases held."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(100)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def takeover(workdir: Path, db_url: str, password: Path) -> None:
    keys = shared_keys(workdir / "keys3")
    silent, silent_port = silent_server()
    sink, port, log = counting_sink(workdir)
    common = {
        **keys,
        "storage.database": f"{db_url}_takeover",
        "storage.password_file": str(password),
        "storage.auto_migrate": True,
    }
    nodes = []
    try:
        for name, hop in (("a", silent_port), ("b", port)):
            directory = workdir / f"takeover-{name}"
            directory.mkdir()
            gw = Sealgate(
                directory,
                delivery_extra=f"  smart_host: '127.0.0.1:{hop}'\n  command_timeout: 600s\n",
                policy=PLAINTEXT_SINK_POLICY,
                extra=yaml_of({**common, "cluster.node_id": name}),
            )
            nodes.append(gw.__enter__())
        smtp_source(nodes[0].smtp_port, 20, 5, 4096)  # a's attempts hang
        # In ack: local a message's content goes to the shared store once it has been
        # open 10 s (SHARE_AFTER); what a node had not shared when it died is its
        # documented loss window, nothing another node could deliver - so A is killed
        # once it has shared everything (its gauge at 0), as the target is about.
        shared_at = time.monotonic()
        while time.monotonic() - shared_at < 60:
            unshared = re.search(
                r"^sealgate_cluster_unshared_messages (\S+)$", nodes[0].metrics(wait=False), re.M
            )
            if unshared and float(unshared.group(1)) == 0 and time.monotonic() - shared_at > 3:
                break
            time.sleep(0.5)
        print(
            f"node A shared its 20 messages {time.monotonic() - shared_at:.1f} s after they "
            "were accepted; killing it",
            flush=True,
        )
        from relay import DeliveryCounter

        # A leases only the attempts it starts: once its first ones hang, the
        # destination is busy and the rest wait unleased - shared, free to any node,
        # so B delivers them as soon as they are shared.  The takeover is about the
        # ones A holds leased: B's deliveries are counted until they stop, then A dies.
        delivered = DeliveryCounter(log)
        free, waited = delivered(), time.monotonic()
        still = waited  # (when the count last changed)
        while time.monotonic() - still < 3 and time.monotonic() - waited < 30:
            time.sleep(0.2)
            count = delivered()
            if count != free:
                free, still = count, time.monotonic()
        leased = 20 - free
        os.kill(nodes[0].proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        killed = time.monotonic()
        while delivered() == free and time.monotonic() - killed < 180:
            time.sleep(0.1)
        first = time.monotonic() - killed
        while delivered() < 20 and time.monotonic() - killed < 240:
            time.sleep(0.1)
        done = delivered()
        met = leased > 0 and first <= 65 and done == 20
        print(
            f"takeover (cluster.lease_timeout 60 s, the default): node B delivered {free} "
            f"of node A's 20 messages before A was killed (not leased by A: shared, free to "
            f"any node); of the {leased} A held leased, the first was delivered by node B "
            f"{first:.1f} s after kill -9 of A, and {done - free} in all after "
            f"{time.monotonic() - killed:.1f} s (target: the first <= 65 s, every one "
            f"delivered: {'met' if met else 'NOT met'})",
            flush=True,
        )
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.__exit__(None, None, None)
        sink.terminate()
        silent.close()


def growth(db_url: str, password: Path, sizes: str) -> None:
    """Bytes per archived message in each schema (tables with their indexes and
    TOAST), the archive's blobs apart from its index."""
    import psycopg

    with psycopg.connect(f"{db_url}_pg_local", password=password.read_text().strip()) as c:
        messages = c.execute("SELECT count(*) FROM sealgate_archive.messages").fetchone()[0]
        rows = c.execute(
            "SELECT n.nspname || CASE WHEN cl.relname = 'blobs' THEN ' blobs' ELSE '' END, "
            "sum(pg_total_relation_size(cl.oid)) FROM pg_class cl "
            "JOIN pg_namespace n ON n.oid = cl.relnamespace "
            "WHERE n.nspname LIKE 'sealgate_%' AND cl.relkind = 'r' GROUP BY 1 ORDER BY 1"
        ).fetchall()
    shown = ", ".join(f"{schema} {size / max(messages, 1):.0f} B" for schema, size in rows)
    sizes_ = sizes.replace(",", " and ")
    print(
        f"PostgreSQL per archived message ({messages} messages of {sizes_} bytes, one recipient, "
        f"smtp-source's text - compresses well): {shown}"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sizes", default="4096,51200")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["relay", "two", "takeover"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (smtp-source/smtp-sink, PostgreSQL as its own user)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-cluster-"))
    shutil.chown(workdir, "root")
    server = start_postgres(fsync=True)
    try:
        base = server.database()  # the others are made beside it by name
        for suffix in ("pg_local", "pg_shared", "two", "takeover"):
            server.database(f"{base.rsplit('/', 1)[1]}_{suffix}")
        if args.only in (None, "relay"):
            relay(args, workdir, base, server.password_file)
            growth(base, server.password_file, args.sizes)
        if args.only in (None, "two"):
            two_nodes(args, workdir, base, server.password_file)
        if args.only in (None, "takeover"):
            takeover(workdir, base, server.password_file)
    finally:
        stop_postgres(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
