"""Documents for the classifier tests, made the way their producers make them: a PDF
written object by object with its cross-reference table (text in a Flate-compressed
content stream, as word processors write it) and re-written by pypdf's writer with
a password; DOCX and XLSX as the zip of XML parts Office writes (a Word number split
over two runs, an Excel string in the shared strings table)."""

from __future__ import annotations

import io
import zipfile
import zlib
from email.message import EmailMessage


def pdf(pages: list[list[str]], compress: bool = True, drawing: bytes = b"") -> bytes:
    """A PDF with these pages, each of these lines of text (Helvetica), after
    ``drawing`` (content-stream operators) on each."""
    objects: list[bytes] = []
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    font = 3 + 2 * len(pages)
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    for i, lines in enumerate(pages):
        shown = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
        content = drawing + f"BT /F1 11 Tf 72 760 Td 14 TL {shown} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        if compress:
            content = zlib.compress(content)
            head = f"<< /Length {len(content)} /Filter /FlateDecode >>".encode()
        else:
            head = f"<< /Length {len(content)} >>".encode()
        objects.append(head + b"\nstream\n" + content + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def encrypted_pdf(data: bytes, user_password: str, owner_password: str = "owner") -> bytes:
    """``data`` re-written by pypdf with AES-256 encryption (``user_password`` empty:
    opens without a password, as owner-restricted PDFs do)."""
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password, algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>{overrides}</Types>'
)
_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
_S = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"


def docx(paragraphs: list[list[str]]) -> bytes:
    """A DOCX whose paragraphs are made of these runs."""
    body = "".join(
        "<w:p>" + "".join(f"<w:r><w:t xml:space=\"preserve\">{run}</w:t></w:r>" for run in p)
        + "</w:p>"
        for p in paragraphs
    )  # fmt: skip
    document = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<w:document xmlns:w="{_W}"><w:body>{body}</w:body></w:document>'
    )
    override = (
        '<Override PartName="/word/document.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
    )
    return _zip({
        "[Content_Types].xml": _CONTENT_TYPES.format(overrides=override),
        "word/document.xml": document,
    })  # fmt: skip


def xlsx(strings: list[str], numbers: list[int]) -> bytes:
    """An XLSX with one sheet: a row of these shared strings, a row of these numbers."""
    shared = "".join(f"<si><t>{s}</t></si>" for s in strings)
    row1 = "".join(f'<c r="{chr(65 + i)}1" t="s"><v>{i}</v></c>' for i in range(len(strings)))
    row2 = "".join(f'<c r="{chr(65 + i)}2"><v>{n}</v></c>' for i, n in enumerate(numbers))
    sheet = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="{_S}">'
        f'<sheetData><row r="1">{row1}</row><row r="2">{row2}</row></sheetData></worksheet>'
    )
    override = (
        '<Override PartName="/xl/workbook.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    )
    parts = {
        "[Content_Types].xml": _CONTENT_TYPES.format(overrides=override),
        "xl/workbook.xml": f'<workbook xmlns="{_S}"><sheets/></workbook>',
        "xl/worksheets/sheet1.xml": sheet,
    }
    if strings:  # Excel writes no shared strings table without strings
        parts["xl/sharedStrings.xml"] = f'<sst xmlns="{_S}" count="{len(strings)}">{shared}</sst>'
    return _zip(parts)


def _zip(parts: dict[str, str | bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in parts.items():
            z.writestr(name, body)
    return out.getvalue()


PDF_TYPE = ("application", "pdf")
DOCX_TYPE = ("application", "vnd.openxmlformats-officedocument.wordprocessingml.document")
XLSX_TYPE = ("application", "vnd.openxmlformats-officedocument.spreadsheetml.sheet")


def with_attachment(
    data: bytes, kind: tuple[str, str], filename: str | None = "results.pdf"
) -> bytes:
    """A message whose text says nothing sensitive, with this attachment."""
    message = EmailMessage()
    message["From"] = "dr@clinic.test"
    message["To"] = "pat@example.test"
    message["Subject"] = "Your documents"
    message.set_content("Please find the document attached.")
    message.add_attachment(data, maintype=kind[0], subtype=kind[1], filename=filename)
    return message.as_bytes()


def slow_pdf() -> bytes:
    """A one-page PDF of 7 KB that pypdf takes seconds to read: its content stream
    is 3.5 MB (compressed) of operators that draw nothing before its line of text."""
    return pdf([["Appointment reminder"]], drawing=b"1 0 0 1 0 0 cm " * 233_000)
