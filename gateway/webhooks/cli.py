"""``sealgate webhooks ...``:

sealgate webhooks secret            a new signing secret (whsec_...) for an endpoint
sealgate webhooks status [--json]   events waiting per endpoint, and those dropped
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.storage.stores import Storage
from gateway.webhooks.events import new_secret
from gateway.webhooks.outbox import Outbox


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    hooks = sub.add_parser("webhooks", help="events posted to applications (webhooks.*)")
    hsub = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    hsub.add_parser("secret", help="print a new signing secret for an endpoint's secret_file")
    st = with_config(hsub.add_parser("status", help="events waiting per endpoint, and dropped"))
    st.add_argument("--json", action="store_true")


def secret() -> int:
    print(new_secret())
    return 0


def run(config: Config, args: argparse.Namespace) -> int:
    storage = Storage(config)
    backlog: dict[str, tuple[int, float | None]] = {}
    dropped: list[dict[str, object]] = []
    if storage.exists("queue"):
        outbox = Outbox(storage.open("queue"))
        try:
            backlog, dropped = outbox.backlog(), outbox.dropped()
        finally:
            outbox.close()
    now = time.time()
    names = [e.name for e in config.webhooks.endpoints]
    names += sorted(set(backlog) - set(names))
    endpoints = [
        {
            "endpoint": name,
            "configured": name in {e.name for e in config.webhooks.endpoints},
            "pending": backlog.get(name, (0, None))[0],
            "oldest_seconds": round(now - oldest, 1)
            if (oldest := backlog.get(name, (0, None))[1])
            else None,
        }
        for name in names
    ]
    if args.json:
        print(json.dumps({"endpoints": endpoints, "dropped": dropped}, indent=2))
        return 0
    for e in endpoints:
        note = "" if e["configured"] else "  (no longer configured: dropped at its next try)"
        age = f", oldest {e['oldest_seconds']:.0f}s" if e["oldest_seconds"] else ""
        print(f"{e['endpoint']:<20} {e['pending']} waiting{age}{note}")
    for d in dropped:
        created = datetime.datetime.fromtimestamp(float(str(d["created"])), datetime.UTC)
        print(
            f"dropped: {d['endpoint']} {d['type']} {d['event_id']} message {d['queue_id']} "
            f"from {created.isoformat(timespec='seconds')} after {d['tries']} tries: "
            f"{d['last_error']}"
        )
    return 0
