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
        self._drain: asyncio.Task[None] | None = None

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
        stdout = self.process.stdout
        assert stdout is not None
        said: list[bytes] = []

        async def until_ready() -> bool:
            while line := await stdout.readline():
                said.append(line)
                if line.strip() == b"ready":
                    return True
            return False

        try:
            ready = await asyncio.wait_for(until_ready(), 20)
        except TimeoutError:
            ready = False
        if not ready:
            await self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {b''.join(said)[-2000:]!r}")
        # keep reading what it says (its warnings), so that its pipe never fills
        self._drain = asyncio.get_running_loop().create_task(self._read_rest(stdout))
        return self

    async def _read_rest(self, stdout: asyncio.StreamReader) -> None:
        while await stdout.readline():
            pass

    async def stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def sign_in_at_provider(driver: Any, login: str) -> None:
    """In the browser, on the provider's development pages: the login form (any
    password; the login names the account), then the consent page."""
    from selenium.webdriver.common.by import By

    from tests.support.browser import press

    field = driver.find_element(By.NAME, "login")
    field.clear()
    field.send_keys(login)
    driver.find_element(By.NAME, "password").send_keys("anything")
    press(driver, "button[type=submit]")
    press(driver, "button[type=submit]")  # the consent page
