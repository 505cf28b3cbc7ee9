"""``sealgate archive ...``: the compliance officer's commands.

    sealgate archive verify [--json]
    sealgate archive search [--sender A|@D] [--recipient A|@D] [--since T] [--until T]
                            [--message-id ID] [--queue-id ID] [--mode M] [--status S]
                            [--rule R] [--subject TEXT] [--limit N] [--json|--csv]
    sealgate archive proof ID [--json]          how each recipient's copy went
    sealgate archive show ID                    the message as received (content)
    sealgate archive export (ID... | --case NAME | search options) --out FILE.zip
    sealgate archive hold CASE (ID... | search options)
    sealgate archive release CASE
    sealgate archive holds
    sealgate archive purge [--yes]              dry run unless --yes
    sealgate archive access [--since T] [--json]
    sealgate archive checkpoint                 sign one now and print it
    sealgate archive token NAME ROLE            a new API token and its config entry

Every search, view, export, hold and purge is recorded in the archive's access record
with who did it: the operating-system user, and under sudo who ran sudo
(`gateway.actor`); ``--actor`` adds a note beside it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.actor import cli_actor
from gateway.archive.journal import Archive
from gateway.archive.query import Query
from gateway.config import Config

# The reports, the export and opening the archive are imported when a command runs:
# 'sealgate --version' and the other commands do not pay for them.

ROLES = ("auditor", "investigator", "admin")


def parse_time(text: str) -> float:
    """YYYY-MM-DD or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def add_query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sender", metavar="ADDRESS|@DOMAIN")
    p.add_argument("--recipient", metavar="ADDRESS|@DOMAIN", help="envelope recipient, Bcc too")
    p.add_argument("--since", type=parse_time, metavar="DATE", help="received at or after")
    p.add_argument("--until", type=parse_time, metavar="DATE", help="received before")
    p.add_argument("--message-id")
    p.add_argument("--queue-id")
    p.add_argument("--mode", choices=("tls", "smime", "pgp", "portal", "hold", "bounce"))
    p.add_argument(
        "--status",
        choices=("queued", "delivered", "deferred", "held", "bounced", "expired"),
        help="a recipient's delivery state",
    )
    p.add_argument("--rule", help="the policy rule that decided")
    p.add_argument("--subject", help="words of the subject (archive.index_subjects)")


def query_of(args: argparse.Namespace) -> Query:
    return Query(
        sender=args.sender,
        recipient=args.recipient,
        since=args.since,
        until=args.until,
        message_id=args.message_id,
        queue_id=args.queue_id,
        mode=args.mode,
        status=args.status,
        rule=args.rule,
        subject=args.subject,
    )


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    archive = sub.add_parser("archive", help="the compliance archive")
    asub = archive.add_subparsers(dest="archive_command", required=True, metavar="ACTION")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = with_config(asub.add_parser(name, help=text))
        p.add_argument(
            "--actor",
            default=None,
            metavar="NOTE",
            help="a note recorded beside the operating-system user (e.g. a case number)",
        )
        return p

    v = command("verify", "check every record against the log and its signed checkpoints")
    v.add_argument("--json", action="store_true")
    s = command("search", "find messages (metadata only)")
    add_query_options(s)
    s.add_argument("--limit", type=int, default=1000)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per message")
    fmt.add_argument("--csv", action="store_true", help="one row per recipient")
    pr = command("proof", "how each recipient's copy was secured and delivered")
    pr.add_argument("queue_id")
    pr.add_argument("--json", action="store_true")
    sh = command("show", "write the message as received to standard output")
    sh.add_argument("queue_id")
    ex = command("export", "a zip of messages, load file, manifest and proofs")
    ex.add_argument("queue_ids", nargs="*", metavar="ID")
    ex.add_argument("--case", help="every message a legal hold of this case covers")
    add_query_options(ex)
    ex.add_argument("--out", type=Path, required=True, metavar="FILE.zip")
    ho = command("hold", "place a legal hold: by message ids and/or a search")
    ho.add_argument("case")
    ho.add_argument("queue_ids", nargs="*", metavar="ID")
    add_query_options(ho)
    rl = command("release", "release a case's legal hold")
    rl.add_argument("case")
    hs = command("holds", "the cases holding messages")
    hs.add_argument("--json", action="store_true")
    pu = command("purge", "remove expired content no hold covers (dry run without --yes)")
    pu.add_argument("--yes", action="store_true", help="really remove")
    pu.add_argument("--reason", default="retention period over")
    ac = command("access", "the access record: searches, views, exports, holds")
    ac.add_argument("--since", type=parse_time, default=0.0, metavar="DATE")
    ac.add_argument("--json", action="store_true")
    command("checkpoint", "sign a checkpoint of the log now and print it")
    tk = asub.add_parser("token", help="make an API token; prints it and its config entry")
    tk.add_argument("name")
    tk.add_argument("role", choices=ROLES)


