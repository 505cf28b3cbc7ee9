"""S/MIME copies, checked with OpenSSL: `openssl cms -decrypt` with the recipient's
private key gives back the original MIME entity byte for byte, for every structure a
clinic sends; a signature made before encryption verifies."""

from __future__ import annotations

import email
import email.policy
import subprocess

import pytest

from gateway.crypto.smime import encrypt, split
from tests.support.messages import MESSAGES, nested_with_attachments, plain, utf8_everywhere
from tests.support.smime_pki import ca, mailbox

BOB = mailbox("bob@dest.test", n=3)
ORG = mailbox("noreply@clinic.test", n=4)


def openssl(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "cms", *args], input=data, capture_output=True, timeout=30)


@pytest.mark.parametrize("name", MESSAGES)
def test_openssl_decrypts_the_original_entity_byte_for_byte(tmp_path, name):
    original = MESSAGES[name]()
    cert, key = BOB.write(tmp_path, "bob")
    sealed = encrypt(original, BOB.cert)
    assert b"\n" not in sealed.replace(b"\r\n", b"")  # CRLF only
    outer, entity = split(original)
    head = sealed.split(b"\r\n\r\n", 1)[0]
    for field in outer:
        assert field in head + b"\r\n"  # From, To, Subject, Date, Message-ID kept as they were
    assert b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data" in head
    assert entity not in sealed
    out = openssl("-decrypt", "-recip", str(cert), "-inkey", str(key), "-binary", data=sealed)
    assert out.returncode == 0, out.stderr
    assert out.stdout == entity
    # outer fields + the decrypted entity: every field of the original, the body as it was
    again = email.message_from_bytes(b"".join(outer) + out.stdout, policy=email.policy.compat32)
    before = email.message_from_bytes(original, policy=email.policy.compat32)
    assert set(before.items()) - {("MIME-Version", "1.0")} <= set(again.items())
    assert out.stdout.split(b"\r\n\r\n", 1)[1] == original.split(b"\r\n\r\n", 1)[1]


def test_aes_256_is_the_content_cipher(tmp_path):
    sealed = encrypt(plain(), BOB.cert)
    der = subprocess.run(
        ["openssl", "smime", "-pk7out"], input=sealed, capture_output=True, timeout=30
    ).stdout
    info = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "PEM"],
        input=der,
        capture_output=True,
        timeout=30,
    ).stdout.decode()
    assert "aes-256-cbc" in info


def test_signed_before_encryption_and_the_signature_verifies(tmp_path):
    original = nested_with_attachments()
    cert, key = BOB.write(tmp_path, "bob")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca().pem)
    sealed = encrypt(original, BOB.cert, signer=(ORG.cert, ORG.key))
    inner = openssl("-decrypt", "-recip", str(cert), "-inkey", str(key), "-binary", data=sealed)
    assert inner.returncode == 0, inner.stderr
    assert (
        inner.stdout.startswith(b"MIME-Version: 1.0") or b"multipart/signed" in inner.stdout[:300]
    )
    assert b'micalg="sha-256"' in inner.stdout
    # multipart/signed is verified over its canonical (CRLF) form, as mail clients do
    verified = openssl("-verify", "-CAfile", str(ca_file), data=inner.stdout)
    assert verified.returncode == 0, verified.stderr
    assert b"Verification successful" in verified.stderr
    assert verified.stdout == split(original)[1]


def test_a_neutral_subject_replaces_the_outer_one():
    sealed = encrypt(utf8_everywhere(), BOB.cert, subject="Secure message from Clinic – ouvrir")
    msg = email.message_from_bytes(sealed, policy=email.policy.default)
    assert msg["subject"] == "Secure message from Clinic – ouvrir"
    assert "Zoë" not in sealed.decode("ascii")
