"""``sealgate cluster status``: the nodes sharing this configuration's database - last
heartbeat, leases held, version, digests of their configuration and policy (a node
running something else stands out) - and the backlog."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.queue.store import QueueStore
from gateway.storage.stores import Storage


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    cluster = sub.add_parser("cluster", help="the nodes sharing storage.database")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    st = with_config(
        csub.add_parser(
            "status", help="nodes, heartbeats, leases, versions and configuration digests"
        )
    )
    st.add_argument("--json", action="store_true")


def run(config: Config, args: argparse.Namespace) -> int:
    storage = Storage(config)
    if not storage.shared:
        raise ConfigError("storage.database", "one node: the cluster needs a postgresql:// URL")
    store = QueueStore(storage.open("queue"), storage.node_id)
    try:
        now = time.time()
        nodes = store.nodes()
        depth = store.depth()
    finally:
        store.close()
    timeout = config.cluster.lease_timeout
    for n in nodes:
        n["silent_seconds"] = round(now - n["heartbeat"], 1)
        n["alive"] = n["silent_seconds"] < timeout
    configs = {n.get("config") for n in nodes if n["alive"]}
    policies = {n.get("policy") for n in nodes if n["alive"]}
    if args.json:
        print(json.dumps({"nodes": nodes, "backlog": depth}, indent=2))
    else:
        for n in nodes:
            state = "alive" if n["alive"] else f"silent {n['silent_seconds']:.0f}s"
            odd = []
            if len(configs) > 1:
                odd.append(f"config {n.get('config')}")
            if len(policies) > 1:
                odd.append(f"policy {n.get('policy')}")
            print(
                f"{n['node']:<20} {state:<14} leases {n['leases']:<5} "
                f"v{n.get('version', '?'):<8} since {_iso(n['started'])}"
                + (f"  DIFFERS: {', '.join(odd)}" if odd else "")
            )
        print("backlog: " + ", ".join(f"{k} {v}" for k, v in depth.items()))
    return 0 if len(configs) <= 1 and len(policies) <= 1 else 1


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")
