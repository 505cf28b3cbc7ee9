"""Web Key Directory (draft-koch-openpgp-webkey-service): find a recipient's OpenPGP
key over HTTPS at their own domain.

The local part is lower-cased, hashed with SHA-1 and z-base-32 encoded (RFC 6189
§5.1.6).  Advanced method first - ``https://openpgpkey.<domain>/.well-known/
openpgpkey/<domain>/hu/<hash>?l=<local>`` - and only when ``openpgpkey.<domain>``
has no address, the direct method at ``https://<domain>/.well-known/openpgpkey/hu/
<hash>?l=<local>``.  HTTPS through the gateway's resolver with WebPKI verification
(`gateway.probe.https`), 256 KiB at most, within ``wkd.timeout``.

`WkdKeyStore` puts WKD behind the key directory: when a PGP key could change a
decision (the policy allows discovered keys, PGP is allowed and nothing better is
available) and the directory has no imported PGP key for the address, WKD is asked
(once per address per
``wkd.cache_ttl``; a miss or an error for ``wkd.negative_ttl``); a key found is
checked like an imported one and kept in the directory with source ``wkd``, and a
key WKD no longer serves is removed.  Whether a discovered key may be used is the
policy's choice (``discovered_keys``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.crypto.keydir import DirectoryKeyStore, KeyDirectory
from gateway.observability.metrics import Metrics
from gateway.probe import https
from gateway.probe.dns import Resolver
from gateway.probe.facts import KeyInfo, KnownKeys
from gateway.tls import client_context

MAX_KEY_BYTES = 256 * 1024
_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


def zbase32(data: bytes) -> str:
    bits = "".join(f"{b:08b}" for b in data)
    bits += "0" * (-len(bits) % 5)
    return "".join(_ZBASE32[int(bits[i : i + 5], 2)] for i in range(0, len(bits), 5))


def local_hash(local: str) -> str:
    return zbase32(hashlib.sha1(local.lower().encode("utf-8")).digest())  # noqa: S324 - the spec's


def locations(address: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """((host, path) of the advanced method, (host, path) of the direct method)."""
    local, _, domain = address.rpartition("@")
    domain = domain.lower()
    query = "?l=" + urllib.parse.quote(local, safe="")
    hu = local_hash(local)
    advanced = (f"openpgpkey.{domain}", f"/.well-known/openpgpkey/{domain}/hu/{hu}{query}")
    direct = (domain, f"/.well-known/openpgpkey/hu/{hu}{query}")
    return advanced, direct


async def fetch_key(
    address: str,
    resolver: Resolver,
    *,
    port: int = 443,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> bytes | None:
    """The key data WKD serves for ``address``; None when it serves none (404);
    FetchError when it cannot be asked."""
    (adv_host, adv_path), (direct_host, direct_path) = locations(address)
    ctx = client_context(ca_file)
    async with asyncio.timeout(timeout):
        if await https.addresses(adv_host, resolver):
            host, path = adv_host, adv_path
        else:  # the subdomain does not exist: the direct method
            host, path = direct_host, direct_path
        response = await https.get(host, path, port, resolver, ctx, MAX_KEY_BYTES)
    if response.status == 404:
        return None
    if response.status != 200 or not response.body:
        raise https.FetchError(f"{host} answered HTTP {response.status}")
    return response.body


@dataclass
class _Asked:
    until: float
    found: bool


class WkdKeyStore:
    """The key directory, with WKD asked for the addresses it has no PGP key for."""

    def __init__(
        self,
        inner: DirectoryKeyStore,
        writer: KeyDirectory,
        resolver: Resolver,
        *,
        port: int = 443,
        ca_file: Path | None = None,
        timeout: float = 10.0,
        cache_ttl: float = 86400.0,
        negative_ttl: float = 3600.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.inner, self.writer, self.resolver = inner, writer, resolver
        self.port, self.ca_file, self.timeout = port, ca_file, timeout
        self.cache_ttl, self.negative_ttl = cache_ttl, negative_ttl
        self.metrics, self.clock = metrics, clock
        self._asked: dict[str, _Asked] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    async def lookup(self, address: str) -> KnownKeys:
        """What the directory knows (imported keys, and keys WKD served before)."""
        return await self.inner.lookup(address)

    async def discover(self, address: str) -> KnownKeys:
        """Ask WKD (unless an imported PGP key exists, or WKD was asked recently),
        then answer like `lookup`.  Only called when a discovered key could change the
        decision: every lookup shows the recipient's address to their domain."""
        address = address.lower()
        keys = await self.inner.lookup(address)
        if keys.pgp is not None and keys.pgp.source != "wkd":
            return keys  # an imported key: WKD is not asked
        asked = self._asked.get(address)
        if asked is not None and asked.until > self.clock():
            return keys
        task = self._inflight.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(address))
            self._inflight[address] = task
            task.add_done_callback(lambda _: self._inflight.pop(address, None))
        await asyncio.shield(task)
        self.inner.invalidate()
        return await self.inner.lookup(address)

    async def _ask(self, address: str) -> None:
        outcome = "error"
        try:
            data = await fetch_key(
                address, self.resolver, port=self.port, ca_file=self.ca_file, timeout=self.timeout
            )
            if data is None:
                outcome = "none"
                await asyncio.to_thread(self.writer.forget_discovered, address)
            else:
                report = await asyncio.to_thread(
                    self.writer.import_pgp, data, address, "wkd", "wkd"
                )
                outcome = "found" if report.imported else "unusable"
        except (https.FetchError, TimeoutError, OSError):
            outcome = "error"
        except ValueError:  # served, but not a usable key for this address
            outcome = "unusable"
        found = outcome == "found"
        ttl = self.cache_ttl if found or outcome == "none" else self.negative_ttl
        self._asked[address] = _Asked(self.clock() + ttl, found)
        if self.metrics is not None:
            self.metrics.wkd_lookups.labels(outcome).inc()

    async def material(self, info: KeyInfo) -> bytes | None:
        return await self.inner.material(info)
