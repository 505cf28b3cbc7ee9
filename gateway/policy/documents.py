"""Text from the documents PHI usually travels in: PDF (pypdf), and Word and Excel
files in their Office Open XML form (DOCX, XLSX: a zip of XML parts, read here with
the standard library).  For the content classifiers (`gateway.policy.classifiers`).

A document that cannot be read - encrypted with a password, damaged, a format that
only claims to be one of these, more text than the scan allows, or longer to read
than the time it was given - raises `Unreadable`; whether that counts as PHI is the
policy's choice (``unreadable``).  Nothing here writes anywhere or runs anything; the
zip and XML readers stop at a size, so a small attachment cannot unpack into
gigabytes.
"""

from __future__ import annotations

import io
import time
import xml.etree.ElementTree as ET  # noqa: S405 - bounded input; expat limits amplification
import zipfile
from collections.abc import Iterator

PDF = "pdf"
DOCX = "docx"
XLSX = "xlsx"

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
    ``deadline`` (`time.monotonic`) - else `Unreadable`."""
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
            raise Unreadable("PDF took longer to read than the scan allows")
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
                raise Unreadable(f"{kind.upper()} took longer to read than the scan allows")
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
