"""Reading the DATA phase: end-of-data detection, dot-unstuffing and the checks.

RFC 5321 4.1.1.4 and 4.5.2: message data ends with a line holding a single dot,
CRLF "." CRLF; a leading dot on any other line was added by the client and is
removed.  Only CRLF ends a line.

SMTP smuggling (CVE-2023-51764 and kin) hides a second message behind an end marker
that one server honours and another does not (``LF . LF``, ``LF . CRLF``,
``CR . CR``...).  Sealgate honours *only* CRLF "." CRLF as the end of data and
rejects any message containing a bare CR or bare LF (554 5.5.2) once the real end is
reached, so the smuggled text is swallowed as part of a rejected message and never
becomes a message of its own.

The scanner works on chunks as they arrive (at most the reader's buffer limit), with
C-speed bytes operations per chunk; a 25 MB message never holds the event loop for
long, and nothing but the current chunk is kept in memory here.
"""

from __future__ import annotations

import enum
import re

# a line that begins with a dot (where every LF ends a CRLF: checked first)
_DOT_AFTER_LF = re.compile(rb"\n\.").search


class DataProblem(enum.Enum):
    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_LINE_ENDING = "bare CR or LF"
    MAIL_LOOP = "mail loop"


class MessageScanner:
    """Validates and dot-unstuffs message data; `feed` returns bytes to store."""

    def __init__(self, max_size: int, max_line: int, max_received: int):
        self.max_size = max_size
        # A dot-stuffed line may be one octet longer on the wire (RFC 5321 4.5.3.1.6).
        self.max_wire_line = max_line + 1
        self.max_received = max_received
        self.wire_size = 0
        self.received_headers = 0
        self.problem: DataProblem | None = None
        self._carry = b""
        self._in_headers = True
        self._dotted = False  # a line began with a dot on the wire

    def feed(self, data: bytes) -> bytes:
        self.wire_size += len(data)
        if self.problem is not None:
            return b""
        if self.wire_size > self.max_size:
            return self._fail(DataProblem.TOO_BIG)
        buf = self._carry + data if self._carry else data
        cut = buf.rfind(b"\n") + 1
        complete, self._carry = buf[:cut], buf[cut:]
        if len(self._carry) + 1 > self.max_wire_line:
            return self._fail(DataProblem.LINE_TOO_LONG)
        if not complete:
            return b""
        # The lines as sent; one split serves every check below.  ``splitlines``
        # breaks at CRLF, a bare CR and a bare LF alike (and is the fastest split: a
        # 50 KB chunk 32 us, against 53 at CRLF), so every line ends in CRLF exactly
        # when there are as many CRs and as many LFs as lines.
        lines = complete.splitlines()
        if complete.count(b"\n") != len(lines) or complete.count(b"\r") != len(lines):
            return self._fail(DataProblem.BARE_LINE_ENDING)
        if max(map(len, lines)) + 2 > self.max_wire_line:
            return self._fail(DataProblem.LINE_TOO_LONG)
        if self._in_headers:
            self._scan_headers(lines)
            if self.problem is not None:
                return b""
        # Every chunk of complete lines starts at the beginning of a line; a line the
        # client dot-stuffed is rare, and looked for at memchr's speed (a 50 KB chunk
        # 15 us; replacing to find out took 32).
        if not (complete.startswith(b".") or _DOT_AFTER_LF(complete)):
            return complete
        self._dotted = True
        out = complete[1:] if complete.startswith(b".") else complete
        return out.replace(b"\r\n.", b"\r\n")

    @property
    def data_is_wire(self) -> bool:
        """What `feed` returned is its own wire form (CRLF line endings only: any
        other is a problem; and no line began with a dot, so none of the stored
        lines does): delivery may send it as it is."""
        return self.problem is None and not self._dotted

    def finish(self) -> bytes:
        """Called at the end of data; the data ended with CRLF, so nothing is pending."""
        if self._carry and self.problem is None:
            # Only reachable if the end marker was not preceded by CRLF, which the
            # reader does not allow; treat it as malformed rather than guess.
            self._fail(DataProblem.BARE_LINE_ENDING)
        return b""

    def _scan_headers(self, lines: list[bytes]) -> None:
        """Count the Received fields among ``lines`` (as sent: a leading dot is the
        client's) up to the first empty line, the end of the header."""
        for line in lines:
            if line[:1] == b".":
                line = line[1:]
            if not line:
                self._in_headers = False
                break
            if line[:9].lower() == b"received:":
                self.received_headers += 1
        if self.received_headers > self.max_received:
            self._fail(DataProblem.MAIL_LOOP)

    def _fail(self, problem: DataProblem) -> bytes:
        self.problem = problem
        self._carry = b""
        return b""
