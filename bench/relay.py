#!/usr/bin/env python3
"""End-to-end relay benchmark: smtp-source -> Sealgate -> smtp-sink, against
smtp-source -> Postfix -> smtp-sink, in the same run.

    .venv/bin/python bench/relay.py [--messages 3000] [--size 4096]

Both relay to the same ``smtp-sink`` (plaintext: smtp-sink has no STARTTLS, so
Sealgate runs at ``tls_level: may`` here).  The figure is messages per second from the
first connection until the sink has received every message.  Needs root (Postfix).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import Sealgate, peak_rss_mb, smtp_source  # noqa: E402
from postfix_anchor import free_port, postfix_instance, wait_for_port, wait_until_delivered  # noqa: E402


def counting_sink(workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """smtp-sink that counts deliveries: -c prints a counter; we count 'queued' lines
    from its verbose output instead, which is exact."""
    port = free_port()
    log = workdir / f"sink-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-v", f"127.0.0.1:{port}", "1000"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port)
    return proc, port, log


def delivered(log: Path) -> int:
    return log.read_bytes().count(b"\n.\n") + log.read_bytes().count(b": .\n")


def run_to(
    port: int, messages: int, size: int, sink_log: Path, baseline: int, timeout: float = 600
) -> float:
    started = time.monotonic()
    smtp_source(port, messages, 20, size, timeout)
    deadline = started + timeout
    while delivered(sink_log) < baseline + messages and time.monotonic() < deadline:
        time.sleep(0.1)
    return messages / (time.monotonic() - started)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (Postfix)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-relay-"))
    try:
        sink, sink_port, sink_log = counting_sink(workdir)
        try:
            with postfix_instance(workdir, sink_port) as pf_port:
                base = delivered(sink_log)
                pf = run_to(pf_port, args.messages, args.size, sink_log, base)
                wait_until_delivered(workdir)
            extra = f"  smart_host: '127.0.0.1:{sink_port}'\n  tls_level: may\n"
            with Sealgate(workdir, delivery_extra=extra) as gw:
                base = delivered(sink_log)
                sg = run_to(gw.smtp_port, args.messages, args.size, sink_log, base)
                rss = peak_rss_mb(gw.pids())
        finally:
            sink.terminate()
        print(
            f"relay {args.size} B: postfix {pf:.0f}/s  sealgate {sg:.0f}/s  "
            f"ratio {sg / pf:.2f}  (target >= 1.00); sealgate peak RSS "
            f"{', '.join(f'{m:.0f}' for m in rss)} MB"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
