"""Text from the documents PHI usually travels in: PDF (pypdf), and Word and Excel
files in their Office Open XML form (DOCX, XLSX: a zip of XML parts, read here with
the standard library).  For the content classifiers (`gateway.policy.classifiers`).

A document that cannot be read - encrypted with a password, damaged, a format that
only claims to be one of these, more text than the scan allows, or longer to read
than the time it was given - raises `Unreadable`; whether that counts as PHI is the
policy's choice (``unreadable``).  Nothing here writes anywhere; the zip and XML
readers stop at a size, so a small attachment cannot unpack into gigabytes.

Documents are read in child processes (``python -m gateway.policy.documents``, at most
`READERS`, started when first needed and kept): pypdf's parser can spend seconds on
one page of a few kilobytes of content stream, which no check between pages can cut
short, and in the daemon's own process it would hold the interpreter lock from the
event loop meanwhile.  A reader still reading at the end of its time is killed
(`GRACE` after it), and the document is unreadable.
"""

from __future__ import annotations

import io
import os
import queue
import select
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET  # noqa: S405 - bounded input; expat limits amplification
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

PDF = "pdf"
DOCX = "docx"
XLSX = "xlsx"
KINDS = (PDF, DOCX, XLSX)  # as numbered between a reader and its process

READERS = 2  # child processes reading documents at once, at most
GRACE = 0.5  # seconds a reader may run past its document's deadline before it is killed
_REQUEST = struct.Struct("!BIdI")  # kind, limit (characters), seconds left, bytes
_ANSWER = struct.Struct("!BI")  # 0: text, 1: why it is unreadable; bytes

_TYPES = {
    "application/pdf": PDF,
    "application/x-pdf": PDF,
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": DOCX,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": XLSX,
}
_EXTENSIONS = {".pdf": PDF, ".docx": DOCX, ".docm": DOCX, ".xlsx": XLSX, ".xlsm": XLSX}

# the parts of a DOCX and an XLSX that hold what a reader sees
_DOCX_PARTS = (
    "word/document.xml",
    "word/header",
    "word/footer",
    "word/footnotes.xml",
    "word/endnotes.xml",
    "word/comments.xml",
)
_XLSX_PARTS = ("xl/sharedStrings.xml", "xl/worksheets/", "xl/comments")
# the part every such document has (an XLSX of numbers alone has no shared strings)
_MAIN_PART = {DOCX: "word/document.xml", XLSX: "xl/workbook.xml"}
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_S = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


class Unreadable(Exception):
    """The document's text cannot be had; the message says why (never its content)."""


def _too_long(kind: str) -> Unreadable:
    return Unreadable(f"{kind.upper()} took longer to read than the scan allows")


def document_kind(content_type: str, filename: str | None, head: bytes) -> str | None:
    """Which of the documents read here an attachment is - by its declared type, its
    file name, or (for ``application/octet-stream`` and the like) its first bytes -
    or None for anything else."""
    kind = _TYPES.get(content_type.lower())
    if kind is None and filename:
        dot = filename.rfind(".")
        kind = _EXTENSIONS.get(filename[dot:].lower()) if dot >= 0 else None
    if kind is None and content_type.lower().startswith("application/") and head[:5] == b"%PDF-":
        kind = PDF
    return kind


def document_text(kind: str, data: bytes, limit: int, deadline: float) -> str:
    """The text of a document of this kind: at most ``limit`` characters, read before
    ``deadline`` (`time.monotonic`) by a reader process - else `Unreadable`.  Waiting
    for a free reader counts toward the deadline."""
    try:
        reader = _free.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise _too_long(kind) from None
    try:
        return reader.read(kind, data, limit, deadline)
    finally:
        _free.put(reader)