def run(config: Config, args: argparse.Namespace) -> int:
    from gateway.archive.service import open_archive

    # an existing archive knows its log's name: no host name lookup here
    archive = open_archive(config, config.smtp.hostname or "localhost", create=False)
    actor = cli_actor(args.actor)
    try:
        return _COMMANDS[args.archive_command](archive, args, actor)
    finally:
        archive.index.close()


def token(name: str, role: str) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (give it to {name}; it is not stored): {token}")
    print("config entry (archive.api_tokens):")
    print(f"  - {{name: {json.dumps(name)}, role: {role}, token_sha256: {digest}}}")
    return 0


def _verify(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    started = time.monotonic()
    result = archive.verify()
    seconds = time.monotonic() - started
    archive.note_verification(result, seconds, actor)
    if args.json:
        print(json.dumps({**result.to_dict(), "seconds": round(seconds, 3)}, indent=2))
    else:
        print(
            f"{result.leaves} records in the log ({result.messages} messages, "
            f"{result.disposed} purged under retention), {result.checkpoints} signed "
            f"checkpoints, checked in {seconds:.1f} s"
        )
        if result.unfinished:
            print(
                f"{result.unfinished} stored content(s) whose record was not committed: being "
                "written as it ran, or left by a node that stopped (removed by the gateway)"
            )
        for p in result.problems:
            where = f" (leaf {p.leaf})" if p.leaf is not None else ""
            print(f"PROBLEM {p.record_id}{where}: {p.what}")
        print("archive OK" if result.ok else f"{len(result.problems)} problem(s) found")
    return 0 if result.ok else 1


def _search(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    from gateway.archive import report

    try:
        query = query_of(args)
        results = archive.search(query, limit=args.limit)
    except ValueError as e:
        print(f"sealgate: {e}", file=sys.stderr)
        return 1
    archive.access(actor, "search", query=query.to_dict(), results=len(results))
    if args.csv:
        sys.stdout.write(report.to_csv(report.with_last_attempts(archive, results)))
    elif args.json:
        sys.stdout.write(report.to_json_lines(results))
    else:
        for m in results:
            rcpts = ", ".join(
                f"{r['address']} {r['state']} ({r['mode'] or '-'})" for r in m["recipients"]
            )
            flags = (" HELD" if m["held"] else "") + (" PURGED" if m["disposed"] else "")
            print(f"{m['queue_id']}  {m['received']}  {m['mail_from'] or '<>'} -> {rcpts}{flags}")
        print(f"{len(results)} message(s)")
    return 0


def _proof(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    from gateway.archive import report

    try:
        proof = report.delivery_proof(archive, args.queue_id)
    except KeyError:
        print(f"sealgate: {args.queue_id} is not in the archive", file=sys.stderr)
        return 1
    archive.access(actor, "proof", args.queue_id)
    if args.json:
        print(json.dumps(proof, indent=2, sort_keys=True))
    else:
        sys.stdout.write(report.proof_text(proof))
    return 0


def _show(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    try:
        _, data = archive.message(args.queue_id)
    except KeyError:
        print(f"sealgate: {args.queue_id} is not in the archive (or purged)", file=sys.stderr)
        return 1
    archive.access(actor, "view", args.queue_id)
    sys.stdout.buffer.write(data)
    return 0


def _selected(archive: Archive, args: argparse.Namespace) -> tuple[list[str], str]:
    """The messages an export or hold names: ids, a case, and/or a search."""
    ids = list(args.queue_ids)
    scope = []
    if ids:
        scope.append(f"{len(ids)} message id(s)")
    if getattr(args, "case", None):
        ids += sorted(archive.held_by(args.case))
        scope.append(f"case {args.case}")
    query = query_of(args)
    if query.to_dict():
        ids += [m["queue_id"] for m in archive.search(query, limit=1_000_000)]
        scope.append(f"search {json.dumps(query.to_dict(), sort_keys=True)}")
    return list(dict.fromkeys(ids)), "; ".join(scope)


def _export(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    from gateway.archive.export import export

    ids, scope = _selected(archive, args)
    if not scope:
        print("sealgate: name messages, a --case or search options", file=sys.stderr)
        return 1
    with open(args.out, "wb") as out:
        summary = export(archive, ids, out, actor, scope)
    print(
        f"{args.out}: {summary['messages']} message(s), {summary['records']} records proven "
        f"against a checkpoint of {summary['checkpoint_size']}; manifest SHA-256 "
        f"{summary['manifest_sha256']}"
    )
    return 0


def _hold(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    query = query_of(args)
    if not args.queue_ids and not query.to_dict():
        print("sealgate: a hold needs message ids or search options", file=sys.stderr)
        return 1
    try:
        held = archive.hold(
            args.case, actor, list(args.queue_ids), query if query.to_dict() else None
        )
    except ValueError as e:
        print(f"sealgate: {e}", file=sys.stderr)
        return 1
    print(f"case {args.case!r} holds {held} message(s)")
    return 0


def _release(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    try:
        released = archive.release(args.case, actor)
    except KeyError:
        print(f"sealgate: no case {args.case!r}", file=sys.stderr)
        return 1
    print(f"case {args.case!r} released ({released} message(s) were held)")
    return 0


def _holds(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    cases = archive.cases()
    if args.json:
        print(json.dumps(cases, indent=2))
        return 0
    for c in cases:
        scope = f" query {json.dumps(c['query'], sort_keys=True)}" if c["query"] else ""
        print(
            f"{c['case']}: {c['messages']} message(s), placed {c['placed']} by {c['actor']}{scope}"
        )
    print(f"{len(cases)} case(s)")
    return 0


def _purge(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    expired = archive.expired()
    if not args.yes:
        for queue_id in expired:
            print(f"would purge {queue_id}")
        print(f"{len(expired)} message(s) past retention and not held (dry run: --yes purges)")
        return 0
    purged = archive.purge(expired, args.reason, actor)
    archive.access(actor, "purge", purged=len(purged), reason=args.reason)
    print(f"purged {len(purged)} message(s); each has a disposition record in the log")
    return 0


def _access(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    entries = archive.access_log(args.since, limit=100_000)
    if args.json:
        sys.stdout.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        return 0
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["at"], datetime.UTC).isoformat(timespec="seconds")
        what = e.get("queue_id") or json.dumps(e.get("query") or e.get("scope") or "")
        print(f"{when}  {e['actor']}  {e['action']}  {what}")
    return 0


def _checkpoint(archive: Archive, args: argparse.Namespace, actor: str) -> int:
    sys.stdout.write(archive.checkpoint())
    return 0


_COMMANDS: dict[str, Callable[[Archive, argparse.Namespace, str], int]] = {
    "verify": _verify,
    "search": _search,
    "proof": _proof,
    "show": _show,
    "export": _export,
    "hold": _hold,
    "release": _release,
    "holds": _holds,
    "purge": _purge,
    "access": _access,
    "checkpoint": _checkpoint,
}
