"""Shared fixtures: a test PKI, free loopback ports, and an in-process gateway.

Everything runs on loopback.  The gateway is configured through a real YAML file
loaded by the real loader, so tests reach the code the way an admin does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
import yaml

from gateway.app import Gateway
from gateway.config import Config, load_config_text
from gateway.observability.logging import configure_logging

configure_logging("debug", cache_loggers=False)  # capture_logs needs it

# fixtures every test may use: the delivery world, the portal from a recipient's side,
# the console from a compliance officer's
pytest_plugins = [
    "tests.support.leaks",  # names where an unclosed transport was made
    "tests.support.world",
    "tests.support.portal",
    "tests.support.console",
    "tests.support.browser",
    "tests.support.postgres",
    "tests.support.stores",
    "tests.support.s3",
]


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, chosen outside the kernel's ephemeral range: a port
    the kernel might hand to an outgoing connection in the meantime (the tests make
    many) could be taken before the test binds it."""
    low, _high = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(max(1024, low - 12000), low - 1)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def leaf_files(leaf: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    """A leaf certificate as a server loads it: ``<stem>.pem`` (the key and the chain,
    leaf first) and ``<stem>.key``, in ``directory``."""
    chain, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    return chain, key


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_chain: Path  # cert + key, PEM, CN relay.client.test, SAN relay.client.test
    client_cert_der: bytes
    other_client_chain: Path  # same CA, CN other.client.test
    rogue_client_chain: Path  # a different CA: must not even complete the handshake
    root: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA(organization_name="Sealgate Test CA")
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("localhost", "127.0.0.1", "mx.test")
    server_cert, server_key = root / "server.pem", root / "server.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))

    def client(name: str, issuer: trustme.CA, filename: str) -> tuple[Path, bytes]:
        cert = issuer.issue_cert(name, common_name=name)
        path = root / filename
        path.write_bytes(cert.private_key_pem.bytes() + cert.cert_chain_pems[0].bytes())
        return path, ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    client_chain, client_der = client("relay.client.test", ca, "client.pem")
    other_chain, _ = client("other.client.test", ca, "other.pem")
    rogue_chain, _ = client("relay.client.test", trustme.CA(), "rogue.pem")
    return Pki(
        ca,
        ca_file,
        server_cert,
        server_key,
        client_chain,
        client_der,
        other_chain,
        rogue_chain,
        root,
    )


def write_config(directory: Path, overrides: dict[str, Any]) -> Path:
    """A config file with a private state_dir, plus ``overrides``.  The listeners take
    any free port (port 0: read back from the running gateway, `smtp_addr`,
    ``gw.http.address``, ``gw.api.address``, ``gw.portal.address``, ``gw.console.address``,
    or from the daemon's app.ready line)."""
    data: dict[str, Any] = {
        "state_dir": str(directory / "state"),
        "listen": {"smtp": "127.0.0.1:0", "http": "127.0.0.1:0"},
        "smtp": {"hostname": "gw.sealgate.test", "workers": 1},
        # Never the machine's resolver or the internet: accepted mail waits for a
        # next hop on loopback where nothing listens (tests of delivery override these).
        "dns": {"nameservers": [f"127.0.0.1:{free_port()}"]},
        "delivery": {"smart_host": f"127.0.0.1:{free_port()}", "connect_timeout": "2s"},
        "logging": {"addresses": "plain"},
        "portal": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "console": {"listen": "127.0.0.1:0"},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load_test_config(path: Path) -> Config:
    return load_config_text(path.read_text(), str(path))


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await gateway_factory({"relay.networks": [...]})`` starts a gateway on free
    loopback ports; every gateway started is stopped after the test."""
    gateways: list[Gateway] = []

    async def start(overrides: dict[str, Any] | None = None) -> Gateway:
        path = write_config(tmp_path, overrides or {})
        gw = Gateway(load_test_config(path), str(path))
        await gw.start()
        gateways.append(gw)
        return gw

    yield start
    for gw in gateways:
        await gw.stop(grace=1.0)


def client_tls(cert_chain: Path | None = None) -> ssl.SSLContext:
    """A client context that accepts the gateway's self-signed certificate (it loads
    no CAs: the system's took 30-40 ms of CPU per session, most of what the test
    process spent sending thousands of messages)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_chain is not None:
        ctx.load_cert_chain(str(cert_chain))
    return ctx


def smtp_addr(gw: Gateway) -> tuple[str, int]:
    return gw.smtp_address


@contextlib.asynccontextmanager
async def smtp_client(
    gw: Gateway,
    *,
    source: str = "127.0.0.1",
    tls: bool = True,
    cert_chain: Path | None = None,
    timeout: float = 10,
) -> AsyncIterator[aiosmtplib.SMTP]:
    host, port = smtp_addr(gw)
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        start_tls=False,
        use_tls=False,
        source_address=(source, 0),
        timeout=timeout,
        local_hostname="client.test",
        tls_context=client_tls(cert_chain),
    )
    await client.connect()
    await client.ehlo()
    if tls:
        await client.starttls(tls_context=client_tls(cert_chain))
        await client.ehlo()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.quit()
        client.close()


