"""Built-in PHI detectors and custom patterns, over real MIME structures."""

from __future__ import annotations

import re
from email.message import EmailMessage

import pytest

from gateway.policy.classifiers import Classifier, classify

ONE = {d: Classifier(d, (d,), (), 1) for d in ("ssn", "mrn", "icd10", "dob")}


def count(detector: str, text: str) -> int:
    return ONE[detector].count([text])


@pytest.mark.parametrize(
    ("detector", "text", "expected"),
    [
        ("ssn", "SSN 123-45-6789", 1),
        ("ssn", "ssn: 123 45 6789 and 234-56-7890", 2),
        ("ssn", "social security number 123456789", 1),
        ("ssn", "mixed separators 123-45 6789", 0),
        ("ssn", "area 000: 000-12-3456, 666-12-3456, 912-34-5678", 0),
        ("ssn", "group 00: 123-00-4567; serial 0000: 123-45-0000", 0),
        ("ssn", "order 123456789 shipped", 0),
        ("ssn", "phone 555-123-4567", 0),
        ("mrn", "MRN: 00123456", 1),
        ("mrn", "Medical Record Number #A1234567", 1),
        ("mrn", "med rec no. 7654321", 1),
        ("mrn", "MRN pending", 0),
        ("icd10", "Dx E11.9, follow up; also S72.001A", 2),
        ("icd10", "diagnosis: J45", 1),
        ("icd10", "room B12 and flight A320", 0),
        ("icd10", "version 1.2.3", 0),
        ("dob", "DOB: 03/14/1958", 1),
        ("dob", "date of birth 1958-03-14", 1),
        ("dob", "born on March 14, 1958", 1),
        ("dob", "Patient: Jane Q. Doe, seen 2024-01-02", 1),
        ("dob", "Name: Jane Doe (admitted 14 Mar 2024)", 1),
        ("dob", "meeting on 03/14/2025", 0),
        ("dob", "patient: pending", 0),
    ],
)
def test_built_in_detectors(detector, text, expected):
    assert count(detector, text) == expected


def mime_message() -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "Follow-up"
    msg.set_content("Nothing here.")
    msg.add_alternative("<p>MRN: 00123456</p>", subtype="html")
    msg.add_attachment(
        b"name,ssn\r\nJane,123-45-6789\r\n", maintype="text", subtype="csv", filename="list.csv"
    )
    msg.add_attachment(b"\x89PNG 123-45-6789", maintype="image", subtype="png", filename="scan.png")
    inner = EmailMessage()
    inner["Subject"] = "fwd"
    inner.set_content("DOB: 01/02/1960", charset="utf-8", cte="base64")
    msg.add_attachment(inner)
    return msg


def test_text_parts_text_attachments_and_attached_messages_are_scanned_binary_parts_not():
    data = mime_message().as_bytes()
    phi = {"phi": Classifier("phi", ("ssn", "mrn", "icd10", "dob"), (), 3)}
    result = classify(phi, data, 10_000)["phi"]
    # html MRN + csv SSN + base64 DOB in the attached message; the PNG's "SSN" is not text
    assert (result.count, result.matched, result.error) == (3, True, "")
    phi4 = {"phi": Classifier("phi", ("ssn", "mrn", "icd10", "dob"), (), 4)}
    assert not classify(phi4, data, 10_000)["phi"].matched


def test_the_subject_is_scanned_and_charsets_decoded():
    msg = EmailMessage()
    msg["Subject"] = "Résultats MRN 1234567"
    msg.set_content(
        "Geburtsdatum: DOB 1.2.1960 - Größe", charset="iso-8859-1", cte="quoted-printable"
    )
    result = classify({"c": Classifier("c", ("mrn", "dob"), (), 2)}, msg.as_bytes(), 10_000)["c"]
    assert result.count == 2


def test_custom_patterns_and_thresholds():
    c = Classifier("acct", (), (re.compile(r"\bACCT-\d{7}\b", re.I),), 3)
    two = b"Subject: x\r\n\r\nACCT-0000001 acct-0000002\r\n"
    three = b"Subject: x\r\n\r\nACCT-0000001 acct-0000002 ACCT-0000003\r\n"
    assert not classify({"a": c}, two, 10_000)["a"].matched
    assert classify({"a": c}, three, 10_000)["a"].matched


def test_more_text_than_the_scan_limit_counts_as_matching():
    c = {"phi": Classifier("phi", ("ssn",), (), 1)}
    data = b"Subject: x\r\n\r\n" + b"clean text " * 2000 + b"\r\n"
    result = classify(c, data, 1000)["phi"]
    assert result.matched and "more than 1000 characters" in result.error
    assert not classify(c, data, 100_000)["phi"].matched
