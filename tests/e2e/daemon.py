"""Run ``sealgate`` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiosmtplib

from gateway.config import Config, HostPort, parse_hostport
from tests.support.closing import ClosingSMTP


class Daemon:
    def __init__(self, config_path: Path, config: Config, log_path: Path):
        self.config_path = config_path
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.smtp = self.http = HostPort("127.0.0.1", 0)  # known once it runs
        self.api: HostPort | None = None
        self.portal: HostPort | None = None

    def start(self, timeout: float = 20) -> None:
        """Start it and wait until it is ready; its listeners' addresses (port 0 in the
        configuration: any free port) are read from its ``app.ready`` log line."""
        seen = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
            ready = self._ready_line(seen)
            if ready is not None:
                self.smtp = parse_hostport(ready["smtp"])
                self.http = parse_hostport(ready["http"])
                self.api = parse_hostport(ready["api"]) if ready.get("api") else None
                self.portal = parse_hostport(ready["portal"]) if ready.get("portal") else None
                with urllib.request.urlopen(f"http://{self.http}/readyz", timeout=5) as r:  # noqa: S310
                    assert r.status == 200
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("daemon did not become ready")

    def _ready_line(self, offset: int) -> dict[str, Any] | None:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            for raw in f.read().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    if event.get("event") == "app.ready":
                        return dict(event)
        return None

    def smtp_client(self, timeout: float = 10) -> aiosmtplib.SMTP:
        """A client for the daemon's listener, STARTTLS on (self-signed certificate);
        its ``async with`` ends once its socket has closed."""
        from tests.conftest import client_tls

        return ClosingSMTP(
            hostname=self.smtp.host,
            port=self.smtp.port,
            start_tls=True,
            tls_context=client_tls(),
            timeout=timeout,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
