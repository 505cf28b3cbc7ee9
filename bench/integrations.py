#!/usr/bin/env python3
"""What the integrations cost: the message API against SMTP, and webhooks on the
relay path.

    .venv/bin/python bench/integrations.py [--messages 3000] [--size 4096] [--rounds 5]

1. Submission: the same 4 KB message through the message API (HTTPS, 20 clients on
   kept-alive connections, ``message/rfc822``; and as JSON) and through SMTP
   (STARTTLS, 20 sessions each sending its share over one connection) into one
   gateway, rounds alternating; the rate is accepted messages per second (202 / 250,
   both after the spool's fsync), with the gateway's CPU per message.  Target: the
   API at least 0.8x SMTP.
2. Webhooks: relay throughput (smtp-source, 20 sessions -> gateway -> smtp-sink, as
   bench/relay.py) with a webhook endpoint taking every event (accepted and
   delivered: two per message, posted over HTTPS to a receiver on loopback - nginx
   answering 204, so that the receiver's own CPU on the same two cores weighs little;
   ``--receiver aiohttp`` for a Python one)
   against the same gateway without one, and Postfix as the anchor, rounds
   alternating, medians.  Target: webhooks cost at most 5% (ratio >= 0.95).  The
   webhook process runs at nice 19 (mail first): the time from the end of the mail
   until every event was posted is waited for before the next run, and reported,
   with the ratio that counts it; so is each gateway's CPU per message by process
   (main, SMTP workers, webhook process), the posting after the mail included.

Everything listens on 127.0.0.1.  Needs root (Postfix) for part 2.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import Sealgate  # noqa: E402
from postfix_anchor import free_port, postfix_instance, wait_for_port, wait_until_delivered  # noqa: E402
from relay import PLAINTEXT_SINK_POLICY, counting_sink, run_to  # noqa: E402

KEY = "sgk_bench-0123456789abcdef"
SESSIONS = 20


def message(size: int) -> bytes:
    head = (
        b"From: sender@bench.test\r\nTo: rcpt@example.test\r\nSubject: bench\r\n"
        b"Message-ID: <bench@bench.test>\r\n\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def smtp_round(port: int, data: bytes, messages: int) -> None:
    import aiosmtplib

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def session(count: int) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=True, tls_context=ctx, timeout=60
        )
        async with client:
            for _ in range(count):
                await client.sendmail("sender@bench.test", ["rcpt@example.test"], data)

    share = [messages // SESSIONS + (i < messages % SESSIONS) for i in range(SESSIONS)]
    await asyncio.gather(*(session(n) for n in share))


async def api_round(port: int, data: bytes, messages: int, as_json: bool) -> None:
    import aiohttp

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {KEY}"}
    if as_json:
        body = {
            "from": "sender@bench.test",
            "to": ["rcpt@example.test"],
            "subject": "bench",
            "text": data.split(b"\r\n\r\n", 1)[1].decode(),
        }
    url = f"https://127.0.0.1:{port}/api/v1/messages"
    connector = aiohttp.TCPConnector(ssl=ctx, limit=SESSIONS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def client(count: int) -> None:
            for _ in range(count):
                if as_json:
                    r = await http.post(url, json=body)
                else:
                    r = await http.post(url, data=data, headers={"Content-Type": "message/rfc822"})
                async with r:
                    if r.status != 202:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")

        share = [messages // SESSIONS + (i < messages % SESSIONS) for i in range(SESSIONS)]
        await asyncio.gather(*(client(n) for n in share))


def submission(args: argparse.Namespace, workdir: Path) -> None:
    sink, sink_port, _ = counting_sink(workdir)
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys = f", keys: [{{name: bench, scopes: [send], key_sha256: '{digest}'}}]"
    data = message(args.size)
    rates: dict[str, list[tuple[float, float]]] = {"smtp": [], "api": [], "api-json": []}
    try:
        with Sealgate(
            workdir,
            delivery_extra=f"  smart_host: '127.0.0.1:{sink_port}'\n",
            policy=PLAINTEXT_SINK_POLICY,
            api_extra=keys,
        ) as gw:
            runs = {
                "smtp": lambda: smtp_round(gw.smtp_port, data, args.messages),
                "api": lambda: api_round(gw.api_port, data, args.messages, False),
                "api-json": lambda: api_round(gw.api_port, data, args.messages, True),
            }
            asyncio.run(runs["smtp"]())  # warm-up, not counted
            asyncio.run(runs["api"]())
            names = list(runs)
            for i in range(args.rounds):
                for name in names[i % 3 :] + names[: i % 3]:
                    time.sleep(3)  # the previous round's deliveries drain
                    pids = gw.pids()
                    cpu = process_cpu(pids)
                    started = time.monotonic()
                    asyncio.run(runs[name]())
                    elapsed = time.monotonic() - started
                    per = 1000 * (process_cpu(pids) - cpu) / args.messages
                    rates[name].append((args.messages / elapsed, per))
                print(
                    f"  round {i + 1}: " + "  ".join(f"{n} {rates[n][-1][0]:6.0f}/s" for n in names)
                )
    finally:
        sink.terminate()
    med = {n: statistics.median(r for r, _ in v) for n, v in rates.items()}
    cpu = {n: statistics.median(c for _, c in v) for n, v in rates.items()}
    print()
    for n in rates:
        print(
            f"{'submission, ' + n:30} {med[n]:7.0f}/s  gateway CPU {cpu[n]:5.2f} ms/msg  "
            f"runs {', '.join(f'{r:.0f}' for r, _ in rates[n])}"
        )
    raw, as_json = med["api"] / med["smtp"], med["api-json"] / med["smtp"]
    print(
        f"{'API / SMTP':30} raw {raw:.2f}x, JSON {as_json:.2f}x  (target >= 0.80: "
        f"{'met' if min(raw, as_json) >= 0.8 else 'NOT met'})"
    )


NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        keepalive_requests 100000;
        location /hooks {{ return 204; }}
    }}
}}
"""

