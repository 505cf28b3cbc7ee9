"""The OpenAPI document and the code cannot drift: every documented operation is
routed (and other methods on its path answer 405 with Allow), and schemathesis runs
the document against the live API in a real daemon - property-based, bounded in
examples: no 5xx, every status, content type, header and body as documented,
schema-invalid requests refused, no operation that works without a key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys

import pytest

from gateway.api.server import Request
from gateway.api.v1 import MessagesApi, Problem, openapi_document
from tests.conftest import load_test_config, write_config
from tests.e2e.daemon import Daemon

KEY = "sgk_schemathesis-0123456789"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def documented() -> dict[str, set[str]]:
    doc = json.loads(openapi_document())
    assert doc["openapi"].startswith("3.1")
    return {path: {m.upper() for m in ops} for path, ops in doc["paths"].items()}


def test_every_documented_operation_is_routed_and_no_other_method():
    api = MessagesApi.__new__(MessagesApi)  # routing only: nothing is opened
    for path, methods in documented().items():
        if path == "/api/openapi.json":
            continue
        concrete = path.replace("{id}", "18T5ZXB7JZRMTG7C")
        for method in METHODS:
            request = Request(method, concrete, {}, {}, b"", "127.0.0.1")
            if method in methods:
                scope, operation, handler, _ = api._route(request)
                assert scope and operation and callable(handler), (method, path)
            else:
                with pytest.raises(Problem) as refused:
                    api._route(request)
                assert refused.value.status == 405, (method, path)
                assert set(refused.value.extra["headers"]["Allow"].split(", ")) == methods


def test_every_route_of_the_code_is_documented():
    import inspect

    source = inspect.getsource(MessagesApi)
    paths = set(documented())
    for literal in re.findall(r'\(\["(\w+)"\], "(GET|POST)"', source):
        assert f"/api/v1/{literal[0]}" in paths, literal
    for action in ("revoke", "retry", "hold", "release", "delete"):
        assert f"/api/v1/messages/{{id}}/{action}" in paths
    assert "/api/v1/messages/{id}" in paths


@pytest.fixture
async def daemon(tmp_path, world):
    overrides = world.config(
        {
            "api.keys": [
                {
                    "name": "schemathesis",
                    "scopes": ["admin"],
                    "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                }
            ],
            "delivery.retry_schedule": ["1h"],
        }
    )
    path = write_config(tmp_path, overrides)
    d = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(d.start)
    yield d
    d.kill()


async def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_document(
    daemon, tmp_path
):
    # positive_data_acceptance is left out: a schema cannot say which strings are mail
    # addresses or which bytes are a certificate, so schema-valid data can be refused
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"https://{daemon.api}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--tls-verify",
        "false",
        "--max-examples",
        "25",
        "--seed",
        "20261202",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--generation-database",
        "none",
        "--no-color",
        "--workers",
        "1",
    ]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False
        )

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stdout[-6000:]
    assert re.search(r"\d+ generated, \d+ passed", done.stdout), done.stdout[-2000:]
    errors = [
        line for line in daemon.log_path.read_text().splitlines() if '"level": "error"' in line
    ]
    assert errors == []
