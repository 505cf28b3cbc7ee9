"""PHI in attachments: the classifiers read the text of attached PDF, DOCX and XLSX
files; a document that cannot be read (a password, damage, a zip that unpacks into
too much, longer than ``scan_time``) counts as matching with ``unreadable: sensitive``
(the default) and as no text with ``unreadable: ignore`` - and what is said about it
never names the file."""

from __future__ import annotations

import io
import os
import signal
import time
import zipfile

import pytest

from gateway.policy import documents
from gateway.policy.classifiers import Classifier, classify
from gateway.policy.language import PolicyError
from gateway.policy.language import load_policy_text as parse_policy
from tests.support.documents import (
    DOCX_TYPE,
    PDF_TYPE,
    XLSX_TYPE,
    docx,
    encrypted_pdf,
    pdf,
    slow_pdf,
    with_attachment,
    xlsx,
)

PHI = {"phi": Classifier("phi", ("ssn", "mrn", "icd10", "dob"), (), 1)}
LETTER = [["Lab results for your visit"], ["Patient SSN 123-45-6789", "Dx E11.9"]]
CLEAN = [["Appointment reminder"], ["Tuesday at 10:00, room 4"]]


def phi(data: bytes, **scan):
    return classify(PHI, data, 1_000_000, **scan)["phi"]


@pytest.mark.parametrize("compress", [True, False])
def test_a_pdf_with_an_ssn_matches_and_a_clean_one_does_not(compress):
    found = phi(with_attachment(pdf(LETTER, compress), PDF_TYPE))
    assert (found.count, found.matched, found.error) == (2, True, "")  # SSN, ICD-10
    clean = phi(with_attachment(pdf(CLEAN, compress), PDF_TYPE))
    assert (clean.count, clean.matched, clean.error) == (0, False, "")


def test_a_docx_with_an_ssn_split_over_two_runs_matches():
    document = docx([["Dear patient,"], ["your SSN 123-", "45-6789 is on file"]])
    found = phi(with_attachment(document, DOCX_TYPE, "letter.docx"))
    assert (found.count, found.error) == (1, "")
    assert not phi(with_attachment(docx([["Dear patient,"], ["see you"]]), DOCX_TYPE)).matched


def test_an_xlsx_is_read_from_its_shared_strings_and_cells():
    sheet = xlsx(["Name", "SSN", "Jane Doe", "123-45-6789"], [20240101, 7])
    found = phi(with_attachment(sheet, XLSX_TYPE, "list.xlsx"))
    assert (found.count, found.error) == (1, "")
    # the cells that point into the shared strings are not text of their own
    assert not phi(with_attachment(xlsx(["Name"], [5]), XLSX_TYPE, "list.xlsx")).matched
    # no strings at all: no shared strings table (as Excel writes it), still a workbook
    empty = phi(with_attachment(xlsx([], []), XLSX_TYPE, "n.xlsx"))
    assert (empty.matched, empty.error) == (False, "")


def test_a_zip_without_the_documents_main_part_is_unreadable():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("readme.txt", "not a workbook")
    found = phi(with_attachment(out.getvalue(), XLSX_TYPE, "a.xlsx"))
    assert found.matched and "not a XLSX (no xl/workbook.xml)" in found.error


def test_documents_are_found_by_file_name_or_first_bytes_when_the_type_says_nothing():
    octet = ("application", "octet-stream")
    assert phi(with_attachment(pdf(LETTER), octet, "scan.pdf")).count == 2
    assert phi(with_attachment(pdf(LETTER), octet, None)).count == 2  # "%PDF-"
    assert phi(with_attachment(docx([["SSN 123-45-6789"]]), octet, "a.docx")).count == 1
    # an image is not read, whatever it holds
    assert phi(with_attachment(b"\x89PNG 123-45-6789", ("image", "png"), "x.png")).count == 0


def test_a_password_protected_pdf_is_unreadable_and_counts_as_phi_unless_ignored():
    locked = with_attachment(encrypted_pdf(pdf(CLEAN), "s3cret"), PDF_TYPE, "Jane_Doe_labs.pdf")
    found = phi(locked)
    assert found.matched and found.count == 0
    assert found.error == "ValueError: part 2 unreadable: PDF encrypted with a password"
    assert "Jane" not in found.error  # the file name can carry PHI
    ignored = phi(locked, unreadable="ignore")
    assert (ignored.matched, ignored.error) == (False, "")