RECEIVER = textwrap.dedent(
    """
    import ssl, sys
    from aiohttp import web

    async def take(request):
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", take)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=ctx,
                access_log=None, print=None)
    """
)


def webhooks(args: argparse.Namespace, workdir: Path) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = workdir / "hook.pem", workdir / "hook.key", workdir / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    secret = workdir / "hook.secret"
    secret.write_text(
        subprocess.run(
            [sys.executable, "-m", "gateway", "webhooks", "secret"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    hook_port = free_port()
    if args.receiver == "nginx":  # C: what a receiver costs is not what is measured
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX.format(dir=workdir, port=hook_port, chain=chain, key=key))
        receiver = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"]
        )
    else:
        receiver = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(hook_port), str(chain), str(key)]
        )
    wait_for_port(hook_port)
    sinks: list[subprocess.Popen[bytes]] = []
    try:
        pf_sink, pf_sink_port, pf_log = counting_sink(workdir)
        on_sink, on_port, on_log = counting_sink(workdir)
        off_sink, off_port, off_log = counting_sink(workdir)
        sinks += [pf_sink, on_sink, off_sink]
        (workdir / "on").mkdir()
        (workdir / "off").mkdir()
        hooks = (
            f"tls: {{ca_file: '{ca_file}'}}\n"
            "webhooks:\n"
            "  endpoints:\n"
            f"    - {{name: bench, url: 'https://127.0.0.1:{hook_port}/hooks', "
            f"secret_file: '{secret}'}}\n"
        )
        with (
            postfix_instance(workdir, pf_sink_port) as pf_port,
            Sealgate(
                workdir / "on",
                delivery_extra=f"  smart_host: '127.0.0.1:{on_port}'\n",
                policy=PLAINTEXT_SINK_POLICY,
                extra=hooks,
            ) as on,
            Sealgate(
                workdir / "off",
                delivery_extra=f"  smart_host: '127.0.0.1:{off_port}'\n",
                policy=PLAINTEXT_SINK_POLICY,
            ) as off,
        ):
            runs: dict[str, list[tuple[float, float]]] = {"postfix": [], "on": [], "off": []}

            def postfix() -> tuple[float, float]:
                result = run_to(pf_port, args.messages, args.size, pf_log)
                wait_until_delivered(workdir)
                return result

            drains: list[float] = []

            def with_hooks() -> tuple[float, float]:
                result = run_to(on.smtp_port, args.messages, args.size, on_log)
                # the events still to post when the mail was done (the webhook
                # process runs at nice 19: mail first) - waited for, so that their
                # posting is not in the next run's figures, and reported
                done, expected = time.monotonic(), 2 * args.messages * (len(drains) + 1)
                while _posted(on.metrics(wait=False)) < expected:
                    if time.monotonic() - done > 120:
                        raise RuntimeError("webhook events not posted within 120 s")
                    time.sleep(0.1)
                drains.append(time.monotonic() - done)
                return result

            order = [
                ("postfix", postfix),
                ("on", with_hooks),
                ("off", lambda: run_to(off.smtp_port, args.messages, args.size, off_log)),
            ]
            # CPU per message of each gateway's processes (main, SMTP workers, the
            # webhook process), including the posting after the mail: where the
            # webhooks' cost lies
            shares: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for i in range(args.rounds):
                for name, run in order[i % 3 :] + order[: i % 3]:
                    gw = on if name == "on" else off
                    before = _by_role(gw) if name != "postfix" else {}
                    runs[name].append(run())
                    time.sleep(2)  # webhook posts of the last messages finish
                    if name != "postfix":
                        after = _by_role(gw)
                        shares[name].append(
                            {
                                k: 1000 * (after[k] - before.get(k, 0.0)) / args.messages
                                for k in after
                            }
                        )
                print(
                    f"  round {i + 1}: "
                    + "  ".join(f"{n} {runs[n][-1][0]:6.0f}/s" for n, _ in order)
                )
            posted = _posted(on.metrics())
            children = subprocess.run(
                ["pgrep", "-P", str(receiver.pid)], capture_output=True, text=True
            ).stdout.split()
            receiver_ms = 1000 * process_cpu([receiver.pid, *map(int, children)]) / posted
    finally:
        for s in sinks:
            s.terminate()
        receiver.terminate()
    rate = {k: statistics.median(r for r, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    print()
    for k in runs:
        print(
            f"{'relay, ' + k:30} {rate[k]:7.0f}/s  machine CPU {cpu[k]:5.2f} ms/msg  "
            f"runs {', '.join(f'{r:.0f}' for r, _ in runs[k])}"
        )
    strict = statistics.median(
        args.messages / (args.messages / r + d)
        for (r, _), d in zip(runs["on"], drains, strict=True)
    )
    print(
        f"{'events posted after the mail':30} within {', '.join(f'{d:.1f}' for d in drains)} s "
        f"of its end (metrics lag up to 1 s); counting that time, on / off "
        f"{strict / rate['off']:.2f}"
    )
    print(
        f"{'webhook events posted':30} {posted:.0f}; the receiver's CPU "
        f"{receiver_ms:.3f} ms per event"
    )
    for name, taken in shares.items():
        roles = sorted({role for d in taken for role in d})
        print(
            f"{'CPU per message, ' + name:30} "
            + "  ".join(
                f"{role} {statistics.median(d.get(role, 0.0) for d in taken):.2f} ms"
                for role in roles
            )
        )
    ratio = rate["on"] / rate["off"]
    print(
        f"{'webhooks on / off':30} {ratio:.3f}  (target >= 0.95: "
        f"{'met' if ratio >= 0.95 else 'NOT met'}); "
        f"CPU +{cpu['on'] - cpu['off']:.2f} ms/msg; on / postfix "
        f"{rate['on'] / rate['postfix']:.2f}"
    )


def _by_role(gw: Sealgate) -> dict[str, float]:
    """CPU seconds so far of a gateway's processes: the main process, the SMTP workers
    together, the webhook process."""
    roles: dict[str, float] = {}
    main, *children = gw.pids()
    for pid in (main, *children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        role = "main" if pid == main else "workers"
        if b"--webhooks-only" in cmdline:
            role = "webhooks"
        roles[role] = roles.get(role, 0.0) + process_cpu([pid])
    return roles


def _posted(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("sealgate_webhook_posts_total{") and 'outcome="posted"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=("submission", "webhooks"), default=None)
    ap.add_argument(
        "--receiver",
        choices=("nginx", "aiohttp"),
        default="nginx" if shutil.which("nginx") else "aiohttp",
        help="the webhook endpoint: nginx answering 204, or a Python (aiohttp) server",
    )
    args = ap.parse_args()
    if args.only != "submission" and (os.geteuid() != 0 or not shutil.which("smtp-source")):
        print("bench/integrations.py needs root and Postfix (run: make bench)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons (user postfix) reach their queue below it
    (workdir / "submission").mkdir()
    (workdir / "webhooks").mkdir()
    try:
        if args.only in (None, "submission"):
            print(f"submission: {args.messages} messages of {args.size} B, {args.rounds} rounds")
            submission(args, workdir / "submission")
        if args.only in (None, "webhooks"):
            print(
                f"\nwebhooks: {args.messages} messages of {args.size} B, {args.rounds} rounds, "
                f"receiver {args.receiver}"
            )
            webhooks(args, workdir / "webhooks")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
