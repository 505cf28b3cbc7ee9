"""The ``sealgate`` command.

    sealgate run [--config FILE] [--state-dir DIR]
    sealgate check-config [--config FILE]
    sealgate queue list [--json]
    sealgate queue show ID [--json]
    sealgate hash-password            (reads the password from standard input)
    sealgate hash-address ADDRESS     (the hash that logs show for ADDRESS)

Without ``--config`` the embedded defaults apply.  Exit status: 0 success, 1 a
failed operation (e.g. unknown queue id), 78 (EX_CONFIG) a configuration error,
whose message names the file, line and key.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import Config, load_config
from gateway.config_check import check_references
from gateway.errors import ConfigError, SpoolError
from gateway.model import Envelope

EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealgate", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"sealgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", type=Path, help="YAML configuration (default: embedded)")
        sp.add_argument("--state-dir", type=Path, help="override state_dir")
        return sp

    with_config(sub.add_parser("run", help="run the gateway"))
    with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    queue = sub.add_parser("queue", help="inspect the spool")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    ql = with_config(qsub.add_parser("list", help="list queued messages"))
    ql.add_argument("--json", action="store_true", help="one JSON object per line")
    qs = with_config(qsub.add_parser("show", help="show one message's envelope"))
    qs.add_argument("queue_id")
    qs.add_argument("--json", action="store_true")
    sub.add_parser("hash-password", help="hash a password for relay.users_file")
    ha = with_config(sub.add_parser("hash-address", help="the log hash of an address"))
    ha.add_argument("address")
    return p


def _load(args: argparse.Namespace) -> tuple[Config, str]:
    config = load_config(args.config)
    if args.state_dir is not None:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    return config, str(args.config) if args.config else "<defaults>"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"sealgate: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "hash-password":
        return _hash_password()
    config, source = _load(args)
    if args.command == "check-config":
        check_references(config, source)
        print(f"{source}: configuration OK")
        return 0
    if args.command == "run":
        from gateway.app import Gateway, serve
        from gateway.observability.logging import configure_logging

        check_references(config, source)
        configure_logging(config.logging.level)
        asyncio.run(serve(Gateway(config, source, args.config)))
        return 0
    if args.command == "hash-address":
        return _hash_address(config, args.address)
    if args.command == "queue":
        if args.queue_command == "list":
            return _queue_list(config, args.json)
        return _queue_show(config, args.queue_id, args.json)
    raise AssertionError(args.command)


def _hash_password() -> int:
    from gateway.smtp.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("sealgate: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("sealgate: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _hash_address(config: Config, address: str) -> int:
    from gateway.app import address_key_path
    from gateway.observability.logging import hash_address

    key_file = config.logging.address_hash_key_file or address_key_path(config.state_dir)
    try:
        key = key_file.read_bytes()
    except OSError as e:
        print(f"sealgate: cannot read {key_file}: {e.strerror}", file=sys.stderr)
        return 1
    print(hash_address(key, address))
    return 0


def _spool(config: Config) -> Any:
    from gateway.spool import Spool

    return Spool(config.state_dir / "spool")


def _summary(env: Envelope) -> dict[str, Any]:
    received = datetime.datetime.fromisoformat(env.received_at)
    age = (datetime.datetime.now(datetime.UTC) - received).total_seconds()
    return {
        "queue_id": env.queue_id,
        "received_at": env.received_at,
        "age_seconds": int(age),
        "size": env.size,
        "mail_from": env.mail_from,
        "recipients": [r.address for r in env.recipients],
    }


def _queue_list(config: Config, as_json: bool) -> int:
    count = 0
    status = 0
    for item in _spool(config).envelopes():
        if isinstance(item, SpoolError):
            print(f"sealgate: {item}", file=sys.stderr)
            status = 1
            continue
        count += 1
        s = _summary(item)
        if as_json:
            print(json.dumps(s, ensure_ascii=False))
        else:
            rcpts = ", ".join(s["recipients"])
            print(
                f"{s['queue_id']}  {s['size']:>9}  {s['received_at'][:19]}  "
                f"<{s['mail_from']}>  {rcpts}"
            )
    if not as_json:
        print(f"-- {count} message{'s' if count != 1 else ''} in the spool")
    return status


def _queue_show(config: Config, queue_id: str, as_json: bool) -> int:
    try:
        envelope, _ = _spool(config).read(queue_id, verify=True)
    except SpoolError as e:
        print(f"sealgate: {e}", file=sys.stderr)
        return 1
    d = envelope.to_dict()
    if as_json:
        print(json.dumps(d, ensure_ascii=False, indent=2))
        return 0
    client = d.pop("client")
    trace = d.pop("trace_headers")
    for key, value in d.items():
        if key == "recipients":
            for r in value:
                opts = " ".join(r["options"])
                print(f"{'recipient':<14} {r['address']} {opts}".rstrip())
        elif key != "extra":
            print(f"{key:<14} {value}")
    for key, value in client.items():
        print(f"{'client.' + key:<14} {value}")
    print("integrity      sha256 verified")
    print("trace headers:")
    print(trace.rstrip("\r\n").replace("\r\n", "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
