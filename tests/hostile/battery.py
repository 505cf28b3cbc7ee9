"""The hostile battery: seeded, bounded sessions against a running gateway, and the
check that follows them.  ``tests/hostile/test_battery.py`` runs a slice of it in the
suite; ``bench/hostile.py`` (``make hostile``) runs the whole of it and prints the
figures the README's "Robustness" section quotes.

Categories (each case is one SMTP session on loopback, a fresh random stream from the
seed):

- ``mutation``: a valid transaction whose command stream is mutated - lines dropped,
  repeated, swapped or truncated, bytes flipped or inserted (NUL, 0xFF, bare CR or
  LF, surrogate-making bytes), random verbs, the whole stream pipelined at once;
- ``address``: MAIL, RCPT and EHLO with hostile forms (8-bit, NUL, invalid and
  overlong UTF-8, C1 controls, quoted local parts, address literals, 1,000
  characters, IDNA that does not encode), with and without SMTPUTF8;
- ``mime``: well-formed sessions carrying hostile MIME (nesting 60 deep, 10,000
  parts, broken base64 and quoted-printable, header fields folded 2,000 times,
  missing boundaries, 8-bit bytes in headers, a subject tag in a Latin-1 Subject)
  through the policy and delivery;
- ``fault``: connections reset in the middle of DATA, STARTTLS with garbage,
  clients that stop mid-command, AUTH with non-ASCII or 70 KB answers;
- ``slow``: clients that send a transaction a byte at a time (tarpits from the
  client side), while a normal client's transaction time is measured;
- ``world``: mail for a server that answers 4xx for ever, one that takes seconds
  to answer, one that answers in bytes that are not UTF-8, and domains whose DNS
  is silent, fails or answers garbage: delivered, or retried and expired with a DSN;
- ``web``: hostile HTTPS to the portal, the archive API (api.listen) and the
  compliance console (console.listen): junk and huge tokens, cookies and paths, NUL
  and ``../`` in paths, forged forms and sign-ins, bad lengths, a 100 KB header,
  search fields and pages that are not what they should be, JSON of the wrong types,
  nested 5,000 deep, or not UTF-8 - any answer but a 5xx, and the listener still
  serves.

`check` then requires: the gateway still answers a normal transaction; every
message acknowledged with 250 is delivered, bounced (with a DSN when the sender
can take one) or still waiting with a reason - and in the archive; no recipient
is past ``delivery.max_queue_lifetime`` without a final state; no error-level log
event or traceback came from client input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.support.archive import archive_of
from tests.support.net import reset

CATEGORIES = ("mutation", "address", "mime", "fault", "slow", "world", "web")
# the "world" category's recipients: a server that answers 4xx for ever, one that
# takes seconds to answer, a domain whose DNS never answers, one whose DNS answers
# SERVFAIL, one whose DNS answers with bytes that are not DNS
WORLD_RECIPIENTS = [
    b"r@tempfail.test",
    b"r@tarpit.test",
    b"r@silent.test",
    b"r@servfail.test",
    b"r@junk.test",
    b"r@latin1.test",
]


async def hostile_world(dns: Any, mta: Any) -> None:
    """Add the "world" category's domains to a DNS fixture; ``mta(name, ip, **kw)``
    starts a recipient server."""
    await mta("mx.tempfail.test", "127.0.0.43", data_reply="451 4.3.0 Try again later")
    dns.add("tempfail.test", "MX", "10 mx.tempfail.test.")
    await mta("mx.tarpit.test", "127.0.0.44", data_delay=3.0)
    dns.add("tarpit.test", "MX", "10 mx.tarpit.test.")
    # replies in bytes that are not UTF-8 (an old server's Latin-1)
    await mta("mx.latin1.test", "127.0.0.48", data_reply=b"250 2.0.0 Ok: re\xe7u \xff")
    dns.add("latin1.test", "MX", "10 mx.latin1.test.")
    dns.silence("silent.test")
    dns.fail("servfail.test")
    dns.garble("junk.test")


HOSTILE_ADDRESSES = [
    b"r\xff\xfe@tls.test",
    b"r\x00z@tls.test",
    b"r\xc0\xaf@tls.test",
    b"r\xed\xa0\x80@tls.test",  # a UTF-16 surrogate written as UTF-8
    "r\u0085@tls.test".encode(),
    "dr.müller@tls.test".encode(),
    "δοκιμή@tls.test".encode(),
    b'"john doe"@tls.test',
    b'"a\\"b"@tls.test',
    b"r@[127.0.0.41]",
    b"r@tls..test",
    b"@tls.test",
    b"r@",
    b"r@" + b"a" * 1000 + b".test",
    b"x" * 1000 + b"@tls.test",
    "r@\u2603.test".encode(),
    b"r@tls.test\r\nRCPT TO:<s@tls.test>",
    b"r@tls.test",
]
HOSTILE_HELO = [b"a\xffb.test", b"a\x00b", "ä.test".encode(), b"x" * 300, b"", b"client.test"]


def message(size: int = 800) -> bytes:
    body = ("The margins are clear.\r\n" * (size // 24 + 1))[:size]
    return (
        "From: doctor@clinic.test\r\nTo: r@tls.test\r\nSubject: Battery\r\n"
        f"Message-ID: <{random.random()}@clinic.test>\r\n\r\n{body}\r\n"
    ).encode()


def mime_shape(rng: random.Random) -> bytes:
    kind = rng.choice(
        ["nested", "many", "base64", "qp", "folded", "noboundary", "8bit", "8bit-tagged"]
    )
    head = "From: doctor@clinic.test\r\nTo: r@tls.test\r\nSubject: Battery\r\nMIME-Version: 1.0\r\n"
    if kind == "nested":
        depth = 60
        opening = "".join(
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
            for i in range(depth)
        )
        closing = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
        return (head + opening + "Content-Type: text/plain\r\n\r\nx" + closing).encode()
    if kind == "many":
        parts = "".join("--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(10_000))
        return (
            head + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + "--b--\r\n"
        ).encode()
    if kind == "base64":
        return (head + "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                "JVBERi0xLj!!!not base64===\r\nQUJD\r\n").encode()  # fmt: skip
    if kind == "qp":
        return (head + "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable"
                "\r\n\r\n=ZZ=\r\n=0\r\n=C3=\r\n").encode()  # fmt: skip
    if kind == "folded":
        return (head + "X-Long: " + "a\r\n " * 2000 + "z\r\n\r\nbody\r\n").encode()
    if kind == "noboundary":
        return (head + "Content-Type: multipart/mixed\r\n\r\n--\r\nx\r\n").encode()
    if kind == "8bit-tagged":  # a subject tag (the default policy's) in a raw Latin-1 Subject
        return (
            b"From: doctor@clinic.test\r\nTo: r@tls.test\r\n"
            b"Subject: [secure] Befund f\xfcr Sie\r\n\r\nbody\r\n"
        )
    return head.encode() + b"X-Bytes: \xff\xfe\x80 caf\xc3\xa9\r\n\r\nbody \xff\r\n"


@dataclass(frozen=True)
class WebTargets:
    """Where the ``web`` category sends its requests."""

    portal: tuple[str, int]  # HTTPS
    api: tuple[str, int]  # the HTTPS API listener
    token: str  # an archive API bearer token (admin)
    console: tuple[str, int] | None = None  # the compliance console (HTTPS)


def _portal_request(rng: random.Random) -> bytes:
    junk = rng.choice(
        ["x", "%00", "..%2F..%2Fetc%2Fpasswd", "A" * 5000, "%ff%fe", "😀", "a/../../b", ""]
    )
    method, path, body, extra = "GET", f"/m/{junk}", b"", ""
    kind = rng.randrange(9)
    if kind == 1:
        method, path, body = "POST", f"/m/{junk}/code", b"csrf=forged"
    elif kind == 2:
        method, path = "POST", f"/m/{junk}/login"
        body = b"csrf=x&code=" + bytes(rng.randrange(256) for _ in range(40))
    elif kind == 3:
        path = f"/m/{junk}/part/99999999999999999999999"
    elif kind == 4:
        extra = "X-Big: " + "a" * 100_000 + "\r\n"
    elif kind == 5:
        method, path = "POST", f"/m/{junk}/reply"
        extra = "Content-Type: multipart/form-data; boundary=zz\r\n"
        body = b'--zz\r\nContent-Disposition: form-data; name="files"; filename="\r\n'
    elif kind == 6:
        method, path, body = "POST", f"/m/{junk}/login", b"x" * 10
        extra = "Content-Length: 99999999\r\n"
    elif kind == 7:
        path = "/static/../../../etc/passwd"
    elif kind == 8:
        method = rng.choice(["PROPFIND", "TRACE", "CONNECT", "G\x00T"])
    length = "" if "Content-Length" in extra else f"Content-Length: {len(body)}\r\n"
    head = f"{method} {path} HTTP/1.1\r\nHost: portal.test\r\n{extra}{length}"
    if method == "POST" and "Content-Type" not in extra:
        head += "Content-Type: application/x-www-form-urlencoded\r\n"
    return head.encode("utf-8", "surrogateescape") + b"Connection: close\r\n\r\n" + body


def _api_request(rng: random.Random, token: str) -> bytes:
    nested = "[" * 5000 + "]" * 5000
    method, path, body = rng.choice(
        [
            ("GET", "/archive/search?limit=-1", ""),
            ("GET", "/archive/search?limit=abc&since=yesterday", ""),
            ("GET", "/archive/search?sender=%ff%fe&bogus=1", ""),
            ("POST", "/archive/holds", '{"case":"c","queue_ids":"ABC"}'),
            ("POST", "/archive/holds", '{"case":{"x":1},"queue_ids":[1,2]}'),
            ("POST", "/archive/holds", '{"case":"c","query":{"sender":["x"],"since":5}}'),
            ("POST", "/archive/holds", nested),
            ("POST", "/archive/holds", "\udcff\udcfe not json"),
            ("POST", "/archive/purge", '{"confirm":"yes"}'),
            ("DELETE", "/archive/holds/%ff%fe%00", ""),
            ("GET", "/archive/messages/..%2F..%2Fetc%2Fpasswd", ""),
            ("GET", "/archive/messages/" + "B" * 3000, ""),
            ("GET", "/archive/export?case=%00", ""),
            ("GET", "/metrics?x=%ff", ""),
            ("HEAD", "/readyz", ""),
        ]
    )
    auth = rng.choice([f"Bearer {token}", f"Bearer {token}", "Bearer x", "Basic Zm9vOmJhcg=="])
    raw = body.encode("utf-8", "surrogateescape")
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: api.test\r\nAuthorization: {auth}\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + raw


def _console_request(rng: random.Random) -> bytes:
    junk = rng.choice(
        ["x", "%00", "..%2F..%2Fetc%2Fpasswd", "A" * 5000, "%ff%fe", "😀", "' OR 1=1 --", ""]
    )
    method, path, body = rng.choice(
        [
            ("GET", f"/messages/{junk}", b""),
            ("GET", f"/messages/{junk}/part/99999999999999999999", b""),
            ("GET", f"/search?sender={junk}&page=-1&since=2026-13-45&mode={junk}", b""),
            ("GET", f"/search.csv?until={junk}", b""),
            ("GET", f"/access?since={junk}&actor={junk}", b""),
            ("GET", f"/signin?next=//evil.test/{junk}", b""),
            ("GET", f"/oidc/{junk}", b""),
            ("GET", f"/oidc/callback?state={junk}&code={junk}", b""),
            ("POST", "/signin", b"csrf=forged&name=admin&password=x&code=000000"),
            ("POST", "/signin", b"name=" + b"\xff" * 3000 + b"&code=%00"),
            ("POST", "/holds", b"csrf=x&case=c&by_search=1"),
            ("POST", "/exports", b"csrf=x&selected=" + junk.encode("utf-8", "replace")),
            ("POST", "/signout", b"csrf=" + b"A" * 10_000),
            ("GET", "/static/../../../etc/passwd", b""),
        ]
    )
    cookie = rng.choice(
        ["", "__Host-sealgate-console=" + junk, "__Host-sealgate-console=" + "x" * 4000]
    )
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: console.test\r\nCookie: {cookie}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if method == "POST":
        head += "Content-Type: application/x-www-form-urlencoded\r\n"
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


async def _web_case(rng: random.Random, targets: WebTargets) -> str | None:
    """One hostile HTTP request; a problem when it was answered with a 5xx."""
    listeners = ["portal", "api"] + (["console"] if targets.console else [])
    name = rng.choice(listeners)
    portal = name == "portal"
    if name == "console":
        assert targets.console is not None
        (host, port), request = targets.console, _console_request(rng)
    else:
        host, port = targets.portal if portal else targets.api
        request = _portal_request(rng) if portal else _api_request(rng, targets.token)
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=_tls_context()), 5
        )
        writer.write(request)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    except (ConnectionError, TimeoutError, OSError, ssl.SSLError):
        return None  # refused or cut off: fine, if the listener still serves
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
    parts = status.split()
    if len(parts) >= 2 and parts[1][:1] == b"5" and parts[1] != b"503":
        what = request.split(b"\r\n", 1)[0][:80]
        return f"{name} answered {parts[1].decode()} to {what!r}"
    return None


@dataclass
class Outcome:
    category: str
    acknowledged: list[str] = field(default_factory=list)
    replies: int = 0
    error: str | None = None  # the client side failing is expected; recorded only


@dataclass
class Report:
    cases: Counter[str] = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)
    normal_latency: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.normal_latency)
        return {
            "cases": dict(self.cases),
            "total": sum(self.cases.values()),
            "acknowledged": len(self.acknowledged),
            **self.counts,
            "normal_client_ms_p50": round(statistics.median(lat) * 1000, 1) if lat else None,
            "normal_client_ms_max": round(lat[-1] * 1000, 1) if lat else None,
            "problems": self.problems,
        }


def _tls_context() -> ssl.SSLContext:  # verifies nothing: loads no CAs
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Session:
    """A byte-exact client that never trusts the server to answer."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.acknowledged: list[str] = []
        self.replies = 0

    async def open(self) -> str:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=2**20), self.timeout
        )
        return await self.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                break
        text = "".join(lines)
        self.replies += 1
        if text.startswith("250 2.0.0 Ok: queued as "):
            self.acknowledged.append(text.split()[-1])
        return text

    async def send(self, data: bytes, replies: int = 1) -> list[str]:
        self.writer.write(data)
        await self.writer.drain()
        return [await self.reply() for _ in range(replies)]

    async def starttls(self) -> None:
        (reply,) = await self.send(b"STARTTLS\r\n")
        if reply.startswith("220"):
            await asyncio.wait_for(self.writer.start_tls(_tls_context()), self.timeout)

    async def hello(self) -> None:
        await self.send(b"EHLO client.test\r\n")
        await self.starttls()
        await self.send(b"EHLO client.test\r\n")

    async def transaction(
        self, sender: bytes, rcpt: bytes, data: bytes, utf8: bool = False
    ) -> None:
        opt = b" SMTPUTF8" if utf8 else b""
        replies = await self.send(b"MAIL FROM:<" + sender + b">" + opt + b"\r\n")
        replies += await self.send(b"RCPT TO:<" + rcpt + b">\r\n")
        replies += await self.send(b"DATA\r\n")
        if replies[-1].startswith("354"):
            await self.send(data.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")

    async def close(self) -> None:
        if not hasattr(self, "writer"):
            return  # never connected
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


def _mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    lines = list(lines)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["drop", "repeat", "swap", "flip", "insert", "truncate", "verb", "crlf"])
        i = rng.randrange(len(lines))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "flip" and lines[i]:
            b = bytearray(lines[i])
            b[rng.randrange(len(b))] = rng.choice(
                [0, 0xFF, 0x80, 0xC0, 0x0D, 0x0A, rng.randrange(256)]
            )
            lines[i] = bytes(b)
        elif op == "insert":
            at = rng.randrange(len(lines[i]) + 1)
            junk = bytes(rng.choice([0, 0xFF, 0xED, 0xA0, 0x0D, 0x20, 0x3C]) for _ in range(3))
            lines[i] = lines[i][:at] + junk + lines[i][at:]
        elif op == "truncate":
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == "verb":
            lines.insert(
                i, rng.choice([b"VRFY r", b"EXPN x", b"HELP", b"XYZZY", b"BDAT 10", b"ETRN x"])
            )
        elif op == "crlf":
            lines[i] = lines[i] + rng.choice([b"\n", b"\r", b"\r\n\r\n"])
    return lines


