"""A private, throw-away Postfix instance relaying to smtp-sink: the benchmark anchor.

It runs from its own config and queue directories under a temporary directory, listens
only on 127.0.0.1, relays everything to an ``smtp-sink`` on loopback, and is stopped
and removed afterwards.  Needs root (Postfix drops privileges to the ``postfix`` user)
and the Debian ``postfix`` package (``scripts/setup.sh`` installs it with everything
else, as ``make bench`` runs it).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {listen_host}
inet_protocols = ipv4
myhostname = anchor.bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [{sink_host}]:{sink_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_destination_concurrency_limit = 20
"""


class LogCount:
    """How often any of ``words`` occurs in a log that grows, reading only what was
    appended since the last call: a full re-read every poll costs the end of a long
    run more CPU than its start, and that CPU is in the machine's figure."""

    def __init__(self, path: Path, *words: bytes):
        self.path, self.words = path, words
        self.keep = max(map(len, words)) - 1  # bytes a word cut at the end may have
        self.offset, self.count, self.tail = 0, 0, b""

    def __call__(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        text, old = self.tail + chunk, len(self.tail)
        # only occurrences that end in the new bytes: the others were counted
        self.count += sum(text.count(w, max(0, old - len(w) + 1)) for w in self.words)
        self.tail = text[-self.keep :] if self.keep else b""
        return self.count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


@contextlib.contextmanager
def smtp_sink(workdir: Path) -> Iterator[int]:
    port = free_port()
    with open(workdir / "sink.log", "wb") as log:
        proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def wait_until_delivered(workdir: Path, timeout: float = 300) -> None:
    """Wait for the instance's queue to empty, so that its deliveries do not compete
    for the CPU with whatever is measured next."""
    queue = workdir / "postfix" / "queue"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(
            any((queue / d).rglob("*")) for d in ("maildrop", "incoming", "active", "deferred")
        ):
            return
        time.sleep(0.2)
    raise RuntimeError("postfix did not deliver its queue in time")


@contextlib.contextmanager
def postfix_instance(
    workdir: Path,
    sink_port: int,
    *,
    listen_host: str = "127.0.0.1",
    port: int | None = None,
    sink_host: str = "127.0.0.1",
    extra_main_cf: str = "",
) -> Iterator[int]:
    """A Postfix listening on listen_host:port that relays everything to the sink;
    ``extra_main_cf`` lines are appended to main.cf (later settings win)."""
    root = workdir / "postfix"
    conf = root / "etc"
    conf.mkdir(parents=True)
    # Postfix daemons run as the postfix user and must reach the queue directory.
    for d in (workdir, root):
        d.chmod(0o755)
    (root / "queue").mkdir()
    (root / "data").mkdir()
    shutil.chown(root / "data", "postfix")
    port = port or free_port()
    (conf / "main.cf").write_text(
        MAIN_CF.format(root=root, sink_port=sink_port, sink_host=sink_host, listen_host=listen_host)
        + extra_main_cf
    )
    (conf / "master.cf").write_text(MASTER_CF.format(listen=f"{listen_host}:{port}"))
    for name in ("dynamicmaps.cf", "postfix-files"):
        shutil.copy(f"/etc/postfix/{name}", conf / name)
    shutil.copytree("/etc/postfix/postfix-files.d", conf / "postfix-files.d", dirs_exist_ok=True)
    shutil.copytree("/etc/postfix/dynamicmaps.cf.d", conf / "dynamicmaps.cf.d", dirs_exist_ok=True)
    started = subprocess.run(
        ["postfix", "-c", str(conf), "start"], capture_output=True, text=True, timeout=60
    )
    if started.returncode != 0:
        log = (root / "maillog").read_text() if (root / "maillog").exists() else ""
        raise RuntimeError(f"postfix did not start: {started.stderr}{log[-2000:]}")
    try:
        wait_for_port(port, host=listen_host)
        yield port
    finally:
        subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True, timeout=60)
        # the master exits asynchronously; wait until the port is free again
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((listen_host, port), 0.2).close()
            except OSError:
                break
            time.sleep(0.1)
