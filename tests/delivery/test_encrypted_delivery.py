"""S/MIME and PGP/MIME through the daemon: a recipient whose servers cannot prove
themselves but whose certificate or key is in the key directory gets an encrypted
copy of their own, which OpenSSL or gpg decrypts to the original; when the key cannot
be used, the next mode."""

from __future__ import annotations

import asyncio
import email
import email.policy
import subprocess

import pytest

from gateway.crypto.smime import split
from gateway.probe.facts import KeyInfo, KnownKeys
from tests.conftest import leaf_files, make_message, run_sealgate
from tests.support.delivery import send, start, state
from tests.support.pgp_keys import gpg
from tests.support.smime_pki import ca, mailbox
from tests.support.world import wait_until

BOB = mailbox("bob@dest.test", n=5)
ORG = mailbox("noreply@clinic.test", n=6)


def sample(gw, name: str, **labels) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_each_recipient_gets_its_copy_tls_smime_pgp_and_portal(
    gateway_factory, world, pki, tmp_path, pgp_keys
):
    dest = await world.mta("mx.dest.test", "127.0.0.71", cert="self-signed")  # no proof
    good = await world.mta("mx.good.test", "127.0.0.72")  # verified TLS
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    org_cert, org_key = ORG.write(tmp_path, "org")
    gw = await start(
        gateway_factory,
        world,
        pki,
        **{
            "smime.signing_cert_file": str(org_cert),
            "smime.signing_key_file": str(org_key),
            "smime.subject": "Secure message from the clinic",
        },
    )
    bob_cert, bob_key = BOB.write(tmp_path, "bob")
    state_dir = str(gw.config.state_dir)
    imported = await asyncio.to_thread(
        run_sealgate, "keys", "import", str(bob_cert), "--state-dir", state_dir
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported ") and "bob@dest.test" in imported.stdout
    fingerprint = imported.stdout.split()[1]
    dave = pgp_keys["dave"]
    (tmp_path / "dave.gpg").write_bytes(dave.public)
    imported = await asyncio.to_thread(
        run_sealgate, "keys", "import", str(tmp_path / "dave.gpg"), "--state-dir", state_dir
    )
    assert imported.returncode == 0, imported.stderr

    rcpts = ["bob@dest.test", "carol@dest.test", "a@good.test", "dave@dest.test"]
    queue_id = await send(gw, rcpts)
    # bob's and dave's copies and carol's portal notification
    await wait_until(lambda: len(dest.received) == 3 and good.received, what="three copies")
    await wait_until(lambda: len(gw.queue.store.attempts(queue_id)) == 4, what="recorded")
    assert state(gw, queue_id) == {
        "bob@dest.test": ("delivered", "2.0.0"),
        "carol@dest.test": ("delivered", "2.0.0"),  # no key, no verified TLS: the portal
        "a@good.test": ("delivered", "2.0.0"),
        "dave@dest.test": ("delivered", "2.0.0"),
    }
    original = make_message("Biopsy result for J. Roe", "The margins are clear.\r\n")
    (plain_copy,) = good.received
    assert plain_copy.rcpt_tos == ["a@good.test"] and plain_copy.data.endswith(original)
    (note,) = [m for m in dest.received if m.rcpt_tos == ["carol@dest.test"]]
    assert b"Biopsy" not in note.data and b"margins" not in note.data  # a link, no content
    assert b"You have a secure message" in note.data
    sealed = next(m for m in dest.received if m.rcpt_tos == ["bob@dest.test"])  # its own copy
    outer = email.message_from_bytes(sealed.data, policy=email.policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer["subject"] == "Secure message from the clinic"
    assert b"Biopsy" not in sealed.data and b"margins" not in sealed.data
    decrypted = subprocess.run(
        ["openssl", "cms", "-decrypt", "-recip", str(bob_cert), "-inkey", str(bob_key), "-binary"],
        input=sealed.data,
        capture_output=True,
        timeout=30,
    )
    assert decrypted.returncode == 0, decrypted.stderr
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca().pem)
    verified = subprocess.run(
        ["openssl", "cms", "-verify", "-CAfile", str(ca_file)],
        input=decrypted.stdout,
        capture_output=True,
        timeout=30,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == split(original)[1]  # the original entity, byte for byte

    evidence = {
        gw.queue.store.recipients(queue_id)[a["recipient_index"]].address: a["evidence"]
        for a in gw.queue.store.attempts(queue_id)
    }
    enc = evidence["bob@dest.test"]["encryption"]
    assert (enc["mode"], enc["key_fingerprint"], enc["signed"]) == ("smime", fingerprint, True)
    assert evidence["bob@dest.test"]["decision"]["mode"] == "smime"
    assert "encryption" not in evidence["a@good.test"]
    assert sample(gw, "sealgate_messages_encrypted_total", mode="smime") == 1
    assert sample(gw, "sealgate_policy_decisions_total", mode="smime", rule="defaults") == 1
    shown = await asyncio.to_thread(
        run_sealgate, "queue", "show", queue_id, "--state-dir", state_dir
    )
    assert f"mode=smime key={fingerprint} sent-sha256={enc['sent_sha256']}" in shown.stdout

    # dave's copy: PGP/MIME that his own gpg decrypts to the original entity
    pgp_copy = next(m for m in dest.received if m.rcpt_tos == ["dave@dest.test"])
    outer = email.message_from_bytes(pgp_copy.data, policy=email.policy.default)
    assert outer.get_content_type() == "multipart/encrypted"
    assert b"Biopsy" not in pgp_copy.data.split(b"\r\n\r\n", 1)[1]
    armored = list(outer.iter_parts())[1].get_payload(decode=True)
    plain = gpg(dave.home, "--decrypt", data=armored)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == split(original)[1]
    enc = evidence["dave@dest.test"]["encryption"]
    assert (enc["mode"], enc["key_fingerprint"]) == ("pgp", dave.fingerprint.lower())
    assert sample(gw, "sealgate_messages_encrypted_total", mode="pgp") == 1
    assert sample(gw, "sealgate_keys", kind="smime", source="import") == 1
    assert sample(gw, "sealgate_keys", kind="pgp", source="import") == 1


class UnusableCertificate:
    """A key store whose certificate turns out unusable when the copy is made."""

    async def lookup(self, address: str) -> KnownKeys:
        return KnownKeys(smime=KeyInfo("smime", "ab" * 32, "import"))

    async def material(self, info: KeyInfo) -> bytes | None:
        return mailbox("bob@dest.test", expired=True, n=7).der


async def test_a_key_that_cannot_be_used_moves_the_recipient_on_never_to_plaintext(
    gateway_factory, world, pki
):
    dest = await world.mta("mx.dest.test", "127.0.0.71", cert="self-signed")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki, **{"portal.enabled": False})
    gw.delivery.prober.keys = UnusableCertificate()
    queue_id = await send(gw, ["bob@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("bob@dest.test", ("",))[0] == "held", what="held"
    )
    assert dest.received == []
    decision = gw.queue.store.decisions(queue_id)[0]
    assert decision["mode"] == "portal" and decision["excluded"] == ["smime"]
    (row,) = gw.queue.store.recipients(queue_id)
    assert "after: 4.7.10 S/MIME: key invalid: expired on" in row.diagnostic
    assert sample(gw, "sealgate_encryption_errors_total", mode="smime", reason="key_invalid") == 1
    assert sample(gw, "sealgate_policy_fallbacks_total", mode="portal") == 1


async def test_changed_copies_are_dkim_signed_unchanged_ones_stay_byte_identical(
    gateway_factory, world, pki, tmp_path
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.crypto.dkim import load_key
    from tests.conftest import smtp_client
    from tests.support.messages import verify

    dest = await world.mta("mx.dest.test", "127.0.0.71", cert="self-signed")
    good = await world.mta("mx.good.test", "127.0.0.72")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    gw = await start(
        gateway_factory,
        world,
        pki,
        **{"dkim.domain": "clinic.test", "dkim.selector": "sg", "dkim.key_file": str(key_file)},
    )
    state_dir = str(gw.config.state_dir)
    bob_cert, _ = BOB.write(tmp_path, "bob")
    assert (
        await asyncio.to_thread(
            run_sealgate, "keys", "import", str(bob_cert), "--state-dir", state_dir
        )
    ).returncode == 0
    original = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=clinic.test; s=m365; bh=x; b=y\r\n"
        + make_message("Results", "All clear.\r\n")
    )
    async with smtp_client(gw) as client:
        await client.sendmail("doctor@clinic.test", ["bob@dest.test", "a@good.test"], original)
    await wait_until(lambda: dest.received and good.received, what="both copies")
    key = load_key(key_file, "clinic.test", "sg")
    (sealed,) = dest.received
    assert b"s=m365" not in sealed.data  # the original signature would only fail
    assert (
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=clinic.test; s=sg;"
        in sealed.data
    )
    assert verify(sealed.data, key)
    (as_received,) = good.received
    assert as_received.data.endswith(original)  # byte-identical: the M365 signature stays
    assert b"s=sg;" not in as_received.data


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_key_found_by_wkd_is_used_only_where_the_policy_allows(
    gateway_factory, world, pki, tmp_path, pgp_keys, allowed
):
    from tests.conftest import free_port
    from tests.support.https import PolicyServer

    dest = await world.mta("mx.dest.test", "127.0.0.71", cert="self-signed")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    leaf = pki.ca.issue_cert("openpgpkey.dest.test")
    chain, key = leaf_files(leaf, tmp_path, "wkd")
    world.dns.add("openpgpkey.dest.test", "A", "127.0.0.86")
    port = free_port()
    wkd = await PolicyServer("127.0.0.86", port, (chain, key), body=pgp_keys["dave"].public).start()
    try:
        policy = f"version: 1\ndiscovered_keys: {'true' if allowed else 'false'}\n"
        gw = await gateway_factory(
            world.config({"delivery.retry_schedule": ["1h"], "wkd.port": port}, policy=policy)
        )
        queue_id = await send(gw, ["dave@dest.test"])
        await wait_until(lambda: gw.queue.store.attempts(queue_id), what="decided")
        decision = gw.queue.store.decisions(queue_id)[0]
        if allowed:
            assert decision["facts"]["keys"]["pgp"]["source"] == "wkd"
            await wait_until(lambda: dest.received, what="the PGP copy")
            armored = list(
                email.message_from_bytes(
                    dest.received[0].data, policy=email.policy.default
                ).iter_parts()
            )[1].get_payload(decode=True)
            assert gpg(pgp_keys["dave"].home, "--decrypt", data=armored).returncode == 0
            assert decision["mode"] == "pgp"
            assert wkd.requests == 1
        else:  # WKD is not even asked: the address is not shown to the domain for nothing
            assert decision["mode"] == "portal"  # at most a notification went there:
            assert all(b"Biopsy" not in m.data for m in dest.received)
            assert decision["facts"]["keys"]["pgp"] is None and wkd.requests == 0
    finally:
        await wkd.stop()