def make_message(subject: str = "Test", body: str = "Hello.\r\n", headers: str = "") -> bytes:
    return (
        f"From: sender@clinic.test\r\nTo: patient@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <m1@clinic.test>\r\n{headers}\r\n{body}"
    ).encode()


def queued(gw: Gateway) -> list[Path]:
    return sorted(gw.spool.queue_dir.iterdir())


class RawSmtp:
    """A byte-exact SMTP client for tests that must send what no library would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, gw: Gateway, source: str = "127.0.0.1") -> RawSmtp:
        host, port = smtp_addr(gw)
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        session = cls(reader, writer)
        try:
            greeting = await session.reply()
        except ConnectionError as e:
            greeting = str(e)
        if not greeting.startswith("220"):
            await session.close()
            raise AssertionError(f"no greeting: {greeting}")
        return session

    @classmethod
    async def start_data(
        cls, gw: Gateway, sender: str = "s@clinic.test", rcpt: str = "r@example.test"
    ) -> RawSmtp:
        """A session that has just been told 354: what it sends next is message data."""
        s = await cls.open(gw)
        reply = await s.command("EHLO client.test")
        assert reply.startswith("250"), f"EHLO: {reply}"
        await s.begin_data(sender, rcpt)
        return s

    async def begin_data(self, sender: str = "s@clinic.test", rcpt: str = "r@example.test") -> None:
        """MAIL, RCPT and DATA on this greeted session, each answered as it should be:
        what it sends next is message data."""
        for command, code in (
            (f"MAIL FROM:<{sender}>", "250"),
            (f"RCPT TO:<{rcpt}>", "250"),
            ("DATA", "354"),
        ):
            reply = await self.command(command)
            assert reply.startswith(code), f"{command}: {reply}"

    async def reply(self, timeout: float = 10) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    async def starttls(self, cert_chain: Path | None = None) -> None:
        """STARTTLS, then the TLS handshake on this connection (the reply must be 220)."""
        reply = await self.command("STARTTLS")
        assert reply.startswith("220"), reply
        await self.writer.start_tls(client_tls(cert_chain))

    async def command(self, line: str | bytes) -> str:
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def swaks(gw: Gateway, *args: str) -> tuple[int, str]:
    """Run the swaks command against the gateway; (exit status, transcript)."""
    host, port = smtp_addr(gw)
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"{host}:{port}",
        "--from",
        "s@clinic.test",
        "--to",
        "r@example.test",
        "--timeout",
        "10",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


def run_sealgate(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The sealgate command in a subprocess, as an admin would run it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
        cwd=cwd,
    )


@pytest.fixture(scope="session")
def pgp_keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """OpenPGP test keys (see tests/crypto/pgp_keys.py), made once per session."""
    from tests.support.pgp_keys import make_all

    return make_all(tmp_path_factory.mktemp("pgp"))


@pytest.fixture(scope="session", autouse=True)
def _stop_gpg_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """gpg starts an agent for a home with secret keys (the test keys', a signer's)
    and leaves it running: after the session, those under its temporary directory
    are stopped."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    listed = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        pid, *args = line.split()
        if args[:2] == ["gpg-agent", "--homedir"] and args[2].startswith(base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
