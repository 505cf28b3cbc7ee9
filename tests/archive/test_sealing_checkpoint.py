"""Encryption at rest (per-record keys, master-key rotation) and signed checkpoints."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from gateway.archive.checkpoint import Checkpoint, CheckpointError, sign, verify
from gateway.archive.merkle import leaf_hash, root
from gateway.archive.sealing import (
    MasterKeys,
    SealError,
    _unpack,
    key_of,
    open_sealed,
    rewrap,
    seal,
)

K1, K2 = os.urandom(32), os.urandom(32)
MESSAGE = b"From: a@clinic.test\r\nSubject: Biopsy\r\n\r\n" + b"The margins are clear.\r\n" * 200


def test_a_record_round_trips_compressed_and_each_has_its_own_key():
    keys = MasterKeys("2026-a", {"2026-a": K1})
    one, two = seal(MESSAGE, "msg-1", keys), seal(MESSAGE, "msg-1", keys)
    assert one != two  # a fresh data key and nonce each time
    (_, wrapped_one, nonce_one, _), (_, wrapped_two, nonce_two, _) = _unpack(one), _unpack(two)
    key_one, key_two = aes_key_unwrap(K1, wrapped_one), aes_key_unwrap(K1, wrapped_two)
    assert len(key_one) == 32 and len(nonce_one) == 12
    assert key_one != key_two and nonce_one != nonce_two
    assert nonce_one not in key_one  # drawn together, taken apart
    assert len(one) < len(MESSAGE) / 4  # compressed before encryption
    assert b"Biopsy" not in one and b"margins" not in one
    assert open_sealed(one, "msg-1", keys) == MESSAGE


def test_records_sealed_with_zlib_before_open_as_the_zstandard_ones(monkeypatch):
    """Records written before the archive compressed with Zstandard - zlib at its
    default level 6 first, then level 1, dense data by Huffman coding alone - open
    as they did."""
    import zlib

    import gateway.archive.sealing as sealing

    keys = MasterKeys("a", {"a": K1})
    prose = b"".join(
        b"Line %d of the discharge summary, dose %d mg.\r\n" % (n, n % 9) for n in range(900)
    )
    dense = base64.encodebytes(os.urandom(90_000)).replace(b"\n", b"\r\n")
    old = []
    for level, strategy, data in (
        (6, zlib.Z_DEFAULT_STRATEGY, prose),
        (1, zlib.Z_DEFAULT_STRATEGY, prose),
        (1, zlib.Z_HUFFMAN_ONLY, dense),
    ):
        for wbits in (15, 9):  # the whole window, and one fitted to a small record

            def deflated(data: bytes, level=level, strategy=strategy, wbits=wbits) -> bytes:
                c = zlib.compressobj(level, zlib.DEFLATED, wbits, 8, strategy)
                return c.compress(data) + c.flush()

            monkeypatch.setattr(sealing, "compress", deflated)
            old.append((seal(data, "msg-1", keys), data))
    monkeypatch.undo()
    new = seal(prose, "msg-1", keys)
    for blob, data in old:
        assert open_sealed(blob, "msg-1", keys) == data
    assert open_sealed(new, "msg-1", keys) == prose


def test_records_are_zstandard_frames_that_save_what_there_is_to_save():
    from gateway.archive.sealing import ZSTD_MAGIC, compress

    keys = MasterKeys("a", {"a": K1})
    prose = b"".join(b"Line %d of the discharge summary.\r\n" % n for n in range(30_000))
    attachment = base64.encodebytes(os.urandom(800_000)).replace(b"\n", b"\r\n")  # a PDF's
    mail = prose[:20_000] + attachment
    random = os.urandom(100_000)  # an encrypted copy, say: nothing to save
    for data in (mail, prose, random, b""):
        assert compress(data).startswith(ZSTD_MAGIC)
        assert open_sealed(seal(data, "msg-1", keys), "msg-1", keys) == data
    assert len(compress(mail)) < 0.78 * len(mail)  # base64's quarter is saved
    assert len(compress(prose)) < 0.1 * len(prose)
    assert len(compress(random)) < len(random) + 64  # stored, hardly grown


def test_altered_swapped_or_truncated_records_are_refused():
    keys = MasterKeys("a", {"a": K1})
    blob = seal(MESSAGE, "msg-1", keys)
    flipped = blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:]
    with pytest.raises(SealError, match="altered, or not this record's"):
        open_sealed(flipped, "msg-1", keys)
    with pytest.raises(SealError, match="altered, or not this record's"):
        open_sealed(blob, "msg-2", keys)  # another record's blob
    with pytest.raises(SealError, match="truncated or malformed"):
        open_sealed(blob[:20], "msg-1", keys)
    with pytest.raises(SealError, match="not a sealed record"):
        open_sealed(b"hello world, not sealed", "msg-1", keys)


def test_master_keys_rotate_and_old_records_stay_readable():
    old = MasterKeys("a", {"a": K1})
    blob = seal(MESSAGE, "msg-1", old)
    rotated = MasterKeys("b", {"a": K1, "b": K2})
    assert open_sealed(blob, "msg-1", rotated) == MESSAGE  # still readable
    moved = rewrap(blob, rotated)
    assert key_of(moved) == "b" and key_of(blob) == "a"
    only_new = MasterKeys("b", {"b": K2})
    assert open_sealed(moved, "msg-1", only_new) == MESSAGE
    with pytest.raises(SealError, match="master key 'a' is not configured"):
        open_sealed(blob, "msg-1", only_new)
    wrong = MasterKeys("a", {"a": K2})
    with pytest.raises(SealError, match="does not unwrap"):
        open_sealed(blob, "msg-1", wrong)
    with pytest.raises(ValueError, match="not 32 bytes"):
        MasterKeys("a", {"a": b"short"})


def test_a_signed_checkpoint_verifies_and_a_changed_one_does_not():
    key = ed25519.Ed25519PrivateKey.generate()
    cp = Checkpoint(
        "archive.clinic.test/sealgate", 3, root([leaf_hash(b"a"), leaf_hash(b"b"), leaf_hash(b"c")])
    )
    note = sign(cp, "archive.clinic.test", key)
    lines = note.split("\n")
    assert lines[:3] == ["archive.clinic.test/sealgate", "3", base64.b64encode(cp.root).decode()]
    assert lines[4].startswith("\u2014 archive.clinic.test ")
    assert verify(note, "archive.clinic.test", key.public_key()) == cp
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(note.replace("\n3\n", "\n4\n", 1), "archive.clinic.test", key.public_key())
    with pytest.raises(CheckpointError, match="no signature"):
        verify(note, "archive.clinic.test", ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(CheckpointError, match="not a signed note"):
        verify("hello", "archive.clinic.test", key.public_key())
