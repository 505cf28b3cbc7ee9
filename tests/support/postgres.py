"""A real PostgreSQL server for the storage tests: Debian's ``postgresql`` binaries,
a private cluster made with ``initdb`` in a temporary directory and run with
``pg_ctl`` as the ``postgres`` system user (the server refuses to run as root), on a
loopback port, password authentication (scram-sha-256) for the role ``sealgate``.
Started once per test session, stopped at its end; each test gets a database of its
own (`PostgresServer.database`)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "sealgate-test-password"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run make setup")
    return found[-1]


def _as_postgres(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True, timeout=60
    )


@dataclass
class PostgresServer:
    root: Path
    port: int
    fsync: bool = False
    _count: int = 0

    @property
    def url(self) -> str:
        """The server's URL without a database and without the password."""
        return f"postgresql://sealgate@127.0.0.1:{self.port}"

    def database(self, name: str | None = None) -> str:
        """A new, empty database (``name``, else one of its own); its URL (no
        password: see `password_file`)."""
        self._count += 1
        name = name or f"t{os.getpid()}_{self._count}"
        done = _as_postgres(
            _bin("psql"), "-h", str(self.root / "socket"), "-p", str(self.port), "-U", "postgres",
            "-c", f"CREATE DATABASE {name} OWNER sealgate",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return f"{self.url}/{name}"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    def stop(self) -> None:
        """Stop the server (fast: clients are disconnected), as an outage would."""
        done = _as_postgres(
            _bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)

    def start(self) -> None:
        """Start it again on the same port, after `stop`."""
        done = _as_postgres(
            _bin("pg_ctl"), "-D", str(self.root / "data"), "-o", _options(self),
            "-l", str(self.root / "log"), "-w", "start",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr)


def _options(server: PostgresServer) -> str:
    return (
        f"-p {server.port} -k {server.root / 'socket'} -c listen_addresses=127.0.0.1 "
        f"-c fsync={'on' if server.fsync else 'off'}"
    )


def start_postgres(fsync: bool = False) -> PostgresServer:
    """``fsync``: as in production (the benchmarks); the tests run without."""
    from tests.conftest import free_port

    root = Path(tempfile.mkdtemp(prefix="sealgate-pg-"))
    shutil.chown(root, "postgres", "postgres")
    (root / "socket").mkdir()
    shutil.chown(root / "socket", "postgres", "postgres")
    pwfile = root / "initpw"
    pwfile.write_text("unused\n")
    shutil.chown(pwfile, "postgres", "postgres")
    data = root / "data"
    done = _as_postgres(
        _bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale",
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr}")
    server = PostgresServer(root, free_port(), fsync)
    done = _as_postgres(
        _bin("pg_ctl"), "-D", str(data), "-o", _options(server), "-l", str(root / "log"),
        "-w", "start",
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {done.stderr}{(root / 'log').read_text()}")
    port = server.port
    done = _as_postgres(
        _bin("psql"), "-h", str(root / "socket"), "-p", str(port), "-U", "postgres",
        "-c", f"CREATE ROLE sealgate LOGIN PASSWORD '{PASSWORD}'",
    )  # fmt: skip
    if done.returncode != 0:
        stop_postgres(server)
        raise RuntimeError(done.stderr)
    server.password_file.write_text(PASSWORD + "\n")
    server.password_file.chmod(0o600)
    return server


def stop_postgres(server: PostgresServer) -> None:
    _as_postgres(_bin("pg_ctl"), "-D", str(server.root / "data"), "-m", "fast", "-w", "stop")
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            stop_postgres(server)
