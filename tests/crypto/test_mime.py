"""The base64 body of the MIME parts the gateway writes (S/MIME copies, TLS reports,
API messages): RFC 2045's 76-character lines ending in CRLF, decoding to the bytes
given - for every length around a line's end, and beyond the precomputed lines."""

from __future__ import annotations

import base64
import os

import pytest

from gateway.crypto.mime import base64_body

# up to 77,824 encoded characters (58,368 bytes) are cut from a table; beyond, line
# by line
SIZES = [0, 1, 2, 3, 56, 57, 58, 113, 114, 115, 4096, 58_368, 58_369, 400_000]


@pytest.mark.parametrize("size", SIZES)
def test_lines_of_76_with_crlf_that_decode_to_the_data(size):
    data = os.urandom(size)
    body = base64_body(data)
    assert body == base64.encodebytes(data).replace(b"\n", b"\r\n")
    if size:
        assert body.endswith(b"\r\n")
        lines = body[:-2].split(b"\r\n")
        assert all(len(line) == 76 for line in lines[:-1])
        assert 0 < len(lines[-1]) <= 76
        assert b"\n" not in body.replace(b"\r\n", b"")
    assert base64.b64decode(body.replace(b"\r\n", b""), validate=True) == data
