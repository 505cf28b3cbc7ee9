"""The webhook client's HTTP/1.1 against real servers on loopback: kept-alive
connections are used again; requests are sent back to back and their answers taken
in order; what a server did not take before it closed the connection is sent again,
and one that answers only the first of requests sent back to back is no longer sent
them so; answers with a chunked, sized or unsized body are read whole; a connection
the server closed while idle is replaced; a server that answers garbage, or not at
all in time, is an error, not a hang."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from email.utils import format_datetime

import pytest
import trustme

from gateway.webhooks import http
from gateway.webhooks.http import Endpoint, HttpError
from tests.support.webhooks import read_request


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
                seen["requests"].append(b"".join(await read_request(reader)))
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
    statuses = [
        (await endpoint.post(b'{"n": %d}' % i, {"webhook-id": f"e{i}"}, 5)).status for i in range(5)
    ]
    assert statuses == [204, 200, 202, 503, 200]
    assert seen["connections"] == 1  # one kept connection for all five
    assert seen["requests"][0].startswith(b"POST /hooks?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"webhook-id: e0\r\n" in seen["requests"][0] and seen["requests"][0].endswith(
        b'{"n": 0}'
    )
    await endpoint.close()
    server.close()


async def test_requests_sent_back_to_back_are_answered_in_order_on_one_connection(tls):
    """The server reads all four requests before it answers any (so they were sent
    without waiting for answers), then answers them in one piece - an interim 100
    before one of them, which is not taken for its answer."""
    seen = {"connections": 0, "requests": []}

    async def handle(reader, writer):
        seen["connections"] += 1
        for _ in range(4):
            seen["requests"].append(b"".join(await read_request(reader)))
        writer.write(
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 429 Slow down\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls[0])
    endpoint = Endpoint(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/h", tls[1], None)
    requests = [endpoint.request(b'{"n": %d}' % i, {"webhook-id": f"e{i}"}) for i in range(4)]
    answers, error = await endpoint.post_all(requests, 5)
    assert error is None
    assert [(a.status, a.retry_after) for a in answers] == [
        (204, None),
        (200, None),
        (429, 30.0),
        (202, None),
    ]
    assert seen["connections"] == 1
    assert [r.split(b"\r\n\r\n")[1] for r in seen["requests"]] == [
        b'{"n": %d}' % i for i in range(4)
    ]
    assert len(endpoint._idle) == 1 and endpoint.pipelining
    await endpoint.close()
    server.close()


async def test_what_a_server_did_not_take_before_closing_is_sent_again(tls):
    """A server that answers one request a connection with ``Connection: close``
    (RFC 9112 9.6: it takes nothing after it): each of the rest goes again on a new
    connection, until all are answered."""
    seen = {"connections": 0, "bodies": []}

    async def handle(reader, writer):
        seen["connections"] += 1
        seen["bodies"].append((await read_request(reader))[1])
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls[0])
    endpoint = Endpoint(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/", tls[1], None)
    requests = [endpoint.request(b"%d" % i, {}) for i in range(3)]
    answers, error = await endpoint.post_all(requests, 5)
    assert error is None and [a.status for a in answers] == [204, 204, 204]
    assert seen["connections"] == 3 and seen["bodies"] == [b"0", b"1", b"2"]
    assert endpoint._idle == []
    server.close()


async def test_a_server_answering_only_the_first_of_requests_back_to_back(tls):
    """A server that reads one request, answers it and drops what came behind it:
    the rest get no answer within the timeout (the first's answer is kept), and the
    endpoint is marked as not taking requests back to back."""

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        reader._buffer.clear()  # what it had not asked for: dropped
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls[0])
    endpoint = Endpoint(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/", tls[1], None)
    answers, error = await endpoint.post_all([endpoint.request(b"{}", {})] * 3, 0.5)
    assert [a.status for a in answers] == [204]
    assert isinstance(error, TimeoutError)
    assert not endpoint.pipelining
    assert endpoint._idle == []  # answers were owed on it: closed
    server.close()


async def test_a_post_cancelled_while_answers_are_owed_closes_its_connection(tls):
    """The dispatcher stopping in the middle of a round: the connection that still
    owes answers is closed (the server sees its end), not left open or kept."""
    ended = asyncio.Event()

    async def handle(reader, writer):
        await read_request(reader)
        await reader.read()  # no answer; until the client closes
        ended.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls[0])
    endpoint = Endpoint(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/", tls[1], None)
    task = asyncio.ensure_future(endpoint.post_all([endpoint.request(b"{}", {})], 30))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(ended.wait(), 5)
    assert endpoint._idle == []
    server.close()


async def test_a_connection_closed_while_idle_is_replaced_once(tls):
    answers = [b"HTTP/1.1 204 No Content\r\n\r\n", None, b"HTTP/1.1 204 No Content\r\n\r\n"]
    server, port, seen = await serve(tls[0], answers)
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", tls[1], resolver=None)
    assert (await endpoint.post(b"{}", {}, 5)).status == 204
    assert (await endpoint.post(b"{}", {}, 5)).status == 204  # the kept one was closed: a new one
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


async def test_an_answer_in_pieces_or_without_a_length_is_read_whole(tls):
    """The answer is parsed from what has arrived: one that comes a few bytes at a
    time is waited for; one whose body runs to the end of the connection is read to
    it, and the connection is not used again."""
    pieces = [b"HTTP/1.1 200 OK\r\nCont", b"ent-Length: 4\r\n", b"\r\nok", b"!!"]
    seen = {"connections": 0}

    async def slow(reader, writer):
        seen["connections"] += 1
        await read_request(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        await read_request(reader)  # the next request, answered without a length
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\n\r\nmade")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0, ssl=tls[0])
    port = server.sockets[0].getsockname()[1]
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", tls[1], resolver=None)
    assert (await endpoint.post(b"{}", {}, 5)).status == 200
    assert len(endpoint._idle) == 1  # kept: the body's four bytes ended the answer
    assert (await endpoint.post(b"{}", {}, 5)).status == 201
    assert endpoint._idle == []  # read to the end of the connection: not kept
    assert seen["connections"] == 1
    await endpoint.close()
    server.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", "too long"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", "too many header lines"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 9000, "head is too long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n", "body is too large"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "not a number"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not a number"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "cut off"),
    ],
)
async def test_an_answer_too_large_malformed_or_cut_off_is_an_error(tls, answer, error):
    async def then_close(reader, writer):  # the answer, then the end of the connection
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    server = await asyncio.start_server(then_close, "127.0.0.1", 0, ssl=tls[0])
    port = server.sockets[0].getsockname()[1]
    endpoint = Endpoint(f"https://127.0.0.1:{port}/", tls[1], resolver=None)
    with pytest.raises(HttpError, match=error):
        await endpoint.post(b"{}", {}, 5)
    assert endpoint._idle == []
    server.close()


def test_retry_after_is_read_in_seconds_or_as_a_date():
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=90)
    assert http._seconds("120") == 120.0
    assert 85 <= (http._seconds(format_datetime(later, usegmt=True)) or 0) <= 90
    assert http._seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: no wait
    assert http._seconds("soon") is None
    assert http._seconds("") is None
    assert http._seconds(None) is None
