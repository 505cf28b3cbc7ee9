"""passphrase - the portal passphrase a sender sets in a header
(``portal.passphrase_header``, by default ``X-Sealgate-Passphrase``) is taken out of
the message as it arrives, before the spool, the archive, the policy or any
recipient's copy see it; only an Argon2id hash of it goes on, in the envelope, to
the portal (`gateway.portal.credentials`).

The header section is held back until its end (at most `MAX_HEADER`; a longer one
passes unchanged - no passphrase is looked for past it), every field of that name is
removed with its continuation lines, and the first non-empty value is the passphrase
(RFC 2047 encoded words decoded).
"""

from __future__ import annotations

import contextlib
import email.header
import re

MAX_HEADER = 256 * 1024
_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:", re.M)


class PassphraseFilter:
    def __init__(self, header_name: str):
        self._name = header_name.lower().encode("ascii")
        self._head = bytearray()
        self.done = False
        self.value: str | None = None

    def feed(self, data: bytes) -> bytes:
        """What may be written on: nothing while the header section is incomplete."""
        if self.done:
            return data
        if not self._head:
            # the first piece: most messages' whole header section is in it - without
            # such a field, passed on as it is (not copied thrice)
            end = 0 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n")
            if end >= 0 and self._name not in data[: end + 2].lower():
                self.done = True
                return data
        start = max(0, len(self._head) - 3)
        self._head += data
        if self._head.startswith(b"\r\n"):  # no header fields at all
            return self._release(0)
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            return self._release(end + 2)
        if len(self._head) > MAX_HEADER:
            self.done = True
            held, self._head = bytes(self._head), bytearray()
            return held
        return b""

    def finish(self) -> bytes:
        """The rest, at the end of the message (a message that is all header)."""
        if self.done:
            return b""
        return self._release(len(self._head))

    def _release(self, head_end: int) -> bytes:
        head, rest = bytes(self._head[:head_end]), bytes(self._head[head_end:])
        self._head, self.done = bytearray(), True
        if self._name not in head.lower():
            return head + rest
        return self._without_field(head) + rest

    def _without_field(self, head: bytes) -> bytes:
        fields: list[list[bytes]] = []
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and fields:  # continues the field before
                fields[-1].append(line)
            else:
                fields.append([line])
        kept = []
        for lines in fields:
            first = lines[0]
            named = _FIELD_START.match(first) is not None
            if named and first.split(b":", 1)[0].strip().lower() == self._name:
                self._take(b"".join([first.split(b":", 1)[1], *lines[1:]]))
            else:
                kept.extend(lines)
        return b"".join(kept)

    def _take(self, raw: bytes) -> None:
        """The first non-empty value is the passphrase (RFC 2047 words decoded)."""
        text = raw.replace(b"\r\n", b"").strip().decode("utf-8", "replace")
        if self.value is not None or not text:
            return
        with contextlib.suppress(ValueError, LookupError):
            text = str(email.header.make_header(email.header.decode_header(text)))
        self.value = text.strip() or None
