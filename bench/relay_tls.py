#!/usr/bin/env python3
"""Relay with TLS on both sides (issue 17, target 2): STARTTLS load -> relay -> a
recipient server with STARTTLS and a certificate from a test CA, Sealgate against
Postfix in the same run.

    .venv/bin/python bench/relay_tls.py [--messages 3000] [--size 4096] [--rounds 3]
                                        [--per-session 1]

The load generator and the recipient servers are `bench/smtp_tls.py` (uvloop; the
same for both relays).  Every connection to a relay uses STARTTLS with the test
CA's certificate for 127.0.0.1 (``--per-session`` messages each, 20 at a time); each
relay delivers to a recipient server of its own, verifying its certificate:

- Postfix: ``smtpd_tls_security_level = encrypt``; ``smtp_tls_security_level =
  verify`` with ``smtp_tls_CAfile`` the test CA - for the next hop, a policy entry
  ``secure match=sink.bench.test`` (Postfix checks names, not IP addresses; secure
  is verify without trusting DNS for the name), and the TLS session cache Debian's
  main.cf enables; stock Postfix does not reuse a TLS connection for the next
  message (``smtp_tls_connection_reuse = no``), ``--postfix-tls-reuse`` turns it on
  (through ``tlsproxy``);
- Sealgate: the shipped defaults (``relay.require_tls: true``, archive and portal on),
  ``tls.ca_file`` the test CA, a policy of ``tls`` at level ``verify``.

Reported: messages per second from the first connection until the recipient server
has every message (medians of alternating rounds), machine CPU per message, and the
delivery side's session reuse - messages per connection the recipient server saw
(connections reused instead of a handshake each).  Target: Sealgate >= 1.2x Postfix.
Needs root (Postfix).  Everything listens on 127.0.0.1 and is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import Sealgate, peak_rss_mb  # noqa: E402
from postfix_anchor import free_port, postfix_instance, wait_for_port, wait_until_delivered  # noqa: E402
from relay import busy_cpu_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
VERIFY_POLICY = "version: 1\ndefaults: {modes: [tls], tls_level: verify, fallback: hold}\n"


class Sink:
    """A recipient server (`smtp_tls.py sink`) and what it counted."""

    def __init__(self, workdir: Path, name: str, chain: Path, key: Path):
        self.port = free_port()
        self.count = workdir / f"{name}.count"
        self.count.touch()
        self.proc = subprocess.Popen(
            [PYTHON, str(HERE / "smtp_tls.py"), "sink", "--port", str(self.port)]
            + ["--cert", str(chain), "--key", str(key), "--count", str(self.count)]
        )
        wait_for_port(self.port)

    def counted(self) -> tuple[int, int]:
        """(connections, messages) so far."""
        text = self.count.read_bytes()
        return text.count(b"c"), text.count(b"m")


def run_to(port: int, sink: Sink, args: argparse.Namespace, ca: Path) -> tuple[float, float, float]:
    """(messages per second, machine CPU ms per message, messages per connection at
    the recipient server) for one run."""
    connections, before = sink.counted()
    cpu = busy_cpu_seconds()
    started = time.monotonic()
    subprocess.run(
        [PYTHON, str(HERE / "smtp_tls.py"), "source", "--port", str(port), "--ca", str(ca)]
        + ["--messages", str(args.messages), "--size", str(args.size)]
        + ["--per-session", str(args.per_session)],
        check=True,
        timeout=600,
    )
    deadline = started + 600
    while sink.counted()[1] - before < args.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    opened, got = sink.counted()
    if got - before < args.messages:
        raise RuntimeError(f"only {got - before} of {args.messages} delivered")
    elapsed = time.monotonic() - started
    per_connection = (got - before) / max(1, opened - connections)
    return (
        args.messages / elapsed,
        1000 * (busy_cpu_seconds() - cpu) / args.messages,
        per_connection,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-session", type=int, default=1)
    ap.add_argument(
        "--postfix-tls-reuse",
        action="store_true",
        help="Postfix reuses TLS connections too (smtp_tls_connection_reuse = yes)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (Postfix)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-relay-tls-"))
    sinks: list[Sink] = []
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "sink.bench.test")
        ca_file, chain, key = workdir / "ca.pem", workdir / "chain.pem", workdir / "key.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        leaf.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        for path in (ca_file, chain, key):
            path.chmod(0o644)  # Postfix's smtp client reads the CA as its own user
        pf_sink = Sink(workdir, "postfix", chain, key)
        sg_sink = Sink(workdir, "sealgate", chain, key)
        sinks += [pf_sink, sg_sink]
        postfix_tls = (
            "smtpd_tls_security_level = encrypt\n"
            f"smtpd_tls_cert_file = {chain}\nsmtpd_tls_key_file = {key}\n"
            "smtp_tls_security_level = verify\n"
            f"smtp_tls_CAfile = {ca_file}\n"
            f"smtp_tls_policy_maps = inline:{{ {{[127.0.0.1]:{pf_sink.port} = "
            f"secure match=sink.bench.test}} }}\n"
            "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n"
            + ("smtp_tls_connection_reuse = yes\n" if args.postfix_tls_reuse else "")
        )
        sealgate_tls = f"tls: {{cert_file: '{chain}', key_file: '{key}', ca_file: '{ca_file}'}}\n"
        with (
            postfix_instance(workdir, pf_sink.port, extra_main_cf=postfix_tls) as pf_port,
            Sealgate(
                workdir,
                delivery_extra=f"  smart_host: '127.0.0.1:{sg_sink.port}'\n",
                policy=VERIFY_POLICY,
                extra=sealgate_tls,
                relay="{}",
            ) as gw,
        ):

            def postfix() -> tuple[float, float, float]:
                result = run_to(pf_port, pf_sink, args, ca_file)
                wait_until_delivered(workdir)
                return result

            def sealgate() -> tuple[float, float, float]:
                return run_to(gw.smtp_port, sg_sink, args, ca_file)

            runs: dict[str, list[tuple[float, float, float]]] = {"postfix": [], "sealgate": []}
            order = [("postfix", postfix), ("sealgate", sealgate)]
            for i in range(args.rounds):
                for name, run in order if i % 2 == 0 else reversed(order):
                    runs[name].append(run())
            rate = {k: statistics.median(r for r, _, _ in v) for k, v in runs.items()}
            cpu = {k: statistics.median(c for _, c, _ in v) for k, v in runs.items()}
            reuse = {k: statistics.median(u for _, _, u in v) for k, v in runs.items()}
            ratio = rate["sealgate"] / rate["postfix"]
            reusing = " (postfix reusing TLS connections)" if args.postfix_tls_reuse else ""
            print(
                f"relay with TLS on both sides{reusing}, "
                f"{args.size} B, {args.messages} messages, "
                f"20 sessions of {args.per_session} message(s), median of {args.rounds}: "
                f"postfix {rate['postfix']:.0f}/s  sealgate {rate['sealgate']:.0f}/s  "
                f"ratio {ratio:.2f}  (target >= 1.20: {'met' if ratio >= 1.2 else 'NOT met'})"
                f"  [postfix {', '.join(f'{r:.0f}' for r, _, _ in runs['postfix'])}; "
                f"sealgate {', '.join(f'{r:.0f}' for r, _, _ in runs['sealgate'])}]",
                flush=True,
            )
            print(
                f"  machine CPU per message (load generator and recipient server included): "
                f"postfix {cpu['postfix']:.2f} ms  sealgate {cpu['sealgate']:.2f} ms"
            )
            print(
                f"  delivery sessions: messages per connection at the recipient server: "
                f"postfix {reuse['postfix']:.1f}  sealgate {reuse['sealgate']:.1f}"
            )
            rss = peak_rss_mb(gw.pids())
            print(f"  sealgate peak RSS per process: {', '.join(f'{m:.0f}' for m in rss)} MB")
    finally:
        for sink in sinks:
            sink.proc.terminate()
            sink.proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