class _Reader:
    """One child process reading documents, one at a time (`_serve`), started again
    after it was killed or died."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None

    def read(self, kind: str, data: bytes, limit: int, deadline: float) -> str:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_long(kind)
        try:
            child = self._started()
            assert child.stdin is not None and child.stdout is not None
            request = _REQUEST.pack(KINDS.index(kind), max(0, limit), left, len(data))
            child.stdin.write(request + data)
            child.stdin.flush()
            status, size = _ANSWER.unpack(_read(child.stdout, _ANSWER.size, deadline + GRACE))
            answer = _read(child.stdout, size, deadline + GRACE).decode("utf-8", "replace")
        except TimeoutError:
            self.stop()
            raise _too_long(kind) from None
        except (OSError, EOFError, struct.error):
            self.stop()
            raise Unreadable(f"damaged {kind.upper()} (its reader stopped)") from None
        if status:
            raise Unreadable(answer)
        return answer

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self.stop()  # (it died: its pipes closed)
        root = str(Path(__file__).resolve().parents[2])  # where `gateway` is
        path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
        self._child = subprocess.Popen(  # noqa: S603 - this interpreter, this module
            [sys.executable, "-m", "gateway.policy.documents"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # pypdf's warnings about what it read
            env={**os.environ, "PYTHONPATH": path},
        )
        return self._child

    def stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for pipe in (self._child.stdin, self._child.stdout):
                if pipe is not None:
                    pipe.close()
            self._child = None


def _read(stream: IO[bytes], size: int, deadline: float) -> bytes:
    """``size`` bytes from a reader's output by ``deadline``, else TimeoutError; EOFError
    if it ends first."""
    out = bytearray()
    while len(out) < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise TimeoutError
        piece = os.read(stream.fileno(), size - len(out))
        if not piece:
            raise EOFError
        out += piece
    return bytes(out)


_free: queue.SimpleQueue[_Reader] = queue.SimpleQueue()
for _ in range(READERS):
    _free.put(_Reader())


def _serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """A reader process: documents in, their text (or why not) out, until its input
    ends."""
    while True:
        head = requests.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        kind, limit, left, size = _REQUEST.unpack(head)
        data = requests.read(size)
        try:
            status, answer = 0, _read_here(KINDS[kind], data, limit, time.monotonic() + left)
        except Unreadable as e:
            status, answer = 1, str(e)
        encoded = answer.encode("utf-8", "replace")
        answers.write(_ANSWER.pack(status, len(encoded)) + encoded)
        answers.flush()


def _read_here(kind: str, data: bytes, limit: int, deadline: float) -> str:
    """`document_text` in this process."""
    try:
        if kind == PDF:
            return _pdf(data, limit, deadline)
        return _office(kind, data, limit, deadline)
    except Unreadable:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reader trips on: not readable
        raise Unreadable(f"damaged {kind.upper()} ({type(e).__name__})") from None


def _pdf(data: bytes, limit: int, deadline: float) -> str:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data))
    # an owner password alone (no password to open) still lets anyone read it
    if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
        raise Unreadable("PDF encrypted with a password")
    pages, size = [], 0
    for page in reader.pages:
        if time.monotonic() > deadline:
            raise _too_long(PDF)
        text = page.extract_text() or ""
        size += len(text)
        if size > limit:
            raise Unreadable(f"PDF has more than {limit} characters of text")
        pages.append(text)
    return "\n".join(pages)


def _office(kind: str, data: bytes, limit: int, deadline: float) -> str:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        # encrypted Office files are OLE containers, not zips
        raise Unreadable(f"{kind.upper()} encrypted with a password or damaged") from None
    wanted = _DOCX_PARTS if kind == DOCX else _XLSX_PARTS
    texts, size = [], 0
    for info in archive.infolist():
        if not info.filename.startswith(wanted) or not info.filename.endswith(".xml"):
            continue
        for text in _xml_text(archive, info, kind, 4 * limit):
            if time.monotonic() > deadline:
                raise _too_long(kind)
            size += len(text) + 1
            if size > limit:
                raise Unreadable(f"{kind.upper()} has more than {limit} characters of text")
            texts.append(text)
    main = _MAIN_PART[kind]
    if main not in archive.namelist():
        raise Unreadable(f"not a {kind.upper()} (no {main})")
    return "\n".join(texts)


def _xml_text(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, kind: str, most: int
) -> Iterator[str]:
    """The texts of one XML part: a Word paragraph's runs joined (a number split
    over two runs is still one number), an Excel cell or shared string each."""
    with archive.open(info) as member:
        raw = member.read(most + 1)  # the declared size may lie: read no more than this
    if len(raw) > most:
        raise Unreadable(f"{kind.upper()} part {info.filename} larger than the scan allows")
    paragraph, value = {_W + "p", _S + "si", _S + "c"}, {_W + "t", _S + "t", _S + "v"}
    runs: list[str] = []
    for _, element in ET.iterparse(io.BytesIO(raw), events=("end",)):  # noqa: S314
        if element.tag in value and element.text:
            runs.append(element.text)
        elif element.tag in paragraph:
            # a cell of type "s" holds the number of a shared string, not text
            if runs and element.get("t") != "s":
                yield "".join(runs)
            runs = []
            element.clear()
    if runs:
        yield "".join(runs)


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
