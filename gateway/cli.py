"""The ``sealgate`` command.

    sealgate run [--config FILE] [--state-dir DIR]
    sealgate check-config [--config FILE]
    sealgate explain --from ADDR --to ADDR [--to ADDR...] [--message FILE.eml] [--json]
    sealgate keys import FILE [--address ADDR] | list [--json] | show FPR|ADDR
    sealgate keys remove FPR | pin ADDR FPR
    sealgate queue list [--json]
    sealgate queue show ID [--json]
    sealgate queue retry|hold|release|delete ID...
    sealgate archive verify|search|proof|show|export|hold|release|holds|purge|access|...
                                      (see gateway/archive/cli.py)
    sealgate portal list [--json] | revoke ID...
    sealgate api key NAME --scopes SCOPES [--expires YYYY-MM-DD]
    sealgate webhooks secret | status [--json]
    sealgate console user add NAME --role ROLE | reset NAME | disable NAME | list
    sealgate tlsrpt show [--day YYYY-MM-DD] [--domain DOMAIN]
    sealgate hash-password            (reads the password from standard input)
    sealgate hash-address ADDRESS     (the hash that logs show for ADDRESS)

Without ``--config``: ``$SEALGATE_CONFIG``, else ``/etc/sealgate/config.yaml`` when
it exists, else the embedded defaults - standard error says which.  Exit status: 0 success, 1 a
failed operation (e.g. unknown queue id), 78 (EX_CONFIG) a configuration error,
whose message names the file, line and key, 75 (EX_TEMPFAIL) the state directory in
use by another sealgate or the shared store unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import getpass
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.api import cli as api_cli
from gateway.archive import cli as archive_cli
from gateway.config import Config, load_config
from gateway.config_check import check_references
from gateway.config_check import warnings as config_warnings
from gateway.console import cli as console_cli
from gateway.errors import ConfigError, SpoolError
from gateway.layout import StateLayout
from gateway.model import Envelope
from gateway.portal import cli as portal_cli
from gateway.statelock import StateInUse
from gateway.storage import cli as storage_cli
from gateway.storage import cluster_cli
from gateway.storage.database import StorageError
from gateway.storage.stores import Storage
from gateway.tlsrpt import cli as tlsrpt_cli
from gateway.webhooks import cli as webhooks_cli

EX_TEMPFAIL = 75
EX_CONFIG = 78
SYSTEM_CONFIG = Path("/etc/sealgate/config.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sealgate",
        description="Sealgate, an encrypting SMTP relay gateway: it accepts outbound mail from "
        "Microsoft 365 or Google Workspace, decides per recipient how the message reaches "
        "them securely (verified TLS, S/MIME, PGP/MIME or the secure portal), journals it "
        "with the evidence, and delivers it.",
        epilog="'sealgate COMMAND --help' describes each command; README.md describes the "
        "gateway, and config.example.yaml every option.",
    )
    p.add_argument("--version", action="version", version=f"sealgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            type=Path,
            help=f"YAML configuration (default: $SEALGATE_CONFIG, else {SYSTEM_CONFIG} when "
            "it exists, else the embedded defaults)",
        )
        sp.add_argument("--state-dir", type=Path, help="override state_dir")
        return sp

    with_config(sub.add_parser("run", help="run the gateway"))
    with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    ex = with_config(
        sub.add_parser("explain", help="what the policy decides for mail from A to B, and why")
    )
    ex.add_argument("--from", dest="sender", required=True, metavar="ADDRESS")
    ex.add_argument("--to", dest="recipients", action="append", required=True, metavar="ADDRESS")
    ex.add_argument("--message", type=Path, metavar="FILE", help="the message (.eml) to classify")
    ex.add_argument("--json", action="store_true")
    keys = sub.add_parser("keys", help="the key directory: recipients' certificates and keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ki = with_config(
        ksub.add_parser(
            "import", help="import S/MIME certificates (PEM, DER, PKCS#7) or OpenPGP public keys"
        )
    )
    ki.add_argument("file", type=Path)
    ki.add_argument("--address", help="only certificates naming this address, for it alone")
    kl = with_config(ksub.add_parser("list", help="every key, its addresses and validity"))
    kl.add_argument("--json", action="store_true")
    ks = with_config(ksub.add_parser("show", help="one key (by fingerprint) or an address's keys"))
    ks.add_argument("what", metavar="FPR|ADDRESS")
    kr = with_config(ksub.add_parser("remove", help="remove a key (e.g. revoked)"))
    kr.add_argument("fingerprint")
    kp = with_config(ksub.add_parser("pin", help="use only this key for this address"))
    kp.add_argument("address")
    kp.add_argument("fingerprint")
    queue = sub.add_parser("queue", help="inspect the spool")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    ql = with_config(qsub.add_parser("list", help="list queued messages"))
    ql.add_argument("--json", action="store_true", help="one JSON object per line")
    ql.add_argument(
        "--state",
        choices=("pending", "deferred", "held", "hold"),
        help="only messages with a recipient in this state (held: by the policy), "
        "or on hold (by an administrator)",
    )
    ql.add_argument("--domain", help="only messages with a recipient at this domain")
    ql.add_argument("--older-than", metavar="DURATION", help="e.g. 30m, 2h, 1d")
    qs = with_config(qsub.add_parser("show", help="show one message's envelope"))
    qs.add_argument("queue_id")
    qs.add_argument("--json", action="store_true")
    for action, text in (
        ("retry", "try the deferred recipients now"),
        ("hold", "stop delivery attempts until released"),
        ("release", "resume delivery attempts"),
        ("delete", "remove from the queue (no DSN)"),
    ):
        qa = with_config(qsub.add_parser(action, help=text))
        qa.add_argument("queue_ids", nargs="+", metavar="ID")
    archive_cli.add_parsers(sub, with_config)
    portal_cli.add_parsers(sub, with_config)
    storage_cli.add_parsers(sub, with_config)
    cluster_cli.add_parsers(sub, with_config)
    tlsrpt_cli.add_parsers(sub, with_config)
    webhooks_cli.add_parsers(sub, with_config)
    api_cli.add_parsers(sub, with_config)
    console_cli.add_parsers(sub, with_config)
    sub.add_parser("hash-password", help="hash a password for relay.users_file")
    ha = with_config(sub.add_parser("hash-address", help="the log hash of an address"))
    ha.add_argument("address")
    return p


def config_path(given: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The configuration a command uses, as Postfix's tools find ``main.cf``:
    ``--config``, else ``$SEALGATE_CONFIG``, else `SYSTEM_CONFIG` when it exists, else
    None (the embedded defaults)."""
    if given is not None:
        return given
    env = os.environ if environ is None else environ
    if env.get("SEALGATE_CONFIG"):
        return Path(env["SEALGATE_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def _load(args: argparse.Namespace) -> tuple[Config, str]:
    """The command's configuration; unless ``--config`` named it, standard error says
    which one applies."""
    path = config_path(args.config)
    if args.config is None:
        found = "the embedded defaults" if path is None else str(path)
        print(f"sealgate: configuration: {found}", file=sys.stderr)
    args.config = path  # `run` hands it to the workers and to SIGHUP
    config = load_config(path)
    if args.state_dir is not None:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    return config, str(path) if path else "<defaults>"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"sealgate: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    except StorageError as e:
        # unreachable: systemd tries again (RestartSec); anything else is a setting to
        # fix, and 78 stops the restarts (RestartPreventExitStatus)
        print(f"sealgate: storage: {e}", file=sys.stderr)
        return EX_TEMPFAIL if e.temporary else EX_CONFIG
    except StateInUse as e:  # systemd tries again: the other one may be on its way out
        print(f"sealgate: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:  # noqa: C901 - the table of subcommands
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "archive" and args.archive_command == "token":
        return archive_cli.token(args.name, args.role)
    if args.command == "webhooks" and args.webhooks_command == "secret":
        return webhooks_cli.secret()
    if args.command == "api":
        return api_cli.key(args.name, args.scopes, args.expires)
    config, source = _load(args)
    if args.command == "check-config":
        policy = check_references(config, source)
        for warning in config_warnings(config):
            print(f"{source}: warning: {warning}", file=sys.stderr)
        problems = storage_cli.check(config)
        for problem in problems:
            print(f"{source}: {problem}", file=sys.stderr)
        if problems:
            return EX_CONFIG
        print(f"{source}: configuration OK")
        print(f"{policy.source}: policy OK ({len(policy.rules)} rules, {policy.stamp})")
        return 0
    if args.command == "run":
        import uvloop

        from gateway.app import Gateway, serve
        from gateway.observability.logging import configure_logging

        check_references(config, source)
        configure_logging(config.logging.level)
        # the main process's loop is libuv's (uvloop): about a tenth less of its
        # CPU per message than asyncio's own (bench/compare.py)
        uvloop.run(serve(Gateway(config, source, args.config)))
        return 0
    if args.command == "hash-address":
        return _hash_address(config, args.address)
    if args.command == "explain":
        return _explain(config, args)
    if args.command == "keys":
        return _keys(config, args)
    if args.command == "archive":
        return archive_cli.run(config, args)
    if args.command == "portal":
        return portal_cli.run(config, args)
    if args.command == "storage":
        return storage_cli.run(config, args)
    if args.command == "cluster":
        return cluster_cli.run(config, args)
    if args.command == "tlsrpt":
        return tlsrpt_cli.run(config, args)
    if args.command == "webhooks":
        return webhooks_cli.run(config, args)
    if args.command == "console":
        return console_cli.run(config, args)
    if args.command == "queue":
        if args.queue_command == "list":
            return _queue_list(config, args)
        if args.queue_command == "show":
            return _queue_show(config, args.queue_id, args.json)
        return _queue_admin(config, args.queue_command, args.queue_ids)
    raise AssertionError(args.command)


def _explain(config: Config, args: argparse.Namespace) -> int:
    from gateway.explain import as_json, as_text, explain
    from gateway.policy.language import load_policy_for
    from gateway.smtp.context import smtp_hostname

    policy = load_policy_for(config)
    message = None
    if args.message is not None:
        try:
            message = args.message.read_bytes()
        except OSError as e:
            print(f"sealgate: cannot read {args.message}: {e.strerror}", file=sys.stderr)
            return 1
    from gateway.crypto.keydir import DirectoryKeyStore, KeyDirectory

    storage = Storage(config)
    # the keys the daemon would use
    directory = KeyDirectory(storage.open("keydir")) if storage.exists("keydir") else None
    try:
        keys = DirectoryKeyStore(directory) if directory is not None else None
        # on the daemon's loop (uvloop), so it probes as the daemon does - and not on
        # the asyncio of Debian 12's python3.11 (3.11.2), whose TLS transport raises
        # AttributeError when aborted after it closed (as an HTTPS client may do)
        import uvloop

        features, explained = uvloop.run(
            explain(
                config, policy, args.sender, args.recipients, message, smtp_hostname(config), keys
            )
        )
    finally:
        if directory is not None:
            directory.close()
    if args.json:
        print(json.dumps(as_json(policy, features, explained), ensure_ascii=False, indent=2))
    else:
        print(as_text(policy, features, explained))
    return 0


def _keys(config: Config, args: argparse.Namespace) -> int:  # noqa: C901 - one branch per keys subcommand
    from gateway.crypto.keydir import KeyDirectory, StoredKey

    def line(k: StoredKey) -> str:
        until = datetime.datetime.fromtimestamp(k.not_after, datetime.UTC).date()
        return f"{k.fingerprint}  {k.kind:<5}  until {until}  {', '.join(k.addresses)}  {k.subject}"

    directory = KeyDirectory(Storage(config).open("keydir"))
    try:
        if args.keys_command == "import":
            try:
                report = directory.import_any(args.file.read_bytes(), args.address)
            except OSError as e:
                print(f"sealgate: cannot read {args.file}: {e.strerror}", file=sys.stderr)
                return 1
            except ValueError as e:
                print(f"sealgate: {args.file}: {e}", file=sys.stderr)
                return 1
            for k in report.imported:
                print(f"imported {line(k)}")
            for why in report.skipped:
                print(f"skipped  {why}")
            return 0
        if args.keys_command == "list":
            for k in directory.stored():
                print(json.dumps(dataclasses.asdict(k)) if args.json else line(k))
            return 0
        if args.keys_command == "show":
            what = args.what.lower()
            found = (
                directory.stored(what)
                if "@" in what
                else [
                    k for k in directory.stored() if k.fingerprint.startswith(what.replace(":", ""))
                ]
            )
            if not found:
                print(f"sealgate: no key for {args.what}", file=sys.stderr)
                return 1
            pins = directory.pins()
            for k in found:
                pinned = [a for (a, _), f in pins.items() if f == k.fingerprint]
                print(line(k) + (f"  pinned for {', '.join(pinned)}" if pinned else ""))
            return 0
        if args.keys_command == "remove":
            if not directory.remove(args.fingerprint):
                print(f"sealgate: no key {args.fingerprint}", file=sys.stderr)
                return 1
            print(f"removed {args.fingerprint}")
            return 0
        try:
            key = directory.pin(args.address, args.fingerprint)
        except ValueError as e:
            print(f"sealgate: {e}", file=sys.stderr)
            return 1
        print(f"pinned {key.fingerprint} for {args.address.lower()}")
        return 0
    finally:
        directory.close()


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
    from gateway.observability.logging import hash_address

    key_file = (
        config.logging.address_hash_key_file or StateLayout(config.state_dir).address_hash_key
    )
    try:
        key = key_file.read_bytes()
    except OSError as e:
        print(f"sealgate: cannot read {key_file}: {e.strerror}", file=sys.stderr)
        return 1
    print(hash_address(key, address))
    return 0


def _spool(config: Config) -> Any:
    from gateway.spool import Spool

    return Spool(StateLayout(config.state_dir).spool)


def _store(config: Config) -> Any:
    from gateway.queue.store import QueueStore

    storage = Storage(config)
    return QueueStore(storage.open("queue")) if storage.exists("queue") else None


def _summary(env: Envelope) -> dict[str, Any]:
    """A spooled message the store has not recorded yet: every recipient pending."""
    return {
        "queue_id": env.queue_id,
        "received_at": env.received_at,
        "mail_from": env.mail_from,
        "size": env.size,
        "hold": False,
        "recipients": [
            {"address": r.address, "state": "pending", "status": "", "mode": "", "rule": ""}
            for r in env.recipients
        ],
    }


def _matches(s: dict[str, Any], state: str | None, domain: str | None, older: float | None) -> bool:
    if state == "hold":
        if not s["hold"]:
            return False
    elif state is not None and not any(r["state"] == state for r in s["recipients"]):
        return False
    if domain is not None and not any(
        r["address"].lower().endswith("@" + domain.lower()) for r in s["recipients"]
    ):
        return False
    return older is None or s["age_seconds"] >= older


def _queue_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.config import parse_duration
    from gateway.spool.store import read_envelope

    older = parse_duration(args.older_than) if args.older_than else None
    store = _store(config)
    status = count = 0
    # what the store recorded (every node's, with a shared one), then what is only
    # spooled: accepted a moment ago, or before a crash (recorded at the next start)
    summaries = store.open_messages() if store is not None else []
    listed = {s["queue_id"] for s in summaries}
    spool = _spool(config)
    spooled = [q for q in spool.queue_ids() if q not in listed]
    done = set(store.done_among(spooled)) if store is not None else set()
    for queue_id in spooled:
        if queue_id in done:  # (its file is on its way out)
            continue
        try:
            summaries.append(_summary(read_envelope(spool.path_of(queue_id))))
        except SpoolError as e:
            print(f"sealgate: {e}", file=sys.stderr)
            status = 1
    summaries.sort(key=lambda s: s["queue_id"])
    now = datetime.datetime.now(datetime.UTC)
    parse = datetime.datetime.fromisoformat
    encode = json.JSONEncoder(ensure_ascii=False).encode  # (one encoder, not one a line)
    lines: list[str] = []
    for s in summaries:
        s = {
            "queue_id": s["queue_id"],
            "received_at": s["received_at"],
            "age_seconds": int((now - parse(s["received_at"])).total_seconds()),
            "size": s["size"],
            "mail_from": s["mail_from"],
            "hold": s["hold"],
            "recipients": s["recipients"],
        }
        if not _matches(s, args.state, args.domain, older):
            continue
        count += 1
        if args.json:
            lines.append(encode(s))
        else:
            flag = " HOLD" if s["hold"] else ""
            rcpts = ", ".join(
                f"{r['address']} ({r['state']}{' ' + r['status'] if r['status'] else ''}"
                f"{' ' + r['mode'] + ' by ' + r['rule'] if r['mode'] else ''})"
                for r in s["recipients"]
            )
            lines.append(
                f"{s['queue_id']}{flag}  {s['size']:>9}  {s['received_at'][:19]}  "
                f"<{s['mail_from']}>  {rcpts}"
            )
        if len(lines) >= 1000:  # written a thousand lines at a time
            print("\n".join(lines))
            lines.clear()
    if lines:
        print("\n".join(lines))
    if not args.json:
        print(f"-- {count} message{'s' if count != 1 else ''} in the queue")
    return status


def _queue_show(config: Config, queue_id: str, as_json: bool) -> int:
    store = _store(config)
    message = store.message(queue_id) if store else None
    try:
        envelope: Envelope | None = _spool(config).read(queue_id, verify=True)[0]
    except SpoolError as e:
        shared = store.shared_envelope(queue_id) if store and Storage(config).shared else None
        if shared is None and message is None:
            print(f"sealgate: {e}", file=sys.stderr)
            return 1
        # another node accepted it (its envelope from the database); or it is done:
        # the spool file is gone, the record stays
        envelope = shared
    if envelope is not None:
        d: dict[str, Any] = envelope.to_dict()
    else:
        assert message is not None
        d = {key: message[key] for key in ("queue_id", "received_at", "mail_from", "size")}
    rows = store.recipients(queue_id) if store else []
    decisions = store.decisions(queue_id) if store else {}
    d["recipients"] = [
        {
            **(d.get("recipients") or [{}] * len(rows))[r.idx],
            "address": r.address,
            "state": r.state,
            "status": r.status,
            "diagnostic": r.diagnostic,
            "attempts": r.attempts,
            "next_attempt": r.next_attempt,
            "decision": decisions.get(r.idx),
        }
        for r in rows
    ] or d.get("recipients", [])
    d["state"] = (
        "done"
        if message and message["done"]
        else "hold"
        if message and message["hold"]
        else "queued"
    )
    d["attempts"] = store.attempts(queue_id) if store else []
    d["audit"] = store.audit(queue_id) if store else []
    if as_json:
        print(json.dumps(d, ensure_ascii=False, indent=2))
        return 0
    _print_show(d, envelope is not None)
    return 0


def _print_show(d: dict[str, Any], verified: bool) -> None:
    for key in ("queue_id", "state", "received_at", "mail_from", "mail_options", "size", "sha256"):
        if key in d:
            print(f"{key:<14} {d[key]}")
    for r in d["recipients"]:
        extra = f"{r.get('state', 'pending')} {r.get('status', '')}".strip()
        print(f"{'recipient':<14} {r['address']}  [{extra}] {r.get('diagnostic', '')}".rstrip())
        decision = r.get("decision")
        if decision:
            print(
                f"{'  decision':<14} {decision['mode']} (rule {decision['rule']}), "
                f"tls level {decision['tls_level']} ({decision['level_source']}), "
                f"fallback {decision['fallback']}, policy {decision['policy']}"
            )
            for reason in decision["reasons"]:
                print(f"{'  why':<14} {reason}")
    for key, value in (d.get("client") or {}).items():
        print(f"{'client.' + key:<14} {value}")
    if verified:
        print("integrity      sha256 verified")
    for a in d["attempts"]:
        ev = a["evidence"] or {}
        when = datetime.datetime.fromtimestamp(a["at"], datetime.UTC).isoformat()[:19]
        print(
            f"attempt        {when} #{a['recipient_index']} {a['outcome']} {a['status']} "
            f"mx={ev.get('mx_host')} ip={ev.get('ip')} tls={ev.get('tls_version')} "
            f"cipher={ev.get('tls_cipher')} cert-sha256={ev.get('peer_cert_sha256')} "
            f"level={ev.get('level')} verified={ev.get('verification')}"
            + (f" reused={ev['reused']}" if ev.get("reused") else "")
            + (f" mta-sts={ev['mta_sts']!r}" if ev.get("mta_sts") else "")
            + (f" mode={ev['decision']['mode']}" if ev.get("decision") else "")
            + (
                f" key={ev['encryption']['key_fingerprint']} sent-sha256="
                f"{ev['encryption']['sent_sha256']}"
                if ev.get("encryption")
                else ""
            )
            + f" reply={a['diagnostic']!r}"
        )
    for a in d["audit"]:
        when = datetime.datetime.fromtimestamp(a["at"], datetime.UTC).isoformat()[:19]
        print(f"audit          {when} {a['action']} by {a['actor']}")
    if "trace_headers" in d:
        print("trace headers:")
        print(d["trace_headers"].rstrip("\r\n").replace("\r\n", "\n"))


def _queue_admin(config: Config, action: str, queue_ids: list[str]) -> int:
    store = _store(config)
    actor = getpass.getuser()
    status = 0
    for queue_id in queue_ids:
        if store is None or not store.admin(queue_id, action, actor):
            print(f"sealgate: no message {queue_id} in the queue", file=sys.stderr)
            status = 1
            continue
        if action == "delete":
            _archive_before_delete(config, queue_id, actor)
            with contextlib.suppress(SpoolError):
                _spool(config).remove(queue_id)
        print(f"{queue_id}: {action} done")
    return status


def _archive_before_delete(config: Config, queue_id: str, actor: str) -> None:
    """A message deleted from the queue stays in the archive: journaled now if the
    daemon had not yet, and the deletion recorded."""
    if not config.archive.enabled:
        return
    from gateway.archive.service import open_archive

    try:
        archive = open_archive(config, config.smtp.hostname or "localhost", create=False)
    except ConfigError:
        return  # no archive yet (the daemon never ran with it)
    try:
        if not archive.has_content(queue_id):
            with contextlib.suppress(SpoolError):
                envelope, data = _spool(config).read(queue_id)
                archive.journal_message(envelope.to_dict(), data)
        archive.journal_event(queue_id, "queue-delete", {"actor": actor})
        archive.make_durable([queue_id])
    finally:
        archive.index.close()


if __name__ == "__main__":
    raise SystemExit(main())
