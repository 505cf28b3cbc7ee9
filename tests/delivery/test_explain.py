"""``sealgate explain`` end to end: the command probes the servers of the DNS fixture
and the recipient MTAs on loopback, runs the policy and says why."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from tests.conftest import run_sealgate, write_config
from tests.support.delivery import publish, spki_sha256
from tests.support.documents import PDF_TYPE, encrypted_pdf, pdf, with_attachment

POLICIES = Path(__file__).parents[2] / "policies"


async def sealgate(*args: str):
    # in a thread: the DNS fixture and the MTAs answer from this test's event loop
    return await asyncio.to_thread(run_sealgate, *args)


async def three_domains(world):
    good = await world.mta("mx.good.test", "127.0.0.91")
    await world.mta("mx.plain.test", "127.0.0.92", cert=None)
    dane = await world.mta("mx.dane.test", "127.0.0.93", cert="self-signed")
    for domain in ("good.test", "plain.test", "dane.test"):
        world.dns.add(domain, "MX", f"10 mx.{domain}.")
    world.dns.secure("dane.test")
    publish(world, "mx.dane.test", f"3 1 1 {spki_sha256(dane.cert_der)}")
    return good


async def test_explain_three_recipients_of_one_message(world, tmp_path):
    good = await three_domains(world)
    path = write_config(tmp_path, world.config({"dns.dnssec": "trust-ad"}))
    message = tmp_path / "m.eml"
    message.write_bytes(b"From: dr@clinic.test\r\nSubject: [secure] Results\r\n\r\nHello\r\n")
    args = ["--config", str(path), "--from", "dr@clinic.test"]
    rcpts = ["--to", "a@good.test", "--to", "b@plain.test", "--to", "c@dane.test"]
    out = await sealgate("explain", *args, *rcpts)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    blocks = text.split("\nrecipient  ")
    assert blocks[0].startswith("policy     ") and "default.yaml@" in blocks[0]
    a, b, c = blocks[1:]
    assert a.startswith("a@good.test")
    assert "server     mx.good.test[127.0.0.91]:" in a and "certificate valid (PKIX)" in a
    assert "-> reaches verify" in a
    assert "rule       secure-tag: no match" in a
    assert (
        "decision   TLS at TLS level verify (defaults); fallback portal; decided by defaults" in a
    )
    assert "no STARTTLS; DANE n/a -> reaches may" in b
    assert "decision   PORTAL at TLS level may (opportunistic)" in b
    assert "  why      tls: level verify (defaults) not reached by any server (best: may)" in b
    assert "  why      smime: no S/MIME certificate known" in b
    assert "certificate not from a trusted CA" in c and "DANE usable, matches -> reaches dane" in c
    assert "route      dane.test via mx (DNSSEC-signed)" in c
    assert "decision   TLS at TLS level dane (dane)" in c
    assert good.received == []  # nothing is ever sent

    # with the message: the subject tag makes the secure-tag rule match for everyone
    out = await sealgate("explain", *args, *rcpts, "--message", str(message), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["message"]["subject_tags"] == ["[secure]"]
    modes = [
        (r["recipient"], r["decision"]["mode"], r["decision"]["rule"]) for r in report["recipients"]
    ]
    assert modes == [
        ("a@good.test", "portal", "secure-tag"),
        ("b@plain.test", "portal", "secure-tag"),
        ("c@dane.test", "portal", "secure-tag"),
    ]
    rules = report["recipients"][0]["rules"]
    assert [(r["name"], r["matched"]) for r in rules] == [
        ("secure-tag", True),
        ("sensitivity", False),
    ]
    assert rules[1]["conditions"] == ["no  header sensitivity: absent"]
    assert report["recipients"][2]["facts"]["mx"][0]["dane_match"] is True
    assert (
        report["recipients"][0]["facts"]["mx"][0]["cert_sha256"]
        == hashlib.sha256(good.cert_der).hexdigest()
    )


async def test_explain_with_the_partner_allow_list_and_phi(world, tmp_path):
    await world.mta("mx.lab.partner.example", "127.0.0.94")
    world.dns.add("lab.partner.example", "MX", "10 mx.lab.partner.example.")
    await world.mta("mx.good.test", "127.0.0.91")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    policy = POLICIES / "examples" / "partner-allow-list.yaml"
    path = write_config(tmp_path, world.config({"policy.file": str(policy)}))
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: Chart\r\n\r\nPatient SSN 123-45-6789, DOB: 03/14/1958\r\n")
    out = await sealgate(
        "explain",
        "--config",
        str(path),
        "--from",
        "dr@clinic.test",
        "--to",
        "x@lab.partner.example",
        "--to",
        "y@good.test",
        "--message",
        str(message),
    )
    assert out.returncode == 0, out.stderr
    partner, other = out.stdout.split("\nrecipient  ")[1:]
    assert "content    phi: 2 match(es), threshold 1 -> matches" in out.stdout
    assert "rule       partners: MATCHED, stop" in partner
    assert "rule       phi-content: skipped (an earlier rule stopped)" in partner
    assert "decision   TLS at TLS level verify (rule partners)" in partner
    assert "rule       partners: no match" in other
    assert "rule       phi-content: MATCHED" in other
    assert "decision   PORTAL" in other and "decided by phi-content" in other


async def test_explain_reports_a_bad_policy_with_file_and_line(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: a\n    when: {recipient_domian: x.test}\n    then: {minimum: tls}\n"
    )
    path = write_config(tmp_path, {"policy.file": str(policy)})
    out = await sealgate("explain", "--config", str(path), "--from", "a@b.test", "--to", "c@d.test")
    assert out.returncode == 78
    assert (
        f"{policy}:4: rules[a].when.recipient_domian: unknown key (did you mean 'recipient_domain'?)"
        in out.stderr
    )
    out = await sealgate("check-config", "--config", str(path))
    assert out.returncode == 78 and f"{policy}:4:" in out.stderr


async def test_explain_uses_the_key_directory(world, tmp_path):
    from tests.support.smime_pki import mailbox

    await world.mta("mx.plain.test", "127.0.0.92", cert=None)
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    path = write_config(tmp_path, world.config())
    cert = tmp_path / "b.pem"
    cert.write_bytes(mailbox("b@plain.test", n=30).pem)
    state = str(tmp_path / "state")
    assert (await sealgate("keys", "import", str(cert), "--state-dir", state)).returncode == 0
    out = await sealgate(
        "explain", "--config", str(path), "--from", "a@clinic.test", "--to", "b@plain.test"
    )
    assert out.returncode == 0, out.stderr
    assert "decision   SMIME" in out.stdout and "keys       S/MIME " in out.stdout


async def test_explain_reads_an_attached_pdf_and_a_locked_one_counts_as_phi(world, tmp_path):
    """Issue 18: the hipaa-strict example's classifiers find the SSN in a PDF; a PDF
    locked with a password cannot be read and so counts as PHI (unreadable:
    sensitive) - both go end to end or via the portal; a clean PDF goes by TLS."""
    await world.mta("mx.good.test", "127.0.0.91")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    world.dns.add("_mta-sts.good.test", "TXT", "v=STSv1; id=1")
    policy = POLICIES / "examples" / "hipaa-strict.yaml"
    path = write_config(tmp_path, world.config({"policy.file": str(policy)}))
    letter = pdf([["Lab results"], ["Patient SSN 123-45-6789"]])
    messages = {
        "ssn": with_attachment(letter, PDF_TYPE),
        "locked": with_attachment(encrypted_pdf(pdf([["Hello"]]), "s3cret"), PDF_TYPE),
        "clean": with_attachment(pdf([["Reminder: Tuesday 10:00"]]), PDF_TYPE),
    }
    seen = {}
    for name, data in messages.items():
        (tmp_path / f"{name}.eml").write_bytes(data)
        out = await sealgate(
            "explain", "--config", str(path), "--from", "dr@clinic.test",
            "--to", "y@good.test", "--message", str(tmp_path / f"{name}.eml"),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        seen[name] = out.stdout
    assert "content    phi: 1 match(es), threshold 1 -> matches" in seen["ssn"]
    assert "rule       phi-content: MATCHED" in seen["ssn"]
    assert (
        "content    phi: 0 match(es), threshold 1 -> matches, error: ValueError: part 2 "
        "unreadable: PDF encrypted with a password (counts as matching)"
    ) in seen["locked"]
    assert "rule       phi-content: MATCHED" in seen["locked"]
    assert "content    phi: 0 match(es), threshold 1 -> no match" in seen["clean"]
    assert "rule       phi-content: no match" in seen["clean"]
