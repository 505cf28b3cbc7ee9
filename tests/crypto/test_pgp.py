"""PGP/MIME copies, checked with gpg: the recipient's own gpg decrypts the original
entity byte for byte; keys that cannot be used are refused at import; a missing gpg
is an error, never the original."""

from __future__ import annotations

import email
import email.policy

import pytest

from gateway.crypto.keydir import KeyDirectory
from gateway.crypto.mime import split
from gateway.crypto.pgp import PgpEncryptor, PgpError
from tests.support.messages import MESSAGES
from tests.support.pgp_keys import gpg


@pytest.fixture
def encryptor(tmp_path):
    return PgpEncryptor(tmp_path / "pgp")


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("who", ["dave", "erin"])  # RSA-2048 and Curve25519
@pytest.mark.parametrize("path", ["in-process", "gpg for large copies"])
def test_gpg_decrypts_the_original_entity_byte_for_byte(pgp_keys, encryptor, name, who, path):
    if path != "in-process":
        encryptor.LARGE = 0  # every copy counts as large: the gpg subprocess
    key = pgp_keys[who]
    original = MESSAGES[name]()
    sealed = encryptor.encrypt(original, key.fingerprint, key.public)
    assert b"\n" not in sealed.replace(b"\r\n", b"")
    outer, entity = split(original)
    msg = email.message_from_bytes(sealed, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, payload = msg.iter_parts()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_content().strip() == b"Version: 1"
    assert payload.get_content_type() == "application/octet-stream"
    armored = payload.get_payload(decode=True)
    assert armored.startswith(b"-----BEGIN PGP MESSAGE-----")
    for field in outer:
        assert field in sealed
    out = gpg(key.home, "--decrypt", data=armored)
    assert out.returncode == 0, out.stderr
    assert out.stdout == entity


def test_the_key_directory_takes_good_keys_and_says_why_it_refuses_the_others(pgp_keys, tmp_path):
    d = KeyDirectory(tmp_path / "keydir.db")
    (dave,) = d.import_any(pgp_keys["dave"].public).imported
    assert (dave.kind, dave.fingerprint, dave.addresses) == (
        "pgp",
        pgp_keys["dave"].fingerprint.lower(),
        ("dave@dest.test",),
    )
    assert d.material(dave.fingerprint) == pgp_keys["dave"].public
    for name, reason in (
        ("expired", ": expired"),
        ("revoked", ": revoked"),
        ("signonly", ": no valid encryption key"),
        ("weak", "RSA of 1024 bits: RSA of 2048 bits or more, or ECDH, is needed"),
    ):
        with pytest.raises(ValueError, match="no usable key") as err:
            d.import_any(pgp_keys[name].public)
        assert reason in str(err.value), name
    with pytest.raises(ValueError, match="no user id someone@else.test"):
        d.import_any(pgp_keys["erin"].public, address="someone@else.test")
    armored = gpg(pgp_keys["erin"].home, "--armor", "--export", pgp_keys["erin"].fingerprint).stdout
    (erin,) = d.import_any(armored).imported
    assert erin.addresses == ("erin@dest.test",)
    d.close()


def test_no_gpg_binary_is_an_error_where_gpg_is_needed(pgp_keys, tmp_path, monkeypatch):
    from gateway.crypto.pgp import PgpSigner

    monkeypatch.setenv("PATH", "/nonexistent")
    d = KeyDirectory(tmp_path / "keydir.db")
    with pytest.raises(ValueError, match="gpg cannot run"):
        d.import_any(pgp_keys["dave"].public)  # keys are checked by gpg
    d.close()
    key_file = tmp_path / "org.asc"
    key_file.write_bytes(b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n")
    with pytest.raises(PgpError, match="gpg cannot run"):
        PgpSigner(tmp_path / "signing", key_file)


def test_a_key_that_cannot_be_used_is_an_error_not_plaintext(pgp_keys, encryptor):
    message = MESSAGES["plain text, no MIME fields"]()
    with pytest.raises(PgpError, match="cannot be read"):
        encryptor.encrypt(message, "00" * 20, b"not a key")
    signonly = pgp_keys["signonly"]  # gpg refuses it at import; here it comes anyway
    with pytest.raises(PgpError, match="not encrypted"):
        encryptor.encrypt(message, signonly.fingerprint, signonly.public)
    dave = pgp_keys["dave"]
    with pytest.raises(PgpError, match="is not"):
        encryptor.encrypt(message, "AB" * 20, dave.public)


def test_signed_then_encrypted_and_the_signature_verifies(pgp_keys, encryptor, tmp_path):
    from gateway.crypto.pgp import PgpSigner

    org, rcpt = pgp_keys["dave"], pgp_keys["erin"]
    key_file = tmp_path / "org.asc"
    key_file.write_bytes(gpg(org.home, "--armor", "--export-secret-keys", org.fingerprint).stdout)
    signer = PgpSigner(tmp_path / "signing", key_file)
    original = MESSAGES["nested multipart with attachments"]()
    sealed = encryptor.encrypt(original, rcpt.fingerprint, rcpt.public, signer)
    armored = list(email.message_from_bytes(sealed, policy=email.policy.default).iter_parts())[1]
    inner = gpg(rcpt.home, "--decrypt", data=armored.get_payload(decode=True))
    assert inner.returncode == 0, inner.stderr
    signed = email.message_from_bytes(inner.stdout, policy=email.policy.compat32)
    assert signed.get_content_type() == "multipart/signed"
    assert signed.get_param("micalg") == "pgp-sha256"
    boundary = signed.get_boundary().encode()
    # the first part: between the first delimiter and the CRLF that starts the next one
    after = inner.stdout.split(b"--" + boundary + b"\r\n", 1)[1]
    first = after.split(b"\r\n--" + boundary + b"\r\n", 1)[0]
    assert first == split(original)[1]  # the original entity, as signed
    signature = signed.get_payload()[1].get_payload().encode()
    (tmp_path / "data").write_bytes(first)
    (tmp_path / "data.asc").write_bytes(signature)
    checker = tmp_path / "checker"
    checker.mkdir(mode=0o700)
    gpg(checker, "--import", data=org.public)
    verified = gpg(checker, "--verify", str(tmp_path / "data.asc"), str(tmp_path / "data"))
    assert verified.returncode == 0, verified.stderr
    assert b"Good signature" in verified.stderr


def test_importing_a_revocation_removes_the_key(pgp_keys, tmp_path):
    dave = pgp_keys["dave"]
    d = KeyDirectory(tmp_path / "keydir.db")
    d.import_any(dave.public)
    # the holder revokes the key; the revoked key reaches the administrator
    home = tmp_path / "holder"
    home.mkdir(mode=0o700)
    gpg(home, "--import", data=dave.public)
    cert = (dave.home / "openpgp-revocs.d" / f"{dave.fingerprint}.rev").read_text()
    cert = cert.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----"
    )
    gpg(home, "--import", data=cert.encode())
    revoked = gpg(home, "--export", dave.fingerprint).stdout
    report = d.import_any(revoked)
    assert report.imported == ()
    assert report.skipped[-1] == f"{dave.fingerprint}: revoked - removed from the directory"
    assert d.stored() == []
    assert [e["action"] for e in d.log()] == ["import", "remove"]
    d.close()
