#!/usr/bin/env python3
"""The queue at scale (issue 17, target 5): a backlog for a dead destination.

    .venv/bin/python bench/backlog.py [--messages 100000]

With the shipped defaults but for loopback ports (and a policy of ``tls`` at ``may``:
the live destination is an smtp-sink, which has no STARTTLS), ``smtp-source`` queues
``--messages`` of 4 KB for a destination that refuses connections (the smart host is a
dead loopback port), until every one of them is deferred (tried, or waiting for the
destination that was found dead: it is suspended, not tried per message).  Then:

- the peak resident memory of the daemon's processes (target: 500 MB in all);
- ``sealgate queue list --json`` on that queue (target: 3 s);
- a new message to a live destination (``routes:`` to an smtp-sink): the time until it
  is delivered, beside the backlog (target: not slowed - a second or so);
- a restart: the time from ``sealgate run`` until ``/readyz`` answers (target: 10 s).

Everything listens on 127.0.0.1 and is removed afterwards.
"""

from __future__ import annotations

import argparse
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import ROOT, SEALGATE, Sealgate, peak_rss_mb, smtp_source  # noqa: E402
from relay import PLAINTEXT_SINK_POLICY, DeliveryCounter, counting_sink  # noqa: E402


def sample(sealgate: Sealgate, name: str) -> float:
    total = 0.0
    for line in sealgate.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="sealgate-backlog-") as tmp:
        workdir = Path(tmp)
        sink, sink_port, sink_log = counting_sink(workdir)
        try:
            sealgate = Sealgate(
                workdir,
                policy=PLAINTEXT_SINK_POLICY,
                extra=f"routes: {{live.test: '127.0.0.1:{sink_port}'}}\n",
            )
            with sealgate:
                started = time.monotonic()
                rate = smtp_source(sealgate.smtp_port, n, 20, 4096, timeout=3600)
                deadline = time.monotonic() + 3600
                # every message deferred: none pending (retries may be under way)
                while sample(sealgate, 'sealgate_queue_recipients{state="pending"}') > 0 or (
                    sample(sealgate, 'sealgate_queue_recipients{state="deferred"}') == 0
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the backlog was not attempted within an hour")
                    time.sleep(2)
                queued_in = time.monotonic() - started
                rss = peak_rss_mb(sealgate.pids())
                began = time.monotonic()
                listed = subprocess.run(
                    [*SEALGATE, "queue", "list", "--json", "--config", str(sealgate.config)],
                    cwd=ROOT,
                    capture_output=True,
                    check=True,
                )
                list_seconds = time.monotonic() - began
                delivered = DeliveryCounter(sink_log)
                before = delivered()
                began = time.monotonic()
                with smtplib.SMTP("127.0.0.1", sealgate.smtp_port, timeout=30) as client:
                    client.sendmail(
                        "s@bench.test",
                        ["r@live.test"],
                        b"From: s@bench.test\r\nSubject: live\r\n\r\nlive\r\n",
                    )
                while delivered() == before and time.monotonic() - began < 120:
                    time.sleep(0.02)
                live_seconds = time.monotonic() - began
            restart = Sealgate.__new__(Sealgate)
            restart.__dict__.update(sealgate.__dict__)
            restart.log = open(workdir / "sealgate.log", "ab")  # noqa: SIM115
            began = time.monotonic()
            proc = subprocess.Popen(
                [*SEALGATE, "run", "--config", str(sealgate.config)],
                cwd=ROOT,
                stdout=restart.log,
                stderr=subprocess.STDOUT,
            )
            ready_seconds = None
            while time.monotonic() - began < 120:
                try:
                    url = f"http://127.0.0.1:{sealgate.http_port}/readyz"
                    with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                        ready_seconds = time.monotonic() - began
                        break
                except OSError:
                    time.sleep(0.05)
            proc.terminate()
            proc.wait(60)
            restart.log.close()
        finally:
            sink.kill()
    lines = listed.stdout.count(b"\n")
    print(f"backlog of {n} x 4 KB for a dead destination (20 sessions)")
    print(f"  accepted at {rate:.0f}/s; every message deferred after {queued_in:.0f} s")
    print(
        f"  peak RSS {sum(rss):.0f} MB ({', '.join(f'{r:.0f}' for r in rss)})  "
        f"target <= 500: {_met(sum(rss) <= 500)}"
    )
    print(
        f"  queue list --json: {list_seconds:.1f} s ({lines} lines)  "
        f"target <= 3: {_met(list_seconds <= 3)}"
    )
    print(
        f"  a new message to a live destination delivered in {live_seconds:.2f} s"
        f"  target: not slowed (about a second): {_met(live_seconds <= 1.5)}"
    )
    shown = f"{ready_seconds:.1f} s" if ready_seconds is not None else "not within 120 s"
    ready = ready_seconds is not None and ready_seconds <= 10
    print(f"  restart until ready: {shown}  target <= 10: {_met(ready)}")
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    raise SystemExit(main())
