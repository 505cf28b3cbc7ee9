"""Signed checkpoints of the archive log, as C2SP signed notes (tlog-checkpoint):

    <origin>\\n<tree size>\\n<base64 root hash>\\n
    \\n
    — <key name> <base64(key id || Ed25519 signature)>\\n

The key id is the first 4 bytes of SHA-256(key name || "\\n" || 0x01 || public key);
the signature covers the note's text (the three lines).  A checkpoint handed to an
auditor, or mailed to the compliance officer, pins the whole log up to its size:
later checkpoints must be consistent with it (`merkle.verify_consistency`).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.errors import SealgateError

_DASH = "\u2014"


class CheckpointError(SealgateError, ValueError):
    """The note is malformed, or its signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def key_id(name: str, public: ed25519.Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()[:4]


def sign(checkpoint: Checkpoint, name: str, key: ed25519.Ed25519PrivateKey) -> str:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ValueError(f"{name!r} is not a note key name")
    text = checkpoint.text()
    signature = key.sign(text.encode())
    blob = base64.b64encode(key_id(name, key.public_key()) + signature).decode()
    return f"{text}\n{_DASH} {name} {blob}\n"


def verify(note: str, name: str, public: ed25519.Ed25519PublicKey) -> Checkpoint:
    """The checkpoint in ``note`` if ``name``'s key signed it; CheckpointError else."""
    text, sep, signatures = note.partition("\n\n")
    if not sep or not text:
        raise CheckpointError("not a signed note")
    text += "\n"
    wanted = key_id(name, public)
    for line in signatures.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH or parts[1] != name:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            raise CheckpointError("a signature line is not base64") from None
        if blob[:4] != wanted:
            continue
        try:
            public.verify(blob[4:], text.encode())
        except InvalidSignature:
            raise CheckpointError(f"the signature of {name} does not verify") from None
        return _parse(text)
    raise CheckpointError(f"no signature of {name}")


def _parse(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4 or not lines[1].isdigit():
        raise CheckpointError("the note is not a checkpoint")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except ValueError:
        raise CheckpointError("the root hash is not base64") from None
    if len(root) != 32:
        raise CheckpointError("the root hash is not SHA-256")
    return Checkpoint(lines[0], int(lines[1]), root)
