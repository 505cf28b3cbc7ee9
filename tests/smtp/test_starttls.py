"""STARTTLS with the generated certificate, TLS 1.2+ only, and TLS before MAIL."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import aiosmtplib
import pytest
from cryptography import x509

from tests.conftest import client_tls, make_message, queued, smtp_addr, smtp_client, swaks
from tests.support.closing import ClosingSMTP, socket_of


async def test_ehlo_advertises_the_extensions_relays_rely_on(gateway_factory):
    gw = await gateway_factory()
    async with smtp_client(gw, tls=False) as client:
        before = client.esmtp_extensions
        assert {
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "starttls",
            "pipelining",
        } <= set(before)
        assert before["size"] == str(50 * 1024**2)
        assert "auth" not in before  # never offered in clear text
        await client.starttls(tls_context=client_tls())
        await client.ehlo()
        assert "starttls" not in client.esmtp_extensions


async def test_starttls_presents_the_certificate_generated_on_first_start(gateway_factory):
    gw = await gateway_factory()
    generated = gw.config.state_dir / "tls" / "selfsigned.crt"
    assert generated.exists()
    assert (gw.config.state_dir / "tls" / "selfsigned.key").stat().st_mode & 0o077 == 0
    async with smtp_client(gw) as client:
        sslobj = client.transport.get_extra_info("ssl_object")
        assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        presented = x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True))
    assert presented == x509.load_pem_x509_certificate(generated.read_bytes())
    sans = presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.sealgate.test" in sans.get_values_for_type(x509.DNSName)


async def test_generated_certificate_is_reused_on_restart(gateway_factory):
    gw = await gateway_factory()
    first = (gw.config.state_dir / "tls" / "selfsigned.crt").read_bytes()
    await gw.stop()
    gw2 = await gateway_factory()
    assert gw2.config.state_dir == gw.config.state_dir
    assert (gw2.config.state_dir / "tls" / "selfsigned.crt").read_bytes() == first


async def test_mail_before_starttls_is_refused_with_530(gateway_factory):
    gw = await gateway_factory()
    async with smtp_client(gw, tls=False) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
            await client.mail("sender@clinic.test")
        assert e.value.code == 530
        assert e.value.message.startswith("5.7.0")
    assert gw.metrics.messages_rejected.labels("tls_required")._value.get() == 1
    assert queued(gw) == []


async def test_plaintext_mail_is_accepted_when_tls_is_not_required(gateway_factory):
    gw = await gateway_factory({"relay.require_tls": False})
    async with smtp_client(gw, tls=False) as client:
        errors, reply = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}
    assert len(queued(gw)) == 1


async def _openssl_starttls(host: str, port: int, *flags: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-starttls",
        "smtp",
        "-connect",
        f"{host}:{port}",
        *flags,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode(errors="replace")


async def test_tls_below_1_2_is_refused_and_1_2_is_accepted(gateway_factory):
    gw = await gateway_factory()
    host, port = smtp_addr(gw)
    old = await _openssl_starttls(host, port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert "CONNECTED" in old and "no protocols available" not in old  # the client tried
    assert "Cipher is (NONE)" in old or "no peer certificate available" in old
    ok = await _openssl_starttls(host, port, "-tls1_2")
    assert "Protocol  : TLSv1.2" in ok


async def test_tls_1_3_minimum_refuses_tls_1_2(gateway_factory):
    gw = await gateway_factory({"tls.min_version": "1.3"})
    ctx = client_tls()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with smtp_client(gw, tls=False) as client:
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError, OSError)):
            await client.starttls(tls_context=ctx)


async def test_configured_certificate_is_used_instead_of_a_generated_one(gateway_factory, pki):
    gw = await gateway_factory(
        {"tls.cert_file": str(pki.server_cert), "tls.key_file": str(pki.server_key)}
    )
    assert not (gw.config.state_dir / "tls" / "selfsigned.crt").exists()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))  # verifies name and chain
    async with smtp_client(gw, tls=False) as client:
        await client.starttls(tls_context=ctx, server_hostname="localhost")
        await client.ehlo()
        errors, _ = await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert errors == {}


async def test_swaks_delivers_over_starttls(gateway_factory):
    gw = await gateway_factory()
    code, text = await swaks(gw, "--tls", "--helo", "swaks.test")
    assert code == 0, text
    assert "250 2.0.0 Ok: queued as" in text
    (path,) = queued(gw)
    envelope, _ = gw.spool.read(path.name)
    assert envelope.client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert envelope.client.helo == "swaks.test"


async def test_internationalized_addresses_and_8bit_content_are_kept_exactly(gateway_factory):
    gw = await gateway_factory()
    message = "Subject: Befund\r\n\r\nGrüße, 患者\r\n".encode()
    async with smtp_client(gw) as client:
        await client.mail(
            "ärztin@klinik.test", options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8"
        )
        await client.rcpt("patiënt@例え.test", encoding="utf-8")
        await client.data(message)
    (path,) = queued(gw)
    envelope, data = gw.spool.read(path.name)
    assert envelope.mail_from == "ärztin@klinik.test"
    assert [r.address for r in envelope.recipients] == ["patiënt@例え.test"]
    assert set(envelope.mail_options) == {"SMTPUTF8", "BODY=8BITMIME"}
    assert data == message


async def test_every_reply_after_the_greeting_carries_an_enhanced_status_code(gateway_factory):
    from tests.conftest import RawSmtp

    gw = await gateway_factory({"relay.require_tls": False})
    s = await RawSmtp.open(gw)
    ehlo = await s.command("EHLO client.test")
    assert ehlo.splitlines()[0] == "250-gw.sealgate.test"  # EHLO lines stay as they are
    replies = {
        "NOOP": "250 2.0.0 OK",
        "RSET": "250 2.0.0 OK",
        "FROB": '500 5.5.2 Error: command "FROB" not recognized',
        "RCPT TO:<r@example.test>": "503 5.5.1 Error: need MAIL command",
        "MAIL FROM:<s@clinic.test> FOO=BAR": "555 5.5.4 MAIL FROM parameters not recognized",
        "MAIL FROM:<s@clinic.test>": "250 2.1.0 Sender OK",
        "MAIL FROM:<t@clinic.test>": "503 5.5.1 Error: nested MAIL command",
        "RCPT TO:<postmaster>": "553 5.1.3 Bad recipient address syntax",
        "DATA": "503 5.5.1 Need RCPT command",
        "QUIT": "221 2.0.0 Bye",
    }
    for command, expected in replies.items():
        assert (await s.command(command)).rstrip("\r\n").startswith(expected), command
    await s.close()


async def test_a_tls_session_closed_by_the_e2e_client_has_its_socket_closed(gateway_factory):
    # (the e2e tests' client: a TLS shutdown that outlived its test was collected in
    # the next one as an unclosed transport, failing it)
    gw = await gateway_factory()
    host, port = smtp_addr(gw)
    async with ClosingSMTP(
        hostname=host, port=port, start_tls=True, tls_context=client_tls(), timeout=10
    ) as client:
        assert (await client.noop()).code == 250
        sock = socket_of(client)
    assert sock is not None and sock.fileno() == -1
