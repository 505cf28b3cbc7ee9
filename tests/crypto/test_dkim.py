"""DKIM signatures made by the gateway verify with dkimpy (RSA and Ed25519), over
the structures a clinic sends; a changed copy loses the original signature."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.crypto.dkim import DkimError, DkimKey, load_key, sign, without_signatures
from tests.support.messages import MESSAGES, verify
from tests.support.smime_pki import rsa_key


def keys() -> dict[str, DkimKey]:
    return {
        "rsa": DkimKey("clinic.test", "sg2026", rsa_key(2048, 20)),
        "ed25519": DkimKey("clinic.test", "sg2026e", ed25519.Ed25519PrivateKey.generate()),
    }


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("name", MESSAGES)
def test_dkimpy_verifies_what_we_sign(name, algorithm):
    key = keys()[algorithm]
    message = MESSAGES[name]()
    signed = sign(message, key) + message
    assert verify(signed, key)
    assert f"a={key.algorithm};".encode() in signed[:200]
    # and it fails when the body or a signed field changes
    assert not verify(signed.replace(b"Subject: ", b"Subject: Re: ", 1), key)
    assert not verify(signed[:-10] + b"tampered\r\n", key)


def test_from_is_over_signed_so_a_second_from_breaks_it():
    key = keys()["rsa"]
    message = MESSAGES["plain text, no MIME fields"]()
    signed = sign(message, key) + message
    assert b"h=from:to:subject:date:message-id:from;" in signed
    head, body = signed.split(b"\r\n\r\n", 1)
    assert not verify(head + b"\r\nFrom: evil@attacker.test\r\n\r\n" + body, key)


def test_a_changed_copy_loses_the_original_signature_and_nothing_else():
    key = keys()["rsa"]
    message = MESSAGES["nested multipart with attachments"]()
    signed = sign(message, key) + message
    assert without_signatures(signed) == message
    assert without_signatures(message) == message
    # only a field of that name goes, in any case; a field that only contains the
    # name stays, and so does the body's text
    other = b"X-DKIM-Signature-Note: kept\r\n"
    head, body = signed.split(b"\r\n\r\n", 1)
    mixed = head.replace(b"DKIM-Signature:", b"dkim-SIGNATURE:") + b"\r\n" + other + b"\r\n"
    assert without_signatures(mixed + body) == message.replace(
        b"\r\n\r\n", b"\r\n" + other + b"\r\n", 1
    )
    quoted = message + b"DKIM-Signature: in the body stays\r\n"
    assert without_signatures(quoted) == quoted


def test_keys_are_checked(tmp_path):
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(DkimError, match="an RSA or Ed25519 key is needed"):
        load_key(ec_key, "clinic.test", "s")
    with pytest.raises(DkimError, match="not an unencrypted PEM private key"):
        load_key(tmp_path / "missing.pem", "clinic.test", "s")
    with pytest.raises(DkimError, match="no From"):
        sign(b"Subject: x\r\n\r\nbody\r\n", keys()["rsa"])
