"""Hostile input to the parts of the listener added for the relay binding and the
portal passphrase: mutated DKIM signatures and headers never raise out of the
verifier (each signature gets a result), and the passphrase filter passes any bytes
on, whole, whatever the header section holds."""

from __future__ import annotations

import random

from gateway.crypto.dkim_verify import KeyAnswer, KeyCache, KeyStatus, MessageDigest, verify
from gateway.smtp.passphrase import PassphraseFilter
from tests.support.dkim_keys import rsa_signing_key

JUNK = [
    b"",
    b"\x00",
    b"\xff\xfe",
    b";;;",
    b"=",
    b"b=",
    b"h=:::",
    b"a=rsa-sha256",
    b"\r\n\t",
    b"l=-1",
    b"x=abc",
    b"\xc3\x28",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        where = rng.randrange(len(out) + 1)
        choice = rng.random()
        if choice < 0.4 and out:
            del out[where : where + rng.randint(1, 20)]
        elif choice < 0.8:
            out[where:where] = rng.choice(JUNK)
        else:
            out[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))
    return bytes(out)


async def test_mutated_signatures_never_raise_out_of_the_verifier():
    key = rsa_signing_key("clinic.test")
    message = b"From: a@clinic.test\r\nTo: b@dest.test\r\nSubject: x\r\n\r\nbody line\r\n" * 1
    signed = key.sign(message)

    async def fetch(name: str) -> KeyAnswer:
        return KeyAnswer(KeyStatus.FOUND, key.record, 60)

    keys = KeyCache(fetch)
    rng = random.Random(15)
    for _ in range(500):
        data = mutate(rng, signed)
        digest = MessageDigest()
        for i in range(0, len(data), rng.randint(1, 64)):
            digest.feed(data[i : i + 64])
        digest.finish()
        results = await verify(digest, keys)
        signatures = sum(1 for name, _ in digest.fields() if name == b"dkim-signature")
        assert len(results) == min(signatures, 10)


def test_the_passphrase_filter_passes_any_bytes_on_whole():
    rng = random.Random(16)
    base = b"From: a@b\r\nX-Sealgate-Passphrase: secret words\r\nSubject: s\r\n\r\nbody\r\n"
    for _ in range(500):
        data = mutate(rng, base)
        f = PassphraseFilter("X-Sealgate-Passphrase")
        out = b""
        step = rng.randint(1, 50)
        for i in range(0, len(data), step):
            out += f.feed(data[i : i + step])
        out += f.finish()
        if f.value is None:
            assert len(out) <= len(data)
        # nothing is lost but the passphrase field itself
        assert out == data or b"passphrase" in data.lower()
        assert b"secret words" not in out.split(b"\r\n\r\n", 1)[0] or f.value is None
