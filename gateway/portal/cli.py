"""``sealgate portal ...``: what waits in the portal, and withdrawing it.

    sealgate portal list [--json]
    sealgate portal revoke ID...     (a portal item id, or a queue id: all its items)

A revoked link shows "withdrawn" and its content is deleted at once; the revocation
is recorded in the archive's access record for the message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.actor import cli_actor
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.storage.stores import Storage


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    portal = sub.add_parser("portal", help="the secure portal's messages")
    psub = portal.add_subparsers(dest="portal_command", required=True, metavar="ACTION")
    pl = with_config(psub.add_parser("list", help="messages in the portal and their state"))
    pl.add_argument("--json", action="store_true")
    pr = with_config(psub.add_parser("revoke", help="withdraw links (content deleted at once)"))
    pr.add_argument("ids", nargs="+", metavar="ID", help="portal item id or queue id")
    pr.add_argument(
        "--actor",
        default=None,
        metavar="NOTE",
        help="a note recorded beside the operating-system user (e.g. a ticket)",
    )


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def run(config: Config, args: argparse.Namespace) -> int:
    from gateway.archive.service import master_keys
    from gateway.portal.store import PortalStore

    storage = Storage(config)
    if not storage.exists("portal"):
        where = storage.path("portal")
        raise ConfigError("portal", f"no portal store at {where} (has the gateway run?)")
    store = PortalStore(storage.open("portal"), master_keys(config, create=False))
    try:
        if args.portal_command == "list":
            return _list(store, args.json)
        return _revoke(config, store, args.ids, cli_actor(args.actor))
    finally:
        store.close()


def _list(store: Any, as_json: bool) -> int:
    now = time.time()
    ids = store.ids()
    items = [i for i in map(store.item_by_id, ids) if i is not None]
    rows = [
        {
            "id": i.id,
            "queue_id": i.queue_id,
            "recipient": i.recipient,
            "state": i.state(now),
            "created": _iso(i.created),
            "expires": _iso(i.expires),
            "first_pickup": _iso(i.first_pickup),
        }
        for i in items
    ]
    if as_json:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
        return 0
    for r in rows:
        opened = f"opened {r['first_pickup']}" if r["first_pickup"] else "not opened"
        print(f"{r['id']}  {r['queue_id']}  {r['recipient']}  {r['state']}  {opened}")
    print(f"{len(rows)} item(s)")
    return 0


def _revoke(config: Config, store: Any, ids: list[str], actor: str) -> int:
    status = 0
    revoked = []
    for given in ids:
        items = [store.item_by_id(given)] if given.startswith("p-") else store.items_of(given)
        items = [i for i in items if i is not None]
        if not items:
            print(f"sealgate: no portal item {given}", file=sys.stderr)
            status = 1
            continue
        for item in items:
            if store.revoke(item.id, actor):
                revoked.append(item)
                print(f"{item.id}: revoked ({item.recipient}, message {item.queue_id})")
            else:
                print(f"{item.id}: already revoked")
    if revoked and config.archive.enabled:
        from gateway.archive.service import open_archive

        with_archive = open_archive(config, config.smtp.hostname or "localhost", create=False)
        try:
            for item in revoked:
                with_archive.access(actor, "portal-revoked", item.queue_id, portal_item=item.id)
        finally:
            with_archive.index.close()
    if revoked and config.webhooks.endpoints:
        _tell_webhooks(config, revoked)
    return status


def _tell_webhooks(config: Config, revoked: list[Any]) -> None:
    """A "revoked" event for each item, into the outbox the running gateway posts."""
    from gateway.webhooks.events import Events, endpoints_of
    from gateway.webhooks.outbox import Outbox

    events = Events(endpoints_of(config))
    rows = [
        row
        for item in revoked
        for row in events.rows(
            item.queue_id, "revoked", {"recipient": item.recipient, "portal_item": item.id}
        )
    ]
    outbox = Outbox(Storage(config).open("queue"))
    try:
        outbox.add(rows, time.time())
    finally:
        outbox.close()
