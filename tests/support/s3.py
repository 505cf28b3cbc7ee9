"""S3 for the tests: moto's server mode (``moto[server]``), an emulator of the S3
API - not AWS - run as a process of its own on a loopback port for the test session.
Each test gets buckets of its own (`S3Server.bucket`), with Object Lock when asked."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY_ID = "sealgate-test"
SECRET = "sealgate-test-secret"


@dataclass
class S3Server:
    process: subprocess.Popen[bytes]
    port: int
    root: Path
    _count: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secret_file(self) -> Path:
        return self.root / "s3-secret"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET,
        )

    def bucket(self, object_lock: bool = True) -> str:
        """A new bucket (versioned, with Object Lock if ``object_lock``); its name."""
        self._count += 1
        name = f"archive-{self._count}"
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def config(self, bucket: str, lock: str = "governance", prefix: str = "records") -> dict:
        """The storage.* options that point at ``bucket``."""
        return {
            "storage.blobs": f"s3://{bucket}/{prefix}",
            "storage.s3.endpoint": self.endpoint,
            "storage.s3.access_key_id": ACCESS_KEY_ID,
            "storage.s3.secret_access_key_file": str(self.secret_file),
            "storage.s3.object_lock": lock,
        }


def start_s3(root: Path, port: int | None = None) -> S3Server:
    """``port``: a port it listened on before (a restart), else a free one."""
    from tests.conftest import free_port

    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            break
        if process.poll() is not None:
            raise RuntimeError("moto's server did not start")
        time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("moto's server did not listen within 30 s")
    server = S3Server(process, port, root)
    server.secret_file.write_text(SECRET + "\n")
    return server


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(10)
        if server.process.poll() is None:
            server.process.kill()
