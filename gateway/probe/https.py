"""An HTTPS GET for the gateway's own lookups (MTA-STS policies, WKD keys), on
aiohttp's client: names resolved through the gateway's resolver
(``dns.nameservers``, never the system's), WebPKI verification (system CAs plus
``tls.ca_file``, SNI), no redirects followed (RFC 8461 3.3), no content decoding, a
size limit checked as the body arrives, one connection per request.  The caller
bounds the time.  Failures are `FetchError`s with a reason for logs and evidence.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.errors import SealgateError
from gateway.probe.dns import LookupStatus, Resolver


class FetchError(SealgateError):
    """Why the resource could not be fetched; ``certificate``: the server's
    certificate was refused (a WebPKI failure, not an unreachable server)."""

    def __init__(self, reason: str, certificate: bool = False):
        super().__init__(reason)
        self.certificate = certificate


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


async def addresses(host: str, resolver: Resolver) -> list[str]:
    """The host's addresses (an address literal: itself); [] when the name does not
    exist or has none."""
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host.strip("[]")))]
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        lookup = await resolver.lookup(host, rdtype)
        if lookup.status is LookupStatus.ERROR:
            raise FetchError(f"address lookup for {host} failed ({lookup.error})")
        found += [r.to_text() for r in lookup.records]
    return found


class _GatewayResolver(AbstractResolver):
    """aiohttp's name resolution through the gateway's own resolvers."""

    def __init__(self, resolver: Resolver):
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            ips = await addresses(host, self._resolver)
        except FetchError as e:
            raise OSError(str(e)) from None
        if not ips:
            raise OSError(f"{host} has no address")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in ips
        ]

    async def close(self) -> None:
        pass


async def get(
    host: str,
    path: str,
    port: int,
    resolver: Resolver,
    ctx: ssl.SSLContext,
    max_bytes: int,
    accept: str = "*/*",
) -> Response:
    """GET ``https://host:port/path``; the body is read only for status 200."""
    if not await addresses(host, resolver):
        raise FetchError(f"{host} has no address")
    connector = aiohttp.TCPConnector(
        resolver=_GatewayResolver(resolver), ssl=ctx, use_dns_cache=False, force_close=True
    )
    url = URL(f"https://{host}:{port}{path}", encoded=True)  # path and query as given
    headers = {"User-Agent": "sealgate", "Accept": accept, "Accept-Encoding": "identity"}
    try:
        async with (
            aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
            session.get(url, headers=headers, allow_redirects=False) as r,
        ):
            if r.status != 200:
                return Response(r.status, _lower(r.headers), b"")
            if r.content_length is not None and r.content_length > max_bytes:
                raise FetchError(f"{host}: larger than {max_bytes} bytes")
            body = bytearray()
            async for chunk in r.content.iter_chunked(16384):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"{host}: larger than {max_bytes} bytes")
            return Response(r.status, _lower(r.headers), bytes(body))
    except aiohttp.ClientSSLError as e:  # a certificate failure: no other address is tried
        raise FetchError(f"TLS with {host} failed: {e}", certificate=True) from None
    except (aiohttp.ClientError, OSError) as e:
        raise FetchError(f"cannot fetch from {host}: {e}") from None


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
