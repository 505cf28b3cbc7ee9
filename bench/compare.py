#!/usr/bin/env python3
"""CPU per relayed message of two or more versions of Sealgate, in the same run.

    .venv/bin/python bench/compare.py [--rounds 5] [--messages 3000] [--size 4096]
                                      [--database postgresql] A B ...

Each of A, B, ... is a git revision of this repository (checked out in a temporary
worktree) or a directory holding a checkout.  Every version runs with the same
configuration (the shipped defaults but for loopback ports, ``relay.require_tls:
false`` and a policy of ``tls`` at level ``may``: smtp-sink has no STARTTLS), from this
checkout's virtualenv: ``smtp-source`` sends ``--messages`` of ``--size`` bytes in 20
sessions; ``smtp-sink`` receives.  Measured from the daemon's ``app.ready`` until it
has finished every message: the CPU ticks of the main process and of its SMTP workers
per message, and the machine's.  The versions alternate and the first of each round
changes, so neither warm caches nor a noisy neighbour favour one; medians are
reported with every round, since on a shared two-core machine one round can be 10 %
off.  This is how a change's cost is checked before and after (issues 14, 15, 17);
the comparison with Postfix is bench/relay.py's.  ``--database postgresql``: every
round on a fresh database of one PostgreSQL server on this machine (fsync on, as in
production; issue 16), ``cluster.ack: local``; the server's CPU is in ``machine``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postfix_anchor import LogCount, free_port, wait_for_port  # noqa: E402
from relay import busy_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
TICK = os.sysconf("SC_CLK_TCK")
POLICY = "version: 1\ndefaults: {modes: [tls], tls_level: may, fallback: hold}\n"


@dataclass
class Round:
    main: float  # ms of CPU per message
    workers: float
    machine: float
    seconds: float

    @property
    def daemon(self) -> float:
        return self.main + self.workers


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _ticks(pid: int) -> int:
    try:
        st = _stat(pid)
    except OSError:
        return 0
    return int(st[11]) + int(st[12])


def one_round(
    source: Path, workdir: Path, sink_port: int, messages: int, size: int, storage: str = ""
) -> Round:
    # Keys every version knows (an older one refuses a key it does not; the API
    # listener keeps its default port: the versions run one at a time)
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    smtp, http, portal = free_port(), free_port(), free_port()
    config = workdir / "config.yaml"
    (workdir / "policy.yaml").write_text(POLICY)
    config.write_text(
        f"state_dir: {state}\n"
        f"listen: {{smtp: '127.0.0.1:{smtp}', http: '127.0.0.1:{http}'}}\n"
        f"portal: {{listen: '127.0.0.1:{portal}'}}\n"
        "relay: {networks: ['127.0.0.1/32'], require_tls: false}\n"
        f"dns: {{nameservers: ['127.0.0.1:{free_port()}']}}\n"
        f"delivery: {{smart_host: '127.0.0.1:{sink_port}'}}\n"
        f"policy: {{file: {workdir / 'policy.yaml'}}}\n"
        "smtp: {max_connections_per_ip: 500, max_connections: 1000}\n" + storage
    )
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [str(PYTHON), "-m", "gateway", "run", "--config", str(config)],
            cwd=source,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while b"app.ready" not in log_path.read_bytes():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{source}: the daemon did not start; see {log_path}")
            time.sleep(0.1)
        time.sleep(1)
        workers = _children(daemon.pid)
        main0, workers0 = _ticks(daemon.pid), sum(map(_ticks, workers))
        machine0, started = busy_cpu_seconds(), time.monotonic()
        subprocess.run(
            ["smtp-source", "-s", "20", "-m", str(messages), "-l", str(size)]
            + ["-f", "a@example.org", "-t", "b@example.net", f"127.0.0.1:{smtp}"],
            check=True,
            timeout=600,
        )
        deadline = time.monotonic() + 300
        done = LogCount(log_path, b"queue.message-done")
        while done() < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{source}: not every message was finished")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        main1, workers1 = _ticks(daemon.pid), sum(map(_ticks, workers))
        machine1 = busy_cpu_seconds()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    per = 1000 / TICK / messages
    return Round(
        (main1 - main0) * per,
        (workers1 - workers0) * per,
        (machine1 - machine0) * 1000 / messages,  # (seconds)
        seconds,
    )


def _checkout(name: str, workdir: Path) -> Path:
    if Path(name).is_dir():
        return Path(name).resolve()
    target = workdir / f"tree-{len(list(workdir.glob('tree-*')))}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(target), name],
        check=True,
        capture_output=True,
    )
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", metavar="REV_OR_DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    server = None
    if args.database == "postgresql":
        sys.path.insert(0, str(ROOT))
        from tests.support.postgres import start_postgres

        server = start_postgres(fsync=True)
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-compare-"))
    sink_port = free_port()
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trees: list[Path] = []
    try:
        wait_for_port(sink_port)
        trees = [_checkout(v, workdir) for v in args.versions]
        results: dict[str, list[Round]] = {v: [] for v in args.versions}
        for r in range(args.rounds):
            order = list(zip(args.versions, trees, strict=True))
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, tree in order:
                run_dir = workdir / f"run-{r}-{args.versions.index(name)}"
                run_dir.mkdir()
                storage = ""
                if server is not None:  # a database of its own each round
                    storage = (
                        f"storage: {{database: '{server.database()}', "
                        f"password_file: '{server.password_file}', auto_migrate: true}}\n"
                    )
                result = one_round(tree, run_dir, sink_port, args.messages, args.size, storage)
                results[name].append(result)
                print(
                    f"round {r} {name}: daemon {result.daemon:.3f} ms/msg (main "
                    f"{result.main:.3f}, workers {result.workers:.3f}), machine "
                    f"{result.machine:.3f} ms/msg, {result.seconds:.1f} s",
                    flush=True,
                )
        print(f"{args.messages} x {args.size} B, 20 sessions, medians of {args.rounds} rounds:")
        for name in args.versions:
            rounds = results[name]
            daemon = statistics.median(x.daemon for x in rounds)
            main_ = statistics.median(x.main for x in rounds)
            workers = statistics.median(x.workers for x in rounds)
            machine = statistics.median(x.machine for x in rounds)
            every = ", ".join(f"{x.daemon:.2f}" for x in rounds)
            print(
                f"  {name}: daemon {daemon:.3f} ms/msg (main {main_:.3f}, workers "
                f"{workers:.3f}), machine {machine:.3f} ms/msg  [every round: {every}]"
            )
    finally:
        sink.kill()
        if server is not None:
            from tests.support.postgres import stop_postgres

            stop_postgres(server)
        for tree in trees:
            if tree.parent == workdir:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
