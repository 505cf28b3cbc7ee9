"""A real OpenID Connect provider on loopback for the portal tests: the npm package
``oidc-provider`` (OpenID certified; pinned in tests/support/oidc/package.json and
installed by scripts/setup.sh), started with Node for one test and stopped after."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "oidc"


class OidcProvider:
    def __init__(
        self, port: int, clients: list[dict[str, Any]], accounts: dict[str, dict[str, Any]]
    ):
        self.port = port
        self.clients, self.accounts = clients, accounts
        self.process: asyncio.subprocess.Process | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> OidcProvider:
        node = shutil.which("node")
        if node is None or not (HERE / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(
                "node and tests/support/oidc/node_modules are needed: run make setup"
            )
        config = json.dumps({"clients": self.clients, "accounts": self.accounts})
        self.process = await asyncio.create_subprocess_exec(
            node,
            str(HERE / "provider.mjs"),
            str(self.port),
            config,
            cwd=HERE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), 20)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {line!r}")
        return self

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
