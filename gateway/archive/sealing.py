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
import threading
import zlib
from dataclasses import dataclass

import zstandard
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
    fresh = os.urandom(44)  # one system call: the data key (32 bytes) and the nonce
    data_key, nonce = fresh[:32], fresh[32:]
    ciphertext = AESGCM(data_key).encrypt(nonce, compress(plaintext), record_id.encode())
    return _pack(keys.current, aes_key_wrap(keys.keys[keys.current], data_key), nonce, ciphertext)


# Zstandard (RFC 8878) at level 1: on the benchmark machine a 50 KB message of text
# took 0.10 ms against zlib level 1's 0.45 ms (to 0.38 of its size against 0.40),
# base64 attachments - most of mail's bytes - 0.06 ms against 1.29 (0.76 either
# way; zlib's Huffman coding alone, which the archive used for such data, 0.52),
# and a 4 KB message 0.02 ms against 0.04.  Records sealed before with zlib (RFC
# 1950: at level 6 first, later level 1) open as they did: a zlib stream never
# begins with Zstandard's frame magic (its first two bytes, 0x28 0xB5, fail zlib's
# header check).
LEVEL = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_local = threading.local()  # a compressor and decompressor per thread: reused


def compress(data: bytes) -> bytes:
    """One Zstandard frame (content size in its header)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=LEVEL)
    return bytes(compressor.compress(data))


def decompress(data: bytes) -> bytes:
    """A record's content: Zstandard, or zlib for records sealed before."""
    if not data.startswith(ZSTD_MAGIC):
        return zlib.decompress(data)
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return bytes(decompressor.decompress(data))


def open_sealed(blob: bytes, record_id: str, keys: MasterKeys) -> bytes:
    key_id, wrapped, nonce, ciphertext = _unpack(blob)
    data_key = _unwrap(key_id, wrapped, keys)
    try:
        compressed = AESGCM(data_key).decrypt(nonce, ciphertext, record_id.encode())
    except InvalidTag:
        raise SealError(f"record {record_id}: altered, or not this record's") from None
    return decompress(compressed)


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
