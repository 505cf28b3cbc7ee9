#!/usr/bin/env python3
"""A realistic world of recipient servers (issue 17, target 3), Sealgate against
Postfix with the same routing.

    .venv/bin/python bench/world.py [--domains 300] [--messages 20000] [--only sealgate]
                                    [--until-fast] [--keep]

``--domains`` recipient domains ``d<N>.test``, each with a server of its own on a
loopback address (127.1.x.y, one port), served by one process (``world.py serve``):

- 65 % fast: STARTTLS with a test CA's certificate, every reply at once;
- 10 % slow: each reply after 1-5 s;
- 5 % tarpits: take the message, then never answer the end of DATA;
- 5 % refuse connections (nothing listens);
- 5 % answer 451 to every RCPT;
- 10 % offer no STARTTLS.

``--messages`` messages of 4 KB with 1-5 recipients each (a fixed random plan) are
sent over STARTTLS in 20 sessions of 5 messages (`bench/smtp_tls.py source`).  Each
relay routes every domain to its server by a static route (Sealgate ``routes``;
Postfix ``transport_maps``): the same routing, no DNS.  Both run as shipped but for
that (and the test CA: Sealgate's ``tls.ca_file``; Postfix's ``smtp_tls_CAfile``,
at its default level ``may``), so a domain without STARTTLS gets Sealgate's portal
notification and Postfix's plaintext copy - one delivery to its server either way.

Measured per relay: the time until every deliverable recipient (fast, slow, no
STARTTLS) has had a delivery, and the p95 of the fast domains' recipients'
latency (sent to received); and for Sealgate the same with every domain fast.
The world's process also answers the relays' DNS questions (NXDOMAIN: no keys, no
policies) at once, as a resolver would.
Targets: the fast domains' p95 within 1.5x of the run without the others, and the
drain time no longer than Postfix's.  ``--until-fast`` stops each run once every
fast domain's recipient is delivered: the p95 ratio in about 3 minutes for
Sealgate instead of 21, without the drain time (for trying a change to the
queue).  Needs root (Postfix).  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
KINDS = (
    ("fast", 0.65),
    ("slow", 0.10),
    ("tarpit", 0.05),
    ("refuse", 0.05),
    ("tempfail", 0.05),
    ("plain", 0.10),
)
DELIVERABLE = ("fast", "slow", "plain")
PROGRESS_EVERY = 300.0  # seconds between two lines of a run's progress


def address(n: int) -> str:
    return f"127.1.{n // 250}.{n % 250 + 1}"


def kinds(domains: int, all_fast: bool) -> list[str]:
    if all_fast:
        return ["fast"] * domains
    out: list[str] = []
    for kind, share in KINDS:
        out += [kind] * round(share * domains)
    out = (out + ["fast"] * domains)[:domains]
    random.Random(17).shuffle(out)
    return out


# -- the servers ------------------------------------------------------------------


async def _serve_one(
    kind: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ctx: ssl.SSLContext,
    out: int,
) -> None:
    async def reply(text: bytes) -> None:
        if kind == "slow":
            await asyncio.sleep(random.uniform(1, 5))
        writer.write(text)

    try:
        await reply(b"220 world.test ESMTP\r\n")
        tls, rcpts = False, []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                starttls = b"250-STARTTLS\r\n" if kind != "plain" and not tls else b""
                await reply(
                    b"250-world.test\r\n" + starttls + b"250-8BITMIME\r\n250 SIZE 52428800\r\n"
                )
            elif verb == b"STAR" and kind != "plain":
                await reply(b"220 2.0.0 go ahead\r\n")
                await writer.start_tls(ctx)
                tls = True
            elif verb == b"MAIL":
                rcpts = []
                await reply(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if kind == "tempfail":
                    await reply(b"451 4.3.0 Try again later\r\n")
                else:
                    rcpts.append(line[8:].strip(b"<> \r\n").decode())
                    await reply(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                await reply(b"354 go ahead\r\n")
                sent = None
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    if data.startswith(b"X-Bench-Sent: "):
                        sent = float(data[14:])
                if kind == "tarpit":
                    await asyncio.sleep(3600)
                now = time.time()
                for rcpt in rcpts:
                    latency = f"{now - sent:.3f}" if sent is not None else "-"
                    os.write(out, f"{kind} {rcpt} {latency}\n".encode())
                await reply(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                await reply(b"221 2.0.0 Bye\r\n")
                break
            else:
                await reply(b"250 2.0.0 Ok\r\n")
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        writer.close()


def _context(chain: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    return ctx


async def serve(args: argparse.Namespace) -> None:
    shared = _context(args.cert, args.key)
    out = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    servers = []
    for n, kind in enumerate(kinds(args.domains, args.all_fast)):
        if kind == "refuse":
            continue
        # each server its own certificate for its own address, as in the world
        ctx = _context(f"{args.certs}/{n}.pem", f"{args.certs}/{n}.key") if args.certs else shared

        def handle(
            r: asyncio.StreamReader,
            w: asyncio.StreamWriter,
            kind: str = kind,
            ctx: ssl.SSLContext = ctx,
        ) -> asyncio.Task[None]:
            return asyncio.ensure_future(_serve_one(kind, r, w, ctx, out))

        servers.append(await asyncio.start_server(handle, address(n), args.port, backlog=512))
    # names the relays look up (keys, policies) answered at once: NXDOMAIN
    sys.path.insert(0, str(HERE.parent))
    from tests.support.dns import DnsFixture

    resolver = await DnsFixture().start()
    Path(args.ready).write_text(f"ready {resolver.port}")
    await asyncio.Event().wait()


# -- the runs ---------------------------------------------------------------------


def plan(domains: int, messages: int) -> list[list[str]]:
    rng = random.Random(3)
    return [
        [f"r{m}.{i}@d{rng.randrange(domains)}.test" for i in range(rng.randint(1, 5))]
        for m in range(messages)
    ]


class World:
    def __init__(
        self, workdir: Path, args: argparse.Namespace, all_fast: bool, chain: Path, key: Path
    ):
        self.out = workdir / f"world-{time.monotonic_ns()}.log"
        ready = workdir / "world.ready"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [PYTHON, __file__, "serve", "--port", str(args.port), "--domains", str(args.domains)]
            + [
                "--cert",
                str(chain),
                "--key",
                str(key),
                "--out",
                str(self.out),
                "--ready",
                str(ready),
            ]
            + (["--all-fast"] if all_fast else [])
            + (["--certs", str(workdir / "certs")] if (workdir / "certs").is_dir() else [])
        )
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text().startswith("ready "):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the world did not start")
            time.sleep(0.1)
        self.nameserver = f"127.0.0.1:{ready.read_text().split()[1]}"

    def lines(self) -> list[list[str]]:
        if not self.out.exists():
            return []
        return [line.split() for line in self.out.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def run(
    name: str,
    relay_port: int,
    world: World,
    recipients: list[list[str]],
    kind_of: list[str],
    workdir: Path,
    ca: Path,
    timeout: float,
    until_fast: bool = False,
) -> tuple[float | None, float, int, int]:
    """(drain seconds or None, fast p95 seconds, delivered, deliverable); with
    ``until_fast``, over once every fast domain's recipient is delivered."""
    plan_file = workdir / "plan.json"
    plan_file.write_text(json.dumps(recipients))
    kind = {r: kind_of[int(r.split("@d")[1].split(".")[0])] for rcpts in recipients for r in rcpts}
    deliverable = {r for r, k in kind.items() if k in DELIVERABLE}
    fast_ones = {r for r, k in kind.items() if k == "fast"}
    started = time.monotonic()
    subprocess.run(
        [PYTHON, str(HERE / "smtp_tls.py"), "source", "--port", str(relay_port), "--ca", str(ca)]
        + ["--plan", str(plan_file), "--per-session", "5", "--sessions", "20"],
        check=True,
        timeout=timeout,
    )
    drained = None
    told = started
    while time.monotonic() - started < timeout:
        got = {line[1] for line in world.lines()}
        if deliverable <= got:
            drained = time.monotonic() - started
            break
        if until_fast and fast_ones <= got:
            break
        if time.monotonic() - told >= PROGRESS_EVERY:  # a run can take an hour
            told = time.monotonic()
            print(
                f"    {name}: {told - started:.0f} s, {len(got & deliverable)} of "
                f"{len(deliverable)} deliverable recipients delivered",
                flush=True,
            )
        time.sleep(0.5)
    lines = world.lines()
    fast = sorted(float(line[2]) for line in lines if line[0] == "fast" and line[2] != "-")
    p95 = fast[int(0.95 * (len(fast) - 1))] if fast else float("nan")
    got = len({line[1] for line in lines} & deliverable)
    took = "drained " + (f"in {drained:.0f} s" if drained else "NOT within the timeout")
    if until_fast and not drained:
        took = "stopped once every fast domain's recipient was delivered"
    p50 = statistics.median(fast) if fast else float("nan")
    print(
        f"  {name}: {took} ({got} of {len(deliverable)} deliverable recipients);"
        f" fast domains p50 {p50:.2f} s  p95 {p95:.2f} s",
        flush=True,
    )
    return drained, p95, got, len(deliverable)


