"""Interoperability: Sealgate delivers at `verify` to a real Postfix (Debian package).

The recipient's MX is a private Postfix on 127.0.0.61 with a certificate from the test
CA; it relays what it receives to a recording aiosmtpd sink, so the test can see that
the message arrived whole and over TLS (Postfix's own Received header says ESMTPS).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from postfix_anchor import postfix_instance  # noqa: E402


async def test_delivery_at_verify_to_a_real_postfix(gateway_factory, world, pki, request):
    assert os.geteuid() == 0, "Postfix is started as root, as `make test` runs"
    sink = await world.mta("sink.internal.test", "127.0.0.62", cert=None)
    leaf = pki.ca.issue_cert("mx.postfix.test")
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-postfix-"))
    request.addfinalizer(lambda: shutil.rmtree(workdir, ignore_errors=True))
    chain, key = workdir / "cert.pem", workdir / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    world.dns.add("postfix.test", "MX", "10 mx.postfix.test.")
    world.dns.add("mx.postfix.test", "A", "127.0.0.61")
    # inet_interfaces = all: Postfix wants its listen addresses on an interface and lo
    # carries only 127.0.0.1/8; master.cf still binds 127.0.0.61 alone.
    tls = (
        "inet_interfaces = all\n"
        f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {chain}\n"
        f"smtpd_tls_key_file = {key}\nrelay_domains = postfix.test\n"
        "smtpd_relay_restrictions = permit_mynetworks, permit_auth_destination, reject\n"
    )
    with postfix_instance(
        workdir,
        world.port,
        listen_host="127.0.0.61",
        port=world.port,
        sink_host="127.0.0.62",
        extra_main_cf=tls,
    ):
        gw = await gateway_factory(world.config())
        async with smtp_client(gw) as client:
            _, reply = await client.sendmail(
                "s@clinic.test", ["patient@postfix.test"], make_message()
            )
        await wait_until(lambda: sink.received, timeout=30, what="relay through Postfix")
    queue_id = reply.rsplit(" ", 1)[1]
    (got,) = sink.received
    assert got.rcpt_tos == ["patient@postfix.test"]
    head, body = got.data.split(b"\r\n\r\n", 1)
    assert body == b"Hello.\r\n"
    text = head.decode()
    # Postfix's Received first (its link from Sealgate was encrypted), then ours.
    assert text.startswith("Received: from gw.sealgate.test")
    assert "(Postfix) with ESMTPS id" in text.split("Received:", 2)[1]
    assert "by gw.sealgate.test (Sealgate)" in text.split("Received:", 2)[2]
    assert "Message-ID: <m1@clinic.test>" in text and "Subject: Test" in text
    (attempt,) = gw.queue.store.attempts(queue_id)
    evidence = attempt["evidence"]
    assert attempt["outcome"] == "delivered"
    assert (evidence["mx_host"], evidence["ip"]) == ("mx.postfix.test", "127.0.0.61")
    assert evidence["verification"] == "pkix" and evidence["tls_version"] in ("TLSv1.2", "TLSv1.3")
