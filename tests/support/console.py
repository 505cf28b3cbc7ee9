"""The compliance console from its users' side: a gateway that delivered a message
over verified TLS (with a Bcc recipient) and journaled it, the console on a test CA's
certificate, a local account of each role, and an HTTPS client per person (its own
cookies) that signs in as a person does: the form's token, the password, the code
from the authenticator (pyotp)."""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pyotp
import pytest

from gateway.archive.query import Query
from gateway.config import HostPort
from gateway.portal.credentials import hash_secret
from tests.conftest import leaf_files, make_message, smtp_client
from tests.support.archive import archive_of
from tests.support.world import tls_only, wait_until

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test account's
ROLES = ("auditor", "investigator", "admin")


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:2000]
    return found.group(1)


@dataclass
class Person:
    """One browser: its cookies, its account."""

    base: str
    http: aiohttp.ClientSession
    name: str = ""
    secret: str = ""
    csrf: str = ""
    last_page: str = ""

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as r:
            body = await r.read()
            return r.status, body.decode("utf-8", "replace"), r

    async def fetch(self, path: str) -> tuple[int, bytes, Any]:
        async with self.http.get(self.base + path, allow_redirects=False) as r:
            return r.status, await r.read(), r

    async def post(self, path: str, data: Any, csrf: str | None = None) -> tuple[int, bytes, Any]:
        form = list(data.items()) if isinstance(data, dict) else list(data)
        form.append(("csrf", self.csrf if csrf is None else csrf))
        async with self.http.post(self.base + path, data=form, allow_redirects=False) as r:
            return r.status, await r.read(), r

    async def sign_in(self, code: str | None = None, password: str = PASSWORD) -> tuple[int, str]:
        status, page, _ = await self.get("/signin")
        assert status == 200, page
        form = {
            "csrf": csrf_of(page),
            "name": self.name,
            "password": password,
            # the next step's code: each step is accepted once, and the test may have
            # signed this person in a moment ago
            "code": code if code is not None else pyotp.TOTP(self.secret).at(time.time() + 30),
        }
        async with self.http.post(self.base + "/signin", data=form) as r:
            page = await r.text()
        if r.status == 200 and 'action="/signout"' in page:
            self.csrf = csrf_of(page)
        self.last_page = page
        return r.status, page


@dataclass
class ConsoleWorld:
    gw: Any
    mta: Any
    base: str
    ca_file: str
    queue_id: str
    people: dict[str, Person] = field(default_factory=dict)
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> Person:
        context = ssl.create_default_context(cafile=self.ca_file)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for an IP address host
        )
        self._sessions.append(http)
        return Person(self.base, http)

    async def account(self, name: str, roles: tuple[str, ...]) -> Person:
        secret = pyotp.random_base32()
        data = self.gw.console.data
        await data.run(data.store.add_user, name, hash_secret(PASSWORD), secret, roles)
        person = self.browser()
        person.name, person.secret = name, secret
        return person

    async def signed_in(self, role: str) -> Person:
        if role not in self.people:
            person = await self.account(f"{role}-1", (role,))
            status, page = await person.sign_in()
            assert status == 200 and 'action="/signout"' in page, page[:3000]
            self.people[role] = person
        return self.people[role]

    async def send(
        self, recipients: list[str], subject: str = "Lab results", data: bytes | None = None
    ) -> str:
        """Mail through the gateway, once delivered to every recipient and journaled."""
        async with smtp_client(self.gw) as client:
            _, reply = await client.sendmail(
                "doctor@clinic.test", recipients, data or make_message(subject)
            )
        queue_id = reply.rsplit(" ", 1)[1]

        def delivered() -> bool:
            with archive_of(self.gw) as archive:
                found = archive.search(Query(queue_id=queue_id))
            return bool(found) and all(r["state"] == "delivered" for r in found[0]["recipients"])

        await wait_until(delivered, timeout=30, what="delivered and journaled")
        return queue_id

    async def close(self) -> None:
        for http in self._sessions:
            await http.close()


@pytest.fixture
async def console(gateway_factory, world, pki, tmp_path):
    worlds: list[ConsoleWorld] = []

    async def start(**overrides: Any) -> ConsoleWorld:
        mta = await world.mta("mx.tls.test", "127.0.0.61")
        world.dns.add("tls.test", "MX", "10 mx.tls.test.")
        leaf = pki.ca.issue_cert("127.0.0.1")
        chain, key = leaf_files(leaf, tmp_path, "console")
        gw = await gateway_factory(
            world.config(
                {"console.cert_file": str(chain), "console.key_file": str(key), **overrides},
                policy=tls_only("verify"),
            )
        )
        listen = HostPort(*gw.console.address)
        w = ConsoleWorld(gw, mta, f"https://{listen}", str(pki.ca_file), "")
        worlds.append(w)
        w.queue_id = await w.send(["patient@tls.test", "audit@tls.test"])
        return w

    yield start
    for w in worlds:
        await w.close()