@contextlib.contextmanager
def started(make: Callable[[], Any]) -> Iterator[Any]:
    """A gateway started on ports picked free - again on others if one was taken
    meanwhile (this world opens thousands of connections from ephemeral ports)."""
    for attempt in range(3):
        gateway = make()
        try:
            gateway.__enter__()
        except RuntimeError:
            gateway.__exit__(None, None, None)
            if attempt == 2:
                raise
            continue
        try:
            yield gateway
        finally:
            gateway.__exit__(None, None, None)
        return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="role")
    srv = sub.add_parser("serve")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--domains", type=int, required=True)
    srv.add_argument("--cert", required=True)
    srv.add_argument("--key", required=True)
    srv.add_argument("--out", required=True)
    srv.add_argument("--ready", required=True)
    srv.add_argument("--all-fast", action="store_true")
    srv.add_argument("--certs", help="a directory of <n>.pem and <n>.key, one per domain")
    ap.add_argument("--domains", type=int, default=300)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument(
        "--timeout",
        type=float,
        default=3000,
        help="seconds each relay is given to drain (one that has not drained by then took "
        "longer; at 20,000 messages Sealgate drains in about 1,250 s, Postfix in 1,900)",
    )
    ap.add_argument("--only", choices=("sealgate", "postfix"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--until-fast",
        action="store_true",
        help="stop each run once every fast domain's recipient is delivered: the p95 "
        "ratio in minutes, no drain time",
    )
    args = ap.parse_args()
    if args.role == "serve":
        import uvloop

        uvloop.run(serve(args))
        return 0
    if os.geteuid() != 0:
        print("needs root (Postfix)", file=sys.stderr)
        return 2

    import trustme

    sys.path.insert(0, str(HERE))
    from accept import Sealgate
    from postfix_anchor import free_port, postfix_instance

    workdir = Path(tempfile.mkdtemp(prefix="sealgate-world-"))
    args.port = free_port()
    try:
        ca = trustme.CA()
        ips = [address(n) for n in range(args.domains)]
        leaf = ca.issue_cert("127.0.0.1")
        certs = workdir / "certs"
        certs.mkdir()
        for n, ip in enumerate(ips):
            own = ca.issue_cert(ip)
            own.private_key_pem.write_to_path(str(certs / f"{n}.key"))
            (certs / f"{n}.pem").write_bytes(b"".join(b.bytes() for b in own.cert_chain_pems))
        ca_file, chain, key = workdir / "ca.pem", workdir / "chain.pem", workdir / "key.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        leaf.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        for path in (ca_file, chain, key):
            path.chmod(0o644)
        recipients = plan(args.domains, args.messages)
        mixed = kinds(args.domains, False)
        counts = {k: mixed.count(k) for k, _ in KINDS}
        print(
            f"world: {args.domains} domains {counts}, {args.messages} messages, "
            f"{sum(map(len, recipients))} recipients",
            flush=True,
        )
        results: dict[str, tuple[float | None, float, int, int]] = {}
        routes = ", ".join(f"d{n}.test: '{address(n)}:{args.port}'" for n in range(args.domains))
        if args.only in (None, "sealgate"):
            tls = f"tls: {{cert_file: '{chain}', key_file: '{key}', ca_file: '{ca_file}'}}\n"
            for all_fast in (True, False):  # each world meets a gateway that never saw it
                gateway_dir = workdir / ("sealgate-fast" if all_fast else "sealgate-mixed")
                gateway_dir.mkdir()
                world = World(workdir, args, all_fast, chain, key)
                try:
                    with started(
                        functools.partial(
                            Sealgate,
                            gateway_dir,
                            delivery_extra="  smart_host: null\n",  # as shipped: routes, then MX
                            extra=f"routes: {{{routes}}}\n{tls}",
                            relay="{}",
                            nameserver=world.nameserver,
                        )
                    ) as gw:
                        label = "sealgate, every domain fast" if all_fast else "sealgate"
                        kind_of = kinds(args.domains, all_fast)
                        results[label] = run(
                            label,
                            gw.smtp_port,
                            world,
                            recipients,
                            kind_of,
                            workdir,
                            ca_file,
                            args.timeout,
                            args.until_fast,
                        )
                finally:
                    world.stop()
        if args.only in (None, "postfix"):
            transport = workdir / "transport"
            transport.write_text(
                "".join(f"d{n}.test smtp:[{address(n)}]:{args.port}\n" for n in range(args.domains))
            )
            transport.chmod(0o644)
            extra = (
                f"transport_maps = texthash:{transport}\n"
                "smtpd_tls_security_level = may\n"
                f"smtpd_tls_cert_file = {chain}\nsmtpd_tls_key_file = {key}\n"
                f"smtp_tls_security_level = may\nsmtp_tls_CAfile = {ca_file}\n"
            )
            with postfix_instance(workdir, free_port(), extra_main_cf=extra) as pf_port:
                world = World(workdir, args, False, chain, key)
                try:
                    results["postfix"] = run(
                        "postfix",
                        pf_port,
                        world,
                        recipients,
                        mixed,
                        workdir,
                        ca_file,
                        args.timeout,
                        args.until_fast,
                    )
                finally:
                    world.stop()
        fast_alone = results.get("sealgate, every domain fast")
        ours = results.get("sealgate")
        if fast_alone and ours:
            ratio = ours[1] / fast_alone[1]
            met = "met" if ratio <= 1.5 else "NOT met"
            print(
                f"  fast domains' p95 beside the others / alone: {ratio:.2f} (target <= 1.5: {met})"
            )
        pf = results.get("postfix")
        if args.until_fast:
            print("  drain time: not measured (--until-fast)")
        elif ours and pf and ours[0] and pf[0]:
            met = "met" if ours[0] <= pf[0] else "NOT met"
            print(f"  drain time sealgate / postfix: {ours[0] / pf[0]:.2f} (target <= 1.0: {met})")
        elif ours and pf and (ours[0] or pf[0]):
            # one of them did not drain within --timeout: its drain time is longer
            if ours[0]:
                verdict = f"sealgate {ours[0]:.0f} s, postfix more than {args.timeout:.0f} s: met"
            else:
                verdict = f"postfix {pf[0]:.0f} s, sealgate more than {args.timeout:.0f} s: NOT met"
            print(f"  drain time (target: sealgate's <= postfix's): {verdict}")
    finally:
        if args.keep:
            print(f"  kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
