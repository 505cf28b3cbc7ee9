"""The webhook client's HTTP/1.1 against real servers on loopback: kept-alive
connections are used again; answers with a chunked, sized or unsized body are read
whole; a connection the server closed while idle is replaced; a server that answers
garbage, or not at all in time, is an error, not a hang."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from gateway.webhooks.http import Endpoint, HttpError


@pytest.fixture
def tls(tmp_path):
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def serve(ctx, answers):
    """A server answering each request with the next of ``answers`` (bytes, or None:
    close the connection without an answer); (port, connections, requests)."""
    seen = {"connections": 0, "requests": []}

    async def handle(reader, writer):
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen["requests"].append(head + await reader.readexactly(length))
                answer = answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], seen


async def test_connections_are_kept_and_every_kind_of_body_is_read(tls):
    answers = [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ]
    server, port, seen = await serve(tls[0], answers)
    endpoint = Endpoint(f"https://127.0.0.1:{port}/hooks?x=1", tls[1], resolver=None)
    statuses = [await endpoint.post(b'{"n": %d}' % i, {"webhook-id": f"e{i}"}, 5) for i in range(5)]
    assert statuses == [204, 200, 202, 503, 200]
    assert seen["connections"] == 1  # one kept connection for all five
    assert seen["requests"][0].startswith(b"POST /hooks?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"webhook-id: e0\r\n" in seen["requests"][0] and seen["requests"][0].endswith(
        b'{"n": 0}'
    )
    await endpoint.close()
    server.close()


async def test_a_connection_closed_while_idle_is_replaced_once(tls):
    answers = [b"HTTP/1.1 204 No Content\r\n\r\n", None, b"HTTP/1.1 204 No Content\r\n\r\n"]
    server, port, seen = await serve(tls[0], answers)
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", tls[1], resolver=None)
    assert await endpoint.post(b"{}", {}, 5) == 204
    assert await endpoint.post(b"{}", {}, 5) == 204  # the kept one was closed: a new one
    assert seen["connections"] == 2
    await endpoint.close()
    server.close()


async def test_garbage_or_silence_is_an_error_not_a_hang(tls):
    server, port, _ = await serve(tls[0], [b"SMTP/2 hello\r\n\r\n"])
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", tls[1], resolver=None)
    with pytest.raises(HttpError, match="not an HTTP answer"):
        await endpoint.post(b"{}", {}, 5)
    server.close()

    async def silent(reader, writer):
        await asyncio.sleep(10)

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=tls[0])
    endpoint = Endpoint(f"https://127.0.0.1:{quiet.sockets[0].getsockname()[1]}/", tls[1], None)
    with pytest.raises(TimeoutError):
        await endpoint.post(b"{}", {}, 0.5)
    quiet.close()


async def test_a_certificate_the_client_does_not_trust_is_refused(tls):
    server, port, _ = await serve(tls[0], [])
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", ssl.create_default_context(), None)
    with pytest.raises(HttpError, match="TLS with 127.0.0.1 failed"):
        await endpoint.post(b"{}", {}, 5)
    server.close()
