"""A small authoritative DNS server on loopback for tests (UDP and TCP).

Records are added as text, the way a zone file writes them::

    dns.add("example.test", "MX", "10 mx1.example.test.")
    dns.add("mx1.example.test", "A", "127.0.0.2")
    dns.fail("broken.test")              # SERVFAIL for every question about it
    dns.secure("example.test")           # answers about it carry the AD bit
    dns.silence("dead.test")             # questions about it (and below) never answered
    dns.garble("junk.test")              # answered with bytes that are not DNS

A name with records of other types answers NOERROR with no data (NODATA); an unknown
name answers NXDOMAIN.  Answers longer than 512 octets over UDP are truncated (TC)
so that clients retry over TCP, as real servers make them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import defaultdict

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsFixture:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.records: dict[tuple[dns.name.Name, int], list[dns.rdata.Rdata]] = defaultdict(list)
        self.failing: set[dns.name.Name] = set()
        self.secure_names: set[dns.name.Name] = set()
        self.silent: set[dns.name.Name] = set()
        self.garbled: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None

    # -- zone data ------------------------------------------------------------------

    def add(self, name: str, rdtype: str, text: str) -> None:
        owner = dns.name.from_text(name)
        rt = dns.rdatatype.from_text(rdtype)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, rt, text, origin=dns.name.root, relativize=False
        )
        self.records[(owner, rt)].append(rdata)

    def fail(self, name: str) -> None:
        self.failing.add(dns.name.from_text(name))

    def silence(self, name: str) -> None:
        self.silent.add(dns.name.from_text(name))

    def garble(self, name: str) -> None:
        self.garbled.add(dns.name.from_text(name))

    def secure(self, name: str) -> None:
        self.secure_names.add(dns.name.from_text(name))

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # -- serving --------------------------------------------------------------------

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        query = dns.message.from_wire(wire)
        if any(query.question[0].name.is_subdomain(n) for n in self.silent):
            return None
        if any(query.question[0].name.is_subdomain(n) for n in self.garbled):
            # the query's id, then junk: a reply the client must refuse, not crash on
            return wire[:2] + b"\x81\x80\xff\xff" + bytes(range(40))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        if question.name in self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        found = self.records.get((question.name, question.rdtype))
        if found:
            rrset = dns.rrset.from_rdata_list(question.name, 300, found)
            response.answer.append(rrset)
        else:
            cname = self.records.get((question.name, dns.rdatatype.CNAME))
            if cname:
                response.answer.append(dns.rrset.from_rdata_list(question.name, 300, cname))
            elif not any(owner == question.name for owner, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        if question.name in self.secure_names:
            response.flags |= dns.flags.AD
        try:
            return response.to_wire(max_size=max_size or 65535)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    async def start(self) -> DnsFixture:
        loop = asyncio.get_running_loop()
        fixture = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                with contextlib.suppress(Exception):
                    out = fixture.answer(data, 512)
                    if out is not None:
                        self.transport.sendto(out, addr)  # type: ignore[attr-defined]

        for _ in range(20):  # UDP on a port the system picks, then TCP on the same one
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.host, 0))
            port = sock.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:  # taken for TCP: another port
                sock.close()
                continue
            self.port = port
            self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=sock)
            return self
        raise RuntimeError("no port free for both UDP and TCP")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                out = self.answer(await reader.readexactly(length), None)
                if out is None:
                    continue
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
