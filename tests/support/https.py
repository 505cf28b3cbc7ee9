"""HTTPS servers on 127.0.0.x for MTA-STS tests: each serves one canned response.

server = await PolicyServer("127.0.0.71", port, cert_and_key, body="version: STSv1...")
server.status, server.content_type, server.chunked = 404, "text/html", True
server.requests   # how many requests it answered
server.received   # each request's method, headers and body (a POST's)

silent = await SilentServer("127.0.0.85", port).start()   # takes connections, never
silent.held, silent.gave_up                                # answers; when clients left
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PolicyServer:
    host: str
    port: int
    cert: tuple[Path, Path]
    body: str | bytes = ""
    status: int = 200
    content_type: str = "text/plain"
    chunked: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    requests: int = 0
    paths: list[str] = field(default_factory=list)
    # every request: (method, headers with lower-case names, body)
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> PolicyServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=ctx)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            body_in = await reader.readexactly(length) if length else b""
            self.requests += 1
            self.paths.append(request_line.split(" ")[1] if " " in request_line else "")
            self.received.append((request_line.split(" ")[0], headers, body_in))
            if self.delay:
                await asyncio.sleep(self.delay)
            body = self.body.encode() if isinstance(self.body, str) else self.body
            head = [f"HTTP/1.1 {self.status} X", f"Content-Type: {self.content_type}"]
            head += [f"{k}: {v}" for k, v in self.headers.items()]
            if self.chunked:
                head.append("Transfer-Encoding: chunked")
                payload = b"".join(
                    f"{len(body[i : i + 1000]):x}\r\n".encode() + body[i : i + 1000] + b"\r\n"
                    for i in range(0, len(body), 1000)
                )
                payload += b"0\r\n\r\n"
            else:
                head.append(f"Content-Length: {len(body)}")
                payload = body
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


@dataclass
class SilentServer:
    """Takes connections and never says a word (no TLS handshake either): a receiver
    that hangs.  ``held``: the connections taken; ``gave_up``: when each client
    closed one it had waited on."""

    host: str
    port: int
    held: list[asyncio.StreamWriter] = field(default_factory=list)
    gave_up: list[float] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self.held:
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held.append(writer)
        await reader.read()  # until the client gives up
        self.gave_up.append(time.monotonic())
