"""The gateway's DKIM verifier (used to bind relaying to the tenant) against
signatures made by dkimpy, the reference implementation: what dkimpy signs verifies,
fed whole or in pieces; what was altered, or signed in ways the binding refuses
(l=, no From, rsa-sha1), does not.  Keys here come from a table; the SMTP tests
fetch them from the test DNS server."""

from __future__ import annotations

import pytest

from gateway.crypto.dkim import DkimKey, sign
from gateway.crypto.dkim_verify import (
    BodyHash,
    KeyAnswer,
    KeyCache,
    KeyStatus,
    MessageDigest,
    Outcome,
    verify,
)
from tests.support.clock import Clock
from tests.support.dkim_keys import ed25519_signing_key, rsa_signing_key
from tests.support.messages import MESSAGES
from tests.support.smime_pki import rsa_key


def table(*keys, temporary=()) -> KeyCache:
    records = {k.name: k.record for k in keys}

    async def fetch(name: str) -> KeyAnswer:
        if name in temporary:
            return KeyAnswer(KeyStatus.TEMPORARY)
        if name in records:
            return KeyAnswer(KeyStatus.FOUND, records[name], 300)
        return KeyAnswer(KeyStatus.NONE)

    return KeyCache(fetch)


def digest_of(message: bytes, chunk: int | None = None) -> MessageDigest:
    d = MessageDigest()
    step = chunk or len(message) or 1
    for i in range(0, len(message), step):
        d.feed(message[i : i + step])
    d.finish()
    return d


async def outcomes(message: bytes, keys: KeyCache, chunk: int | None = None) -> list[str]:
    return [f"{r.domain}:{r.outcome.value}" for r in await verify(digest_of(message, chunk), keys)]


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
async def test_what_dkimpy_signs_verifies_whole_and_in_pieces(name, canon):
    key = rsa_signing_key("clinic.test")
    head, body = canon.encode().split(b"/")
    signed = key.sign(MESSAGES[name](), canonicalize=(head, body))
    for chunk in (None, 1, 7, 1000):
        assert await outcomes(signed, table(key), chunk) == ["clinic.test:pass"], chunk


async def test_ed25519_signatures_verify():
    key = ed25519_signing_key("clinic.test")
    signed = key.sign(MESSAGES["plain text, no MIME fields"]())
    assert await outcomes(signed, table(key)) == ["clinic.test:pass"]


async def test_the_gateways_own_signatures_verify():
    key = DkimKey("clinic.test", "sg", rsa_key(2048, 3))
    message = MESSAGES["nested multipart with attachments"]()
    signed = sign(message, key) + message

    async def fetch(name: str) -> KeyAnswer:
        return KeyAnswer(KeyStatus.FOUND, key.public_record(), 60)

    assert await outcomes(signed, KeyCache(fetch), 13) == ["clinic.test:pass"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        b"text\r\n\r\n\r\n",
        b"  spaced \t out  \r\n\r\n \r\n",
        b"\r\n\r\nlate text\r\n",
        b"no final line break",
    ],
)
@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
async def test_body_canonicalization_edges_agree_with_dkimpy(body, canon):
    key = rsa_signing_key("clinic.test")
    message = b"From: a@clinic.test\r\nSubject: x\r\n\r\n" + body
    signed = key.sign(message, canonicalize=(canon, canon))
    for chunk in (None, 1, 2, 3):
        assert await outcomes(signed, table(key), chunk) == ["clinic.test:pass"]


def test_the_empty_body_hashes_as_rfc_6376_says():
    import base64
    import hashlib

    simple, relaxed = BodyHash(relaxed=False), BodyHash(relaxed=True)
    # RFC 6376 3.4.3 and 3.4.4: an empty body is CRLF (simple) or nothing (relaxed)
    assert simple.digest() == hashlib.sha256(b"\r\n").digest()
    assert relaxed.digest() == hashlib.sha256(b"").digest()
    assert base64.b64encode(relaxed.digest()) == b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


async def test_an_altered_body_or_signed_header_fails():
    key = rsa_signing_key("clinic.test")
    signed = key.sign(MESSAGES["plain text, no MIME fields"]())
    keys = table(key)
    assert await outcomes(signed.replace(b"fine", b"FINE"), keys) == ["clinic.test:fail"]
    assert await outcomes(signed.replace(b"Subject: ", b"Subject: Re: "), keys) == [
        "clinic.test:fail"
    ]
    # an unsigned field may be added (RFC 6376 5.4): still a pass
    assert await outcomes(signed.replace(b"\r\n\r\n", b"\r\nX-Added: 1\r\n\r\n", 1), keys) == [
        "clinic.test:pass"
    ]


