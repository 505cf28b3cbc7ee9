"""SIGHUP for what operators renew and tighten while mail flows: a certificate
renewed on disk is presented by the next STARTTLS session (in every SMTP worker), by
the portal and by the API, without a restart; the relay binding and the API tokens
change with it; a certificate that does not match its key changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import ssl
import time
import urllib.request

import aiosmtplib
import pytest
import yaml

from tests.conftest import load_test_config, make_message, write_config
from tests.e2e.daemon import Daemon
from tests.support.world import wait_until


def issue(pki, root, name: str) -> tuple[bytes, bytes]:
    """A certificate for the gateway from the test CA: (chain PEM, key PEM)."""
    cert = pki.ca.issue_cert("gw.sealgate.test", "127.0.0.1")
    return cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()


def starttls_certificate(host: str, port: int) -> bytes:
    """The DER certificate an SMTP listener presents after STARTTLS (a new session)."""
    with socket.create_connection((host, port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="gw.sealgate.test") as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"QUIT\r\n")
            return der


def https_certificate(host: str, port: int) -> bytes:
    pem = ssl.get_server_certificate((host, port), timeout=10)
    return ssl.PEM_cert_to_DER_cert(pem)


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_renews_certificates_and_tightens_the_edges(tmp_path, pki, workers):
    cert_a, key_a = issue(pki, tmp_path, "a")
    cert_b, key_b = issue(pki, tmp_path, "b")
    cert_file, key_file = tmp_path / "gw.pem", tmp_path / "gw.key"
    cert_file.write_bytes(cert_a)
    key_file.write_bytes(key_a)
    path = write_config(
        tmp_path,
        {
            "smtp.workers": workers,
            "relay.networks": ["127.0.0.1/32"],
            "tls.cert_file": str(cert_file),
            "tls.key_file": str(key_file),
        },
    )
    daemon = Daemon(path, load_test_config(path), tmp_path / "daemon.log")
    await asyncio.to_thread(daemon.start)
    try:
        smtp, api, portal = daemon.smtp, daemon.api, daemon.portal
        assert api is not None and portal is not None
        for _ in range(4):
            assert await asyncio.to_thread(starttls_certificate, smtp.host, smtp.port) == der(
                cert_a
            )
        assert await asyncio.to_thread(https_certificate, api.host, api.port) == der(cert_a)

        # renewed on disk, the binding tightened, an API token added
        cert_file.write_bytes(cert_b)
        key_file.write_bytes(key_b)
        token = "t-renewed-0123456789"
        data = yaml.safe_load(path.read_text())
        data["relay"]["sender_domains"] = ["clinic.test"]
        data.setdefault("archive", {})["api_tokens"] = [
            {
                "name": "ops",
                "role": "auditor",
                "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            }
        ]
        path.write_text(yaml.safe_dump(data))
        daemon.proc.send_signal(signal.SIGHUP)

        async def every_session_presents_b() -> bool:
            seen = [
                await asyncio.to_thread(starttls_certificate, smtp.host, smtp.port)
                for _ in range(8)
            ]
            return all(d == der(cert_b) for d in seen)

        deadline = time.monotonic() + 15
        while not await every_session_presents_b():
            assert time.monotonic() < deadline, "a worker still presents the old certificate"
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(https_certificate, api.host, api.port) == der(cert_b)
        assert await asyncio.to_thread(https_certificate, portal.host, portal.port) == der(cert_b)
        # the binding, in whichever worker takes the session
        for _ in range(4):
            async with daemon.smtp_client() as client:
                try:
                    await client.mail("ceo@elsewhere.test")
                    raise AssertionError("a sender outside relay.sender_domains was accepted")
                except aiosmtplib.SMTPSenderRefused as e:
                    assert e.code == 550
                await client.rset()
                await client.sendmail("s@clinic.test", ["p@dest.test"], make_message())
        # the new token
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.check_hostname = False
        request = urllib.request.Request(
            f"https://{api.host}:{api.port}/archive/holds",
            headers={"Authorization": f"Bearer {token}"},
        )
        status = await asyncio.to_thread(
            lambda: urllib.request.urlopen(request, context=ctx).status
        )  # noqa: S310
        assert status == 200
        # the expiry the metrics show is the new certificate's
        with urllib.request.urlopen(f"http://{daemon.http}/metrics", timeout=5) as r:  # noqa: S310
            metrics = r.read().decode()
        from cryptography import x509
        from prometheus_client.parser import text_string_to_metric_families

        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        expiry = x509.load_pem_x509_certificate(cert_b).not_valid_after_utc.timestamp()
        for use in ("smtp", "api", "portal"):
            key = ("sealgate_certificate_expiry_timestamp_seconds", (("use", use),))
            assert samples[key] == expiry, use
        (build,) = [v for (name, _), v in samples.items() if name == "sealgate_build_info"]
        assert build == 1.0  # not one per worker

        # a key that does not match its certificate: reported, nothing changes
        key_file.write_bytes(key_a)
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "app.reload-failed" in daemon.log_path.read_text(), what="the failure"
        )
        for _ in range(4):
            assert await asyncio.to_thread(starttls_certificate, smtp.host, smtp.port) == der(
                cert_b
            )
        assert await asyncio.to_thread(https_certificate, api.host, api.port) == der(cert_b)
    finally:
        await asyncio.to_thread(daemon.terminate)
