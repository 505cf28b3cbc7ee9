"""A minimal HTTPS GET for the gateway's own lookups (MTA-STS policies, WKD keys):
names resolved through the gateway's resolver (``dns.nameservers``), WebPKI
verification (system CAs plus ``tls.ca_file``, SNI), HTTP/1.1 with ``Connection:
close``, no redirects followed, a size limit, chunked or sized bodies.  The caller
bounds the time.  Failures are `FetchError`s with a reason for logs and evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import SealgateError
from gateway.probe.dns import LookupStatus, Resolver


class FetchError(SealgateError):
    """Why the resource could not be fetched."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def addresses(host: str, resolver: Resolver) -> list[str]:
    """The host's addresses; [] when the name does not exist or has none."""
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        lookup = await resolver.lookup(host, rdtype)
        if lookup.status is LookupStatus.ERROR:
            raise FetchError(f"address lookup for {host} failed ({lookup.error})")
        found += [r.to_text() for r in lookup.records]
    return found


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
    ips = await addresses(host, resolver)
    if not ips:
        raise FetchError(f"{host} has no address")
    last: Exception = FetchError(f"{host}: no address answered")
    for ip in ips:
        try:
            reader, writer = await asyncio.open_connection(ip, port, ssl=ctx, server_hostname=host)
        except ssl.SSLError as e:  # a certificate failure: no other address is tried
            raise FetchError(f"TLS with {host} failed: {e}") from None
        except OSError as e:
            last = e
            continue
        try:
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sealgate\r\n"
                f"Accept: {accept}\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            await writer.drain()
            return await _read_response(reader, host, max_bytes)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            raise FetchError(f"cannot fetch from {host}: {e}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    raise FetchError(f"cannot fetch from {host}: {last}")


async def _read_response(reader: asyncio.StreamReader, host: str, max_bytes: int) -> Response:
    status_line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise FetchError(f"{host} did not answer HTTP: {status_line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for _ in range(100):
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise FetchError(f"{host} sent too many header lines")
    if status != 200:
        return Response(status, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader, host, max_bytes)
    elif "content-length" in headers:
        length = int(headers["content-length"]) if headers["content-length"].isdigit() else -1
        if not 0 <= length <= max_bytes:
            raise FetchError(f"{host}: larger than {max_bytes} bytes")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise FetchError(f"{host}: larger than {max_bytes} bytes")
    return Response(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader, host: str, max_bytes: int) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readline()).split(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise FetchError(f"{host}: malformed chunked encoding") from None
        if size == 0:
            return bytes(body)
        if len(body) + size > max_bytes:
            raise FetchError(f"{host}: larger than {max_bytes} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
