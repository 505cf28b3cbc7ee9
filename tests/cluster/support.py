"""Several Sealgate nodes on one machine: real ``sealgate run`` processes, each with
its own state directory and node id, sharing one PostgreSQL database (and, when
asked, moto's S3) and the archive's keys, as the nodes of a cluster do."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon


def shared_keys(root: Path) -> dict[str, Any]:
    """The archive's master key and checkpoint signing key, the same on every node."""
    root.mkdir(parents=True, exist_ok=True)
    master = root / "master.key"
    master.write_bytes(os.urandom(32))
    signing = root / "signing.pem"
    signing.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "archive.master_keys": [{"id": "cluster-1", "file": str(master)}],
        "archive.signing_key_file": str(signing),
    }


def node(root: Path, name: str, settings: dict[str, Any]) -> Daemon:
    """A node (not started) named ``name`` with its own directory under ``root``."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    path = write_config(directory, {**settings, "cluster.node_id": name})
    return Daemon(path, load_test_config(path), directory / "daemon.log")


def metric(daemon: Daemon, name: str, label: str = "") -> float:
    """A counter or gauge from the node's /metrics, summed over its series - those
    with ``label`` (``state="silent"``) if given (0 when absent)."""
    with urllib.request.urlopen(f"http://{daemon.http}/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    labels = rf"{{[^}}]*{re.escape(label)}[^}}]*}}" if label else r"(?:{[^}]*})?"
    found = re.findall(rf"^{name}{labels} ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)
