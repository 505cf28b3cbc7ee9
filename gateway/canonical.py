"""Canonical JSON: keys sorted, no spaces, characters as they are - the text the
archive's commitments are made over (`gateway.archive.journal`).

An attempt's decision (with its reasons and facts) and evidence are written twice:
to the queue's state and into the archive's attempt record, which is most of that
record's text.  `encoded` makes their text once; `canonical_text` writes an
`Encoded` where its value would be, byte for byte what encoding the value in place
gives (the encoder writes an object the same wherever it stands).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from typing import Any


class Encoded:
    """A value and its canonical text, made once (`encoded`)."""

    __slots__ = ("value", "text")

    def __init__(self, value: Any, text: str):
        self.value, self.text = value, text

    @staticmethod
    def value_of(value: Any) -> Any:
        """``value``, or what it encodes."""
        return value.value if isinstance(value, Encoded) else value


# What stands for an `Encoded` while the whole is written: NUL and a secret of this
# process, which no text from outside can spell.
_MARK = f"\x00{secrets.token_hex(8)}:"
_spliced = threading.local()  # the texts of the `canonical_text` call under way


def _stand_in(value: Any) -> str:
    if not isinstance(value, Encoded):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    texts: list[str] = _spliced.texts
    texts.append(value.text)
    return f"{_MARK}{len(texts) - 1}"


# made once: `json.dumps` with any argument of its own builds an encoder a call
_TEXT = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_stand_in
).encode
_QUOTED_MARK = _TEXT(_MARK)[:-1]  # as written: a JSON string, its quote not closed
_SURROGATE = re.compile("[\ud800-\udfff]")


def canonical_text(value: Any) -> str:
    texts: list[str] = []
    _spliced.texts = texts
    text = _TEXT(value)
    for i, part in enumerate(texts):  # in the order they were written
        text = text.replace(f'{_QUOTED_MARK}{i}"', part, 1)
    return text


def encoded(value: Any) -> Encoded:
    """``value``'s canonical text (an `Encoded` in it spliced in too); lone
    surrogates (bytes that were not UTF-8, kept by ``surrogateescape``), which UTF-8
    cannot hold, written as their JSON escapes (``\\udcxx``: the same value)."""
    text = canonical_text(value)
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return Encoded(value, text)