async def run_case(category: str, rng: random.Random, host: str, port: int) -> Outcome:
    s = Session(host, port)
    outcome = Outcome(category)
    try:
        await s.open()
        if category == "mutation":
            await s.hello()
            lines = [b"MAIL FROM:<a@clinic.test>", b"RCPT TO:<r@tls.test>", b"DATA"]
            body = message(rng.randrange(100, 3000)) + b"\r\n."
            stream = b"\r\n".join(_mutate(rng, lines + body.split(b"\r\n"))) + b"\r\nQUIT\r\n"
            if rng.random() < 0.3:  # all of it at once (PIPELINING abused)
                s.writer.write(stream)
            else:
                for line in stream.split(b"\r\n"):
                    s.writer.write(line + b"\r\n")
                    await asyncio.sleep(0)
            await s.writer.drain()
            while True:
                await s.reply()
        elif category == "address":
            helo = rng.choice(HOSTILE_HELO)
            await s.send(b"EHLO " + helo + b"\r\n")
            await s.send(b"EHLO client.test\r\n")
            await s.starttls()
            await s.send(b"EHLO client.test\r\n")
            sender = rng.choice([b"a@clinic.test", *HOSTILE_ADDRESSES[:8]])
            await s.transaction(
                sender, rng.choice(HOSTILE_ADDRESSES), message(), rng.random() < 0.5
            )
        elif category == "world":
            await s.hello()
            await s.transaction(b"a@clinic.test", rng.choice(WORLD_RECIPIENTS), message())
        elif category == "mime":
            await s.hello()
            await s.transaction(b"a@clinic.test", b"r@tls.test", mime_shape(rng))
        elif category == "fault":
            await _fault(rng, s)
        elif category == "slow":
            await s.hello()
            data = b"MAIL FROM:<a@clinic.test>\r\nRCPT TO:<r@tls.test>\r\nDATA\r\n"
            for i in range(len(data)):
                s.writer.write(data[i : i + 1])
                await asyncio.sleep(0.002)
            for _ in range(3):
                await s.reply()
            for chunk in [message(300)[i : i + 7] for i in range(0, 300, 7)]:
                s.writer.write(chunk)
                await asyncio.sleep(0.005)
            await s.send(b"\r\n.\r\n")
        await s.send(b"QUIT\r\n")
    except (ConnectionError, TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
        outcome.error = type(e).__name__
    finally:
        await s.close()
    outcome.acknowledged, outcome.replies = s.acknowledged, s.replies
    return outcome


async def _fault(rng: random.Random, s: Session) -> None:
    kind = rng.choice(["reset-data", "tls-garbage", "stop-mid-command", "auth-8bit", "auth-long"])
    if kind == "tls-garbage":
        await s.send(b"EHLO client.test\r\n")
        await s.send(b"STARTTLS\r\n")
        s.writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        await s.writer.drain()
        await s.reply()
        return
    await s.hello()
    if kind == "reset-data":
        await s.send(b"MAIL FROM:<a@clinic.test>\r\n")
        await s.send(b"RCPT TO:<r@tls.test>\r\n")
        await s.send(b"DATA\r\n")
        s.writer.write(message(5000)[: rng.randrange(1, 5000)])
        await s.writer.drain()
        reset(s.writer)
        raise ConnectionError("reset by the battery")
    if kind == "stop-mid-command":
        s.writer.write(b"MAIL FROM:<a@cli")
        await s.writer.drain()
        reset(s.writer)
        raise ConnectionError("reset by the battery")
    if kind == "auth-8bit":
        await s.send("AUTH PLAIN dGVzdA==é\r\n".encode())
    else:
        await s.send(b"AUTH LOGIN\r\n")
        await s.send(b"A" * 70_000 + b"\r\n")


async def normal_transaction(host: str, port: int) -> float:
    """A well-behaved client's whole transaction; seconds."""
    started = time.perf_counter()
    s = Session(host, port, timeout=10)
    try:
        await s.open()
        await s.hello()
        await s.transaction(b"a@clinic.test", b"normal@tls.test", message())
        await s.send(b"QUIT\r\n")
    finally:
        await s.close()
    if not s.acknowledged:
        raise AssertionError("a normal transaction was not accepted")
    return time.perf_counter() - started


async def run(
    host: str,
    port: int,
    seed: int,
    per_category: dict[str, int],
    concurrency: int = 8,
    web: WebTargets | None = None,
) -> Report:
    """Every case of ``per_category``, ``concurrency`` at a time, with a normal client's
    transaction measured every half second meanwhile."""
    rng = random.Random(seed)
    plan = [c for c, n in per_category.items() for _ in range(n)]
    rng.shuffle(plan)
    report = Report()
    gate = asyncio.Semaphore(concurrency)
    done = asyncio.Event()

    async def one(category: str, case_seed: int) -> None:
        async with gate:
            if category == "web":
                assert web is not None, "the web category needs its targets"
                problem = await _web_case(random.Random(case_seed), web)
                if problem is not None:
                    report.problems.append(problem)
            else:
                outcome = await run_case(category, random.Random(case_seed), host, port)
                report.acknowledged += outcome.acknowledged
        report.cases[category] += 1

    async def measure() -> None:
        while not done.is_set():
            report.normal_latency.append(await normal_transaction(host, port))
            await asyncio.sleep(0.5)

    probe = asyncio.create_task(measure())
    await asyncio.gather(*(one(c, rng.randrange(2**32)) for c in plan))
    done.set()
    await probe
    return report


async def http_status(host: str, port: int, path: str, tls: bool = False) -> int | None:
    """The status of ``GET path``; None when there is no answer."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=_tls_context() if tls else None), 5
        )
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
    except (ConnectionError, TimeoutError, OSError, ssl.SSLError):
        return None
    parts = status.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def _http_ok(host: str, port: int, tls: bool) -> bool:
    """The listener answers (the portal answers /healthz 404): any status below 500."""
    status = await http_status(host, port, "/healthz", tls)
    return status is not None and status < 500


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def stdlib_errors():  # type: ignore[no-untyped-def]
    """Errors logged through the standard library meanwhile (asyncio's "exception
    was never retrieved", a library's traceback): none may come from client input."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


class Observed:
    """What `check` looks at: a gateway's listeners, state and log.  `InProcess`
    reads a `gateway.app.Gateway` running in this process; the bench reads a daemon
    through its files (`bench/hostile.py`)."""

    smtp: tuple[str, int]
    http: tuple[str, int]
    portal: tuple[str, int]
    lifetime: float

    def alive(self) -> bool:
        raise NotImplementedError

    def message(self, queue_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def recipients(self, queue_id: str) -> list[Any]:
        raise NotImplementedError

    def archived(self, queue_id: str) -> bool:
        raise NotImplementedError

    def errors(self) -> list[str]:
        """Error-level log events (their names)."""
        raise NotImplementedError

    def tracebacks(self) -> list[str]:
        raise NotImplementedError


class InProcess(Observed):
    def __init__(
        self, gw: Any, logs: list[dict[str, Any]], stdlib: list[logging.LogRecord]
    ) -> None:
        cfg = gw.config
        self.gw, self.logs, self.stdlib = gw, logs, stdlib
        self.smtp = gw.smtp_address
        self.http = gw.http.address
        self.portal = gw.portal.address
        self.lifetime = cfg.delivery.max_queue_lifetime
        self._stack = contextlib.ExitStack()
        self._archive: Any = None

    def alive(self) -> bool:
        return bool(self.gw.readiness() is None and not self.gw.queue._task.done())

    def message(self, queue_id: str) -> dict[str, Any] | None:
        return self.gw.queue.store.message(queue_id)  # type: ignore[no-any-return]

    def recipients(self, queue_id: str) -> list[Any]:
        return self.gw.queue.store.recipients(queue_id)  # type: ignore[no-any-return]

    def archived(self, queue_id: str) -> bool:
        if self._archive is None:  # a connection of its own, as the CLI reads it
            self._archive = self._stack.enter_context(archive_of(self.gw))
        return bool(self._archive.has(queue_id))

    def close(self) -> None:
        self._stack.close()

    def errors(self) -> list[str]:
        return [
            f"{e.get('event')} {e.get('error_type', '')}"
            for e in self.logs
            if e.get("log_level") in ("error", "critical")
        ]

    def tracebacks(self) -> list[str]:
        found = [str(e.get("event")) for e in self.logs if "exc_info" in e or "exception" in e]
        return found + [f"{r.name}: {r.getMessage()[:200]}" for r in self.stdlib]


async def check(seen: Observed, report: Report, timeout: float) -> None:
    """After the cases: the gateway runs; every acknowledged message is final, or
    waiting with a reason; archived; reported to its sender when it bounced; no
    error or traceback in the log.  Fills ``report.counts`` and ``report.problems``."""
    up = seen.alive()
    for name, target, tls in (("ops listener", seen.http, False), ("portal", seen.portal, True)):
        if not await _http_ok(*target, tls):
            up = False
            report.problems.append(f"the {name} does not answer after the battery")
    try:
        report.normal_latency.append(await normal_transaction(*seen.smtp))
    except Exception as e:  # noqa: BLE001 - that is the finding
        up = False
        report.problems.append(f"a normal transaction failed after the battery: {e!r}")
    deadline = time.monotonic() + timeout
    ids = list(dict.fromkeys(report.acknowledged))

    def unfinished() -> list[str]:
        return [q for q in ids if not (seen.message(q) or {}).get("done")]

    while unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    lost = unarchived = waiting = stuck = no_dsn = 0
    for q in ids:
        message = seen.message(q)
        if message is None:
            lost += 1
            report.problems.append(f"{q}: acknowledged, unknown to the queue")
            continue
        rows = seen.recipients(q)
        if not message["done"]:
            if all(r.diagnostic or r.state == "pending" for r in rows):
                waiting += 1
            else:
                lost += 1
                report.problems.append(f"{q}: not final and no reason")
            if time.time() - message["arrived"] > seen.lifetime:
                stuck += 1
                report.problems.append(f"{q}: past max_queue_lifetime, not final")
        elif (
            any(r.state != "delivered" for r in rows)
            and message["mail_from"]
            and not message["dsn_sent"]
            and "\\x" not in message["mail_from"]  # a quarantined bad sender: no DSN
        ):
            no_dsn += 1
            report.problems.append(f"{q}: bounced without a DSN")
    # the archive writes on its own thread: wait for it, then look
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(not seen.archived(q) for q in ids):
        await asyncio.sleep(0.2)
    for q in ids:
        if not seen.archived(q):
            unarchived += 1
            report.problems.append(f"{q}: not in the archive")
    errors, tracebacks = seen.errors(), seen.tracebacks()
    report.problems += [f"error logged: {e}" for e in errors[:20]]
    report.problems += [f"traceback: {t}" for t in tracebacks[:10]]
    report.counts = {
        "crashes": 0 if up else 1,
        "lost": lost,
        "unarchived": unarchived,
        "waiting_with_reason": waiting,
        "stuck_past_lifetime": stuck,
        "bounced_without_dsn": no_dsn,
        "delivered_or_bounced": len(ids) - waiting - lost,
        "errors_logged": len(errors),
        "tracebacks": len(tracebacks),
    }
