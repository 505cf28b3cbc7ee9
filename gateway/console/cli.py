"""``sealgate console user ...``: the console's local accounts.

sealgate console user add NAME --role ROLE [--role ROLE] [--password-stdin]
sealgate console user reset NAME [--password-stdin] [--new-totp] [--role ROLE...]
sealgate console user disable NAME
sealgate console user list [--json]

``add`` prints the password (generated unless read from standard input) and the TOTP
secret with its otpauth:// URI for the person's authenticator app; ``reset`` gives a
new password (and with ``--new-totp`` a new secret), unlocks and re-enables the
account and ends its sessions; ``disable`` ends them too.  Each change is recorded
in the archive's access record with who ran the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.actor import cli_actor
from gateway.config import CONSOLE_ROLES, Config
from gateway.console.accounts import (
    check_roles,
    new_password,
    new_totp,
    password_problem,
    provisioning_uri,
)
from gateway.console.store import ConsoleStore
from gateway.errors import ConfigError
from gateway.portal.credentials import hash_secret
from gateway.storage.stores import Storage

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    console = sub.add_parser("console", help="the compliance console's local accounts")
    csub = console.add_subparsers(dest="console_command", required=True, metavar="WHAT")
    user = csub.add_parser("user", help="local accounts: add, reset, disable, list")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = with_config(usub.add_parser("add", help="a new local account (password and TOTP)"))
    add.add_argument("name")
    add.add_argument(
        "--role", action="append", required=True, choices=CONSOLE_ROLES, help="repeat for more"
    )
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password (else one is made)"
    )
    reset = with_config(
        usub.add_parser("reset", help="new password, unlocked, enabled; sessions ended")
    )
    reset.add_argument("name")
    reset.add_argument("--password-stdin", action="store_true")
    reset.add_argument("--new-totp", action="store_true", help="also a new TOTP secret")
    reset.add_argument("--role", action="append", choices=CONSOLE_ROLES, help="new roles")
    disable = with_config(usub.add_parser("disable", help="no more sign-ins; sessions ended"))
    disable.add_argument("name")
    listing = with_config(usub.add_parser("list", help="the accounts"))
    listing.add_argument("--json", action="store_true")


def _store(config: Config) -> ConsoleStore:
    from gateway.archive.service import master_keys

    return ConsoleStore(Storage(config).open("console"), master_keys(config, create=True))


def _password(from_stdin: bool) -> str:
    if not from_stdin:
        return new_password()
    password = sys.stdin.readline().rstrip("\r\n")
    problem = password_problem(password)
    if problem:
        raise ConfigError("--password-stdin", problem)
    return password


def _record(config: Config, action: str, name: str, **detail: Any) -> None:
    """Into the archive's access record, when there is an archive."""
    if not config.archive.enabled:
        return
    from gateway.archive.service import open_archive

    try:
        archive = open_archive(config, socket.gethostname(), create=False)
    except ConfigError:
        print("sealgate: no archive yet: this change is not in an access record", file=sys.stderr)
        return
    try:
        archive.access(cli_actor(), action, "", account=name, **detail)
        archive.make_durable()
    finally:
        archive.index.close()


def run(config: Config, args: argparse.Namespace) -> int:
    command = args.user_command
    name = getattr(args, "name", "")
    if command != "list" and not NAME.fullmatch(name):
        raise ConfigError("NAME", f"{name!r}: letters, digits and . _ @ - (at most 64)")
    store = _store(config)
    try:
        if command == "list":
            return _list(store, args.json)
        if command == "add":
            roles = check_roles(args.role)
            password, secret = _password(args.password_stdin), new_totp()
            try:
                store.add_user(name, hash_secret(password), secret, roles)
            except ValueError as e:
                print(f"sealgate: {e}", file=sys.stderr)
                return 1
            _record(config, "console-user-add", name, roles=list(roles))
            _show(name, None if args.password_stdin else password, secret)
            return 0
        if command == "reset":
            new_roles = check_roles(args.role) if args.role else None
            password = _password(args.password_stdin)
            totp = new_totp() if args.new_totp else None
            try:
                store.reset_user(name, hash_secret(password), totp, new_roles)
            except KeyError:
                print(f"sealgate: no console account {name!r}", file=sys.stderr)
                return 1
            _record(config, "console-user-reset", name, new_totp=bool(totp))
            _show(name, None if args.password_stdin else password, totp)
            return 0
        try:
            store.disable_user(name)
        except KeyError:
            print(f"sealgate: no console account {name!r}", file=sys.stderr)
            return 1
        _record(config, "console-user-disable", name)
        print(f"{name}: disabled; its sessions have ended")
        return 0
    finally:
        store.close()


def _show(name: str, password: str | None, totp: str | None) -> None:
    if password is not None:
        print(f"password:    {password}")
    if totp is not None:
        print(f"TOTP secret: {totp}")
        print(f"TOTP URI:    {provisioning_uri(name, totp)}")
        print("Give these to the person over a trusted channel; they are not shown again.")


def _iso(when: float) -> str | None:
    if not when:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def _list(store: ConsoleStore, as_json: bool) -> int:
    rows: list[dict[str, Any]] = [
        {
            "name": u.name,
            "roles": list(u.roles),
            "disabled": u.disabled,
            "locked_until": _iso(u.locked_until) if u.locked_until > time.time() else None,
            "created": _iso(u.created),
        }
        for u in store.users()
    ]
    if as_json:
        print(json.dumps({"users": rows}, indent=2))
        return 0
    if not rows:
        print("no console accounts (sealgate console user add NAME --role auditor)")
    for r in rows:
        state = "disabled" if r["disabled"] else "active"
        if r["locked_until"] and not r["disabled"]:
            state = f"locked until {r['locked_until']}"
        print(f"{r['name']:<24} {','.join(r['roles']):<30} {state}")
    return 0
