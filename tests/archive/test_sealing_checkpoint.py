"""Encryption at rest (per-record keys, master-key rotation) and signed checkpoints."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.archive.checkpoint import Checkpoint, CheckpointError, sign, verify
from gateway.archive.merkle import leaf_hash, root
from gateway.archive.sealing import MasterKeys, SealError, key_of, open_sealed, rewrap, seal

K1, K2 = os.urandom(32), os.urandom(32)
MESSAGE = b"From: a@clinic.test\r\nSubject: Biopsy\r\n\r\n" + b"The margins are clear.\r\n" * 200


def test_a_record_round_trips_compressed_and_each_has_its_own_key():
    keys = MasterKeys("2026-a", {"2026-a": K1})
    one, two = seal(MESSAGE, "msg-1", keys), seal(MESSAGE, "msg-1", keys)
    assert one != two  # a fresh data key and nonce each time
    assert len(one) < len(MESSAGE) / 4  # compressed before encryption
    assert b"Biopsy" not in one and b"margins" not in one
    assert open_sealed(one, "msg-1", keys) == MESSAGE


def test_records_sealed_at_zlibs_default_level_open_as_the_fast_level_ones(monkeypatch):
    # records written before the archive compressed at `LEVEL` (zlib's level 6)
    import gateway.archive.sealing as sealing

    keys = MasterKeys("a", {"a": K1})
    prose = b"".join(
        b"Line %d of the discharge summary, dose %d mg.\r\n" % (n, n % 9) for n in range(900)
    )
    monkeypatch.setattr(sealing, "LEVEL", 6)
    old = seal(prose, "msg-1", keys)
    monkeypatch.undo()
    new = seal(prose, "msg-1", keys)
    assert len(new) != len(old)  # another level: another deflate stream
    assert open_sealed(old, "msg-1", keys) == prose == open_sealed(new, "msg-1", keys)


def test_dense_data_is_huffman_coded_alone_and_prose_still_at_the_fast_level():
    import zlib

    from gateway.archive.sealing import LEVEL, compress

    def deflated(data: bytes, strategy: int) -> bytes:
        c = zlib.compressobj(LEVEL, zlib.DEFLATED, 15, 8, strategy)
        return c.compress(data) + c.flush()

    keys = MasterKeys("a", {"a": K1})
    prose = b"".join(b"Line %d of the discharge summary.\r\n" % n for n in range(30_000))
    attachment = base64.encodebytes(os.urandom(800_000)).replace(b"\n", b"\r\n")  # a PDF's
    mail = prose[:20_000] + attachment
    assert compress(mail) == deflated(mail, zlib.Z_HUFFMAN_ONLY)
    assert len(compress(mail)) < 0.78 * len(mail)  # base64's quarter is still saved
    assert compress(prose) == deflated(prose, zlib.Z_DEFAULT_STRATEGY)
    assert len(compress(prose)) < 0.1 * len(prose)
    for data in (mail, prose):
        assert open_sealed(seal(data, "msg-1", keys), "msg-1", keys) == data


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
