"""The portal from a recipient's side: a gateway with the portal on, a recipient
without STARTTLS, the link and code in what it receives."""

from __future__ import annotations

import re
import ssl

import aiohttp
import pytest

from tests.conftest import leaf_files, make_message, smtp_client
from tests.support.world import wait_until


def link_in(data: bytes) -> str:
    found = re.search(rb"https://127\.0\.0\.1:\d+/m/[A-Za-z0-9_-]+", data)
    assert found, data
    return found.group(0).decode()


def code_in(data: bytes) -> str:
    found = re.search(rb"\b(\d{8})\b", data.split(b"\r\n\r\n", 1)[1])
    assert found, data
    return found.group(1).decode()


@pytest.fixture
async def portal(gateway_factory, world, pki, tmp_path):
    async def start(
        policy: str | None = None,
        message: bytes | None = None,
        recipient: str = "patient@plain.test",
        **overrides,
    ):
        plain = await world.mta("mx.plain.test", "127.0.0.93", cert=None)
        world.dns.add("plain.test", "MX", "10 mx.plain.test.")
        leaf = pki.ca.issue_cert("127.0.0.1")
        chain, key = leaf_files(leaf, tmp_path, "portal")
        gw = await gateway_factory(
            world.config(
                {
                    "portal.cert_file": str(chain),
                    "portal.key_file": str(key),
                    **overrides,
                },
                policy=policy,
            )
        )
        async with smtp_client(gw) as client:
            _, reply = await client.sendmail(
                "doctor@clinic.test",
                [recipient],
                message or make_message("Biopsy"),
                mail_options=[] if recipient.isascii() else ["SMTPUTF8"],
            )
        await wait_until(lambda: plain.received, what="the notification")
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for an IP address host
        )
        return gw, plain, link_in(plain.received[0].data), http, reply.rsplit(" ", 1)[1]

    sessions = []

    async def tracked(*args, **kwargs):
        found = await start(*args, **kwargs)
        sessions.append(found[3])
        return found

    yield tracked
    for http in sessions:
        await http.close()


def csrf_of(page: str) -> str:
    return re.search(r'name=csrf value="([^"]+)"', page).group(1)


async def request_code(http, link: str, plain) -> tuple[str, str]:
    """Open the link and have a code sent, as the recipient does: (form token, code)."""
    async with http.get(link) as r:
        csrf = csrf_of(await r.text())
    async with http.post(link + "/code", data={"csrf": csrf}):
        pass
    await wait_until(lambda: len(plain.received) == 2, what="the code")
    return csrf, code_in(plain.received[1].data)