async def test_every_signature_is_checked_not_only_the_first():
    ours, theirs = rsa_signing_key("clinic.test"), rsa_signing_key("other.onmicrosoft.com")
    message = MESSAGES["plain text, no MIME fields"]()
    both = theirs.sign(ours.sign(message))
    assert await outcomes(both, table(ours, theirs)) == [
        "other.onmicrosoft.com:pass",
        "clinic.test:pass",
    ]
    # the top one broken, the one below still counts
    broken = both.replace(b"b=", b"b=AAAA", 1)
    assert await outcomes(broken, table(ours, theirs)) == [
        "other.onmicrosoft.com:fail",
        "clinic.test:pass",
    ]


async def test_a_body_length_is_refused():
    key = rsa_signing_key("clinic.test")
    signed = key.sign(MESSAGES["plain text, no MIME fields"](), length=True)
    (result,) = await verify(digest_of(signed), table(key))
    assert result.outcome is Outcome.PERMERROR and "l=" in result.reason


def sign_without_from(key, message: bytes) -> bytes:
    """dkimpy will not make such a signature (RFC 6376 5.4 says From MUST be signed),
    so it is made here by hand: relaxed/relaxed over To and Subject."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    from gateway.crypto.dkim import relaxed_body, relaxed_header

    head, body = message.split(b"\r\n\r\n", 1)
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n"))
    bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
    tags = f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={key.domain}; s={key.selector}; h=to:subject; bh={bh}; b="
    data = b"".join(relaxed_header(n, fields[n.title()]) + b"\r\n" for n in (b"to", b"subject"))
    data += relaxed_header(b"DKIM-Signature", tags.encode())
    private = serialization.load_pem_private_key(key.private, None)
    b = base64.b64encode(private.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()
    return f"DKIM-Signature: {tags}{b}\r\n".encode() + message


async def test_a_signature_without_from_is_refused():
    key = rsa_signing_key("clinic.test")
    message = b"From: a@clinic.test\r\nTo: b@dest.test\r\nSubject: s\r\n\r\nbody\r\n"
    signed = sign_without_from(key, message)
    (result,) = await verify(digest_of(signed), table(key))
    assert result.outcome is Outcome.PERMERROR and "From" in result.reason
    # the same signature with From among h= would have verified: the refusal is the rule
    assert "h=to:subject;" in signed.decode()


async def test_rsa_sha1_is_refused():
    key = rsa_signing_key("clinic.test")
    message = MESSAGES["plain text, no MIME fields"]()
    import dkim

    field = dkim.sign(
        message, b"sel1", b"clinic.test", key.private, signature_algorithm=b"rsa-sha1"
    )
    (result,) = await verify(digest_of(field + message), table(key))
    assert result.outcome is Outcome.PERMERROR and "8301" in result.reason


async def test_missing_revoked_and_unreachable_keys():
    key = rsa_signing_key("clinic.test")
    signed = key.sign(MESSAGES["plain text, no MIME fields"]())
    (none,) = await verify(digest_of(signed), table())
    assert none.outcome is Outcome.PERMERROR
    revoked = rsa_signing_key("clinic.test")

    async def fetch(name: str) -> KeyAnswer:
        return KeyAnswer(KeyStatus.FOUND, "v=DKIM1; k=rsa; p=", 60)

    (gone,) = await verify(
        digest_of(revoked.sign(b"From: a@clinic.test\r\n\r\nx\r\n")), KeyCache(fetch)
    )
    assert gone.outcome is Outcome.FAIL and "revoked" in gone.reason
    (later,) = await verify(digest_of(signed), table(key, temporary={key.name}))
    assert later.outcome is Outcome.TEMPERROR


async def test_an_expired_signature_fails():
    key = rsa_signing_key("clinic.test")
    message = b"From: a@clinic.test\r\n\r\nx\r\n"
    signed = key.sign(message)
    signed = signed.replace(b"DKIM-Signature: ", b"DKIM-Signature: x=1000; ", 1)
    (result,) = await verify(digest_of(signed), table(key), now=2000)
    assert result.outcome is Outcome.FAIL and "expired" in result.reason


async def test_keys_are_cached_for_their_ttl_and_failures_are_not():
    clock = Clock(lambda: 1000.0)
    calls: list[str] = []
    answers = {"s._domainkey.clinic.test": KeyAnswer(KeyStatus.FOUND, "v=DKIM1; p=", 120)}

    async def fetch(name: str) -> KeyAnswer:
        calls.append(name)
        return answers.get(name, KeyAnswer(KeyStatus.TEMPORARY))

    cache = KeyCache(fetch, clock=clock)
    for _ in range(3):
        await cache.get("s", "clinic.test")
    assert calls == ["s._domainkey.clinic.test"]
    clock.advance(121)
    await cache.get("s", "clinic.test")
    assert len(calls) == 2
    await cache.get("t", "clinic.test")
    await cache.get("t", "clinic.test")  # a temporary failure is asked again
    assert len(calls) == 4