def test_a_pdf_that_opens_without_a_password_is_read():
    restricted = encrypted_pdf(pdf(LETTER), user_password="")  # owner password only
    found = phi(with_attachment(restricted, PDF_TYPE))
    assert (found.count, found.error) == (2, "")


@pytest.mark.parametrize(
    ("document", "kind", "why"),
    [
        (b"%PDF-1.7\n\x00\x01 broken", PDF_TYPE, "damaged PDF"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600, DOCX_TYPE, "DOCX encrypted"),
        (docx([["x"]])[:-40], DOCX_TYPE, "DOCX encrypted with a password or damaged"),
    ],
)
def test_damaged_and_encrypted_office_documents_are_unreadable(document, kind, why):
    found = phi(with_attachment(document, kind, "file"))
    assert found.matched and why in found.error
    assert not phi(with_attachment(document, kind, "file"), unreadable="ignore").matched


def test_a_document_that_unpacks_into_more_than_the_scan_allows_is_unreadable():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", b"<w:document>" + b" " * 5_000_000 + b"</w:document>")
    bomb = with_attachment(out.getvalue(), DOCX_TYPE, "a.docx")
    assert len(bomb) < 20_000
    found = classify(PHI, bomb, 100_000)["phi"]
    assert found.matched and "larger than the scan allows" in found.error


def test_a_document_longer_to_read_than_scan_time_is_unreadable():
    many = with_attachment(pdf([CLEAN[1]] * 50), PDF_TYPE)
    found = phi(many, scan_time=1e-9)
    assert found.matched and "took longer to read than the scan allows" in found.error
    assert not phi(many, scan_time=30).matched


def test_a_page_that_outlasts_scan_time_is_given_up_then_not_when_it_ends():
    # pypdf spends seconds on this one page (nothing between pages can cut it short):
    # its reader process is killed at the end of scan_time, and the document counts
    # as PHI; read in the daemon's own process it would have held the interpreter
    # lock for all that time and then been read as clean
    assert not phi(with_attachment(pdf(CLEAN), PDF_TYPE)).matched  # readers running
    started = time.monotonic()
    found = phi(with_attachment(slow_pdf(), PDF_TYPE), scan_time=1.0)
    took = time.monotonic() - started
    assert found.matched and "took longer to read than the scan allows" in found.error
    assert took < 1.0 + documents.GRACE + 1.5  # (read whole: 4-7 s on the test machine)
    assert not phi(with_attachment(pdf(CLEAN), PDF_TYPE)).matched  # a reader again
    assert not phi(with_attachment(slow_pdf(), PDF_TYPE), scan_time=60).matched  # in time


def test_a_reader_that_dies_is_started_again_and_its_document_is_unreadable():
    assert not phi(with_attachment(pdf(CLEAN), PDF_TYPE)).matched
    readers = [documents._free.get() for _ in range(documents.READERS)]
    try:
        for reader in readers:
            if reader._child is not None:
                os.kill(reader._child.pid, signal.SIGKILL)
                reader._child.wait()
    finally:
        for reader in readers:
            documents._free.put(reader)
    found = phi(with_attachment(pdf(LETTER), PDF_TYPE))  # started again: read
    assert (found.count, found.error) == (2, "")


def test_document_text_counts_toward_scan_limit():
    letter = with_attachment(pdf([["clean words " * 40]] * 5), PDF_TYPE)
    found = classify(PHI, letter, 1_000)["phi"]
    assert found.matched and "more than" in found.error


def test_the_policy_says_what_unreadable_counts_as_and_how_long_to_read():
    base = "version: 1\n"
    assert (parse_policy(base).unreadable, parse_policy(base).scan_time) == ("sensitive", 5.0)
    chosen = parse_policy(base + "unreadable: ignore\nscan_time: 2s\n")
    assert (chosen.unreadable, chosen.scan_time) == ("ignore", 2.0)
    with pytest.raises(PolicyError, match="unreadable.*'sensitive' \\(fail closed\\) or 'ignore'"):
        parse_policy(base + "unreadable: maybe\n")
    with pytest.raises(PolicyError, match="scan_time.*greater than zero"):
        parse_policy(base + "scan_time: 0s\n")
    with pytest.raises(PolicyError, match="scan_time: at most 5m"):
        parse_policy(base + "scan_time: 10m\n")
