"""Requests to the ops listener."""

from __future__ import annotations

import asyncio

from gateway.config import HostPort


async def http_get(gw, path: str, method: str = "GET") -> tuple[int, str]:
    listen = HostPort(*gw.http.address)
    reader, writer = await asyncio.open_connection(listen.host, listen.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body
