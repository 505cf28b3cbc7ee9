"""The split every end-to-end mode makes: the MIME entity that is protected, and the
header fields that stay outside for the mail servers."""

from __future__ import annotations

import re

from gateway.errors import SealgateError

_FIELD = re.compile(rb"[!-9;-~]+:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n")


class SplitError(SealgateError, ValueError):
    """The message's header block cannot be read."""


def split(message: bytes) -> tuple[list[bytes], bytes]:
    """(outer header fields, MIME entity): the entity is the ``Content-*`` fields and
    the body exactly as received (RFC 2045 defaults added when there are none)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message, b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    outer: list[bytes] = []
    content: list[bytes] = []
    pos = 0
    for match in _FIELD.finditer(head):
        if match.start() != pos:
            raise SplitError("the header block is not well formed")
        pos = match.end()
        field = match.group(0)
        if field.lower().startswith(b"mime-version:"):
            continue  # the outer one is written anew
        (content if field.lower().startswith(b"content-") else outer).append(field)
    if not any(f.lower().startswith(b"content-type:") for f in content):
        content.insert(0, b"Content-Type: text/plain; charset=us-ascii\r\n")
    return outer, b"".join(content) + b"\r\n" + body
