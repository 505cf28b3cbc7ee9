"""Encryption at rest of archived records: each record compressed, then encrypted
with its own data key (AES-256-GCM, the record id as associated data, so a blob
cannot be passed off as another record's); the data key wrapped (AES key wrap,
RFC 3394) by a master key named by its id.  New records use the current master key;
records sealed under an older key stay readable while that key is configured, and
`rewrap` moves a record to the current key without touching its content.  Deleting
a record's blob (or its wrapped key) makes it unreadable for good.

Blob layout: ``SGA1`` | key id length (1) | key id | wrapped key length (2, big
endian) | wrapped key | nonce (12) | ciphertext and tag.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from gateway.errors import SealgateError

MAGIC = b"SGA1"


class SealError(SealgateError, ValueError):
    """A record cannot be opened: altered, another record's, or its key is missing."""


@dataclass(frozen=True)
class MasterKeys:
    current: str
    keys: dict[str, bytes]  # id -> 32-byte key

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise ValueError(f"the current master key {self.current!r} is not among the keys")
        for key_id, key in self.keys.items():
            if len(key) != 32:
                raise ValueError(f"master key {key_id!r} is not 32 bytes")
            if not 0 < len(key_id.encode()) < 256:
                raise ValueError(f"master key id {key_id!r} is empty or too long")


def seal(plaintext: bytes, record_id: str, keys: MasterKeys) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(data_key).encrypt(nonce, compress(plaintext), record_id.encode())
    return _pack(keys.current, aes_key_wrap(keys.keys[keys.current], data_key), nonce, ciphertext)


# zlib's fastest level.  Level 6 (zlib's default) took three times the CPU for
# 43 KB of prose (1.65 against 0.53 ms) to make it a quarter smaller (8.0 against
# 10.7 KB), and the same time for base64 attachments - most of mail's bytes - at the
# same size (0.50 of the original at either level); journaling runs beside delivery.
LEVEL = 1


# Dense data - base64 of what is compressed or encrypted already: PDF, image and
# office attachments, S/MIME and PGP copies - shrinks only by base64's own quarter,
# and level 1's search for repeats finds nothing to show for its time: 44 ms a MB
# to 0.77 of the size, where Huffman coding alone takes 16 ms to 0.76 (prose: 2.5 ms
# to 0.04 at level 1, 10 ms to 0.58 by Huffman alone).  Which data is dense is told
# from `SAMPLES` pieces of `SAMPLE` bytes across it, for data of `SAMPLED_FROM` bytes
# or more: compressed at level 1 to more than `DENSE` of their size.
SAMPLE = 4096
SAMPLES = 3
SAMPLED_FROM = 64 * 1024
DENSE = 0.6


def compress(data: bytes) -> bytes:
    """zlib (RFC 1950) at `LEVEL`, with a window no larger than the data needs: for
    a typical message most of zlib's time goes to setting up its 32 KiB window and
    128 KiB of state (0.08 ms for 7 KB), not to compressing; dense data by Huffman
    coding alone (`DENSE`).  It is all one deflate format: `zlib.decompress` reads
    every record, those sealed at level 6 before too."""
    wbits = min(15, max(9, (len(data) - 1).bit_length()))
    strategy = zlib.Z_HUFFMAN_ONLY if _dense(data) else zlib.Z_DEFAULT_STRATEGY
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, wbits, max(1, min(8, wbits - 7)), strategy)
    return c.compress(data) + c.flush()


def _dense(data: bytes) -> bool:
    if len(data) < SAMPLED_FROM:
        return False
    step = len(data) // (SAMPLES + 1)
    view = memoryview(data)
    packed = sum(
        len(zlib.compress(view[k * step : k * step + SAMPLE], LEVEL, 12))
        for k in range(1, SAMPLES + 1)
    )
    return packed > DENSE * SAMPLE * SAMPLES


def open_sealed(blob: bytes, record_id: str, keys: MasterKeys) -> bytes:
    key_id, wrapped, nonce, ciphertext = _unpack(blob)
    data_key = _unwrap(key_id, wrapped, keys)
    try:
        compressed = AESGCM(data_key).decrypt(nonce, ciphertext, record_id.encode())
    except InvalidTag:
        raise SealError(f"record {record_id}: altered, or not this record's") from None
    return zlib.decompress(compressed)


def rewrap(blob: bytes, keys: MasterKeys) -> bytes:
    """The same record with its data key wrapped by the current master key."""
    key_id, wrapped, nonce, ciphertext = _unpack(blob)
    if key_id == keys.current:
        return blob
    data_key = _unwrap(key_id, wrapped, keys)
    return _pack(keys.current, aes_key_wrap(keys.keys[keys.current], data_key), nonce, ciphertext)


def key_of(blob: bytes) -> str:
    return _unpack(blob)[0]


def _unwrap(key_id: str, wrapped: bytes, keys: MasterKeys) -> bytes:
    master = keys.keys.get(key_id)
    if master is None:
        raise SealError(f"master key {key_id!r} is not configured")
    try:
        return aes_key_unwrap(master, wrapped)
    except InvalidUnwrap:
        raise SealError(f"the data key does not unwrap with master key {key_id!r}") from None


def _pack(key_id: str, wrapped: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    kid = key_id.encode()
    return (
        MAGIC
        + bytes([len(kid)])
        + kid
        + struct.pack(">H", len(wrapped))
        + wrapped
        + nonce
        + ciphertext
    )


def _unpack(blob: bytes) -> tuple[str, bytes, bytes, bytes]:
    try:
        if blob[:4] != MAGIC:
            raise SealError("not a sealed record")
        n = blob[4]
        key_id = blob[5 : 5 + n].decode()
        pos = 5 + n
        (w,) = struct.unpack(">H", blob[pos : pos + 2])
        wrapped = blob[pos + 2 : pos + 2 + w]
        nonce = blob[pos + 2 + w : pos + 14 + w]
        ciphertext = blob[pos + 14 + w :]
    except (IndexError, struct.error, UnicodeDecodeError):
        raise SealError("a truncated or malformed sealed record") from None
    if len(wrapped) != w or len(nonce) != 12 or len(ciphertext) < 16:
        raise SealError("a truncated or malformed sealed record")
    return key_id, wrapped, nonce, ciphertext
