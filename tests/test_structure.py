"""The shape of the code: no import cycles among gateway's modules, the scheduler
apart from what a copy looks like, and SMTP worker processes that load only what
accepting mail needs."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import client_tls, load_test_config, make_message, write_config

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_load(path: Path) -> set[str]:
    """The gateway modules ``path`` imports when it is loaded: its top-level imports,
    not those under ``if TYPE_CHECKING:`` nor inside functions."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("gateway")}
            elif isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("gateway"):
                assert sub.module is not None
                found.add(sub.module)
                found |= {f"{sub.module}.{a.name}" for a in sub.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports_at_load(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_of_gateway_imports_itself_back_through_others():
    graph = _graph()
    assert len(graph) > 60  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_queue_imports_nothing_of_crypto_or_the_portal():
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("gateway.queue"):
            assert not {
                m for m in imported if m.startswith(("gateway.crypto", "gateway.portal"))
            }, name


def test_an_smtp_worker_loads_neither_the_app_nor_delivery_nor_the_web_stack(tmp_path):
    """A real worker process (`python -m gateway.smtp.workers`), its imports listed by
    ``-X importtime`` while it accepts a message."""
    path = write_config(tmp_path, {"relay.networks": ["127.0.0.1/32"]})
    config = load_test_config(path)
    from gateway.spool import Spool
    from gateway.tls import ensure_self_signed

    config.state_dir.mkdir(parents=True)
    ensure_self_signed(config.state_dir, "gw.sealgate.test")
    Spool(config.state_dir / "spool").open()
    listen = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    imports = open(tmp_path / "importtime.txt", "wb")  # noqa: SIM115 - the child's stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "gateway.smtp.workers",
            "--config",
            str(path),
            "--state-dir",
            str(config.state_dir),
            "--listen-fd",
            str(listen.fileno()),
            "--control-fd",
            str(theirs.fileno()),
        ],
        pass_fds=(listen.fileno(), theirs.fileno()),
        stdout=subprocess.DEVNULL,
        stderr=imports,
    )
    theirs.close()
    imports.close()
    try:
        control = ours.makefile("rb")
        assert json.loads(control.readline())["type"] == "ready"
        import smtplib

        port = listen.getsockname()[1]
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as c:
            c.starttls(context=client_tls())
            c.sendmail("s@clinic.test", ["r@example.test"], make_message())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = json.loads(control.readline())
            if message["type"] == "queued":
                break
        assert message["type"] == "queued"
    finally:
        control.close()
        ours.close()  # the worker ends when its control socket closes
        proc.wait(timeout=20)
        listen.close()
    lines = (tmp_path / "importtime.txt").read_text().splitlines()
    loaded = {line.rsplit("|", 1)[1].strip() for line in lines if "|" in line}
    assert "gateway.smtp.server" in loaded and "gateway.spool.submit" in loaded
    heavy = {"gateway.app", "gateway.queue.manager", "gateway.delivery.attempt", "aiohttp"}
    heavy |= {"gateway.archive.service", "gateway.portal.service", "pysequoia", "nh3"}
    assert loaded & heavy == set()


def test_the_command_line_starts_without_the_daemons_network_stack():
    """`sealgate queue list`, `keys list` and the other commands read a store and
    print: loading aiohttp, dnspython's resolver, the SMTP libraries or the logging
    and metrics stacks would cost every command's start (a tenth of a second or
    more) for nothing - the daemon's modules are imported by `run` alone."""
    code = "import json, sys, gateway.cli; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert "gateway.queue.store" in loaded and "gateway.archive.cli" in loaded
    heavy = {"aiohttp", "aiosmtplib", "aiosmtpd", "dns.asyncresolver", "structlog"}
    heavy |= {"prometheus_client", "gateway.app", "gateway.queue.manager"}
    heavy |= {"gateway.tlsrpt.service", "gateway.probe.mta_sts", "gateway.smtp.context"}
    assert loaded & heavy == set()
