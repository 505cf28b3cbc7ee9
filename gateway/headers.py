"""A message's header section: its lines before the first empty line (RFC 5322 2.1).

What Sealgate receives over SMTP ends its lines with CRLF; a message read back from
elsewhere (an older spool, a file given to the command line) may end them with a
bare LF, so either ends a line here.
"""

from __future__ import annotations

import re

_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


def header_section(data: bytes, limit: int | None = None) -> bytes:
    """The header fields of ``data`` and the empty line after them; all of ``data``
    when it has no empty line.  ``limit``: look no further than that many bytes (and
    return no more)."""
    end = len(data) if limit is None else limit
    found = _EMPTY_LINE.search(data, 0, end)
    return data[: found.end() if found else end]


def header_is_ascii(data: bytes) -> bool:
    """Whether a message's header section is ASCII.  If not - an address or a phrase
    in UTF-8 (RFC 6532) - it is an internationalized message, which travels only with
    SMTPUTF8 (RFC 6531 3.4)."""
    return header_section(data).isascii()
