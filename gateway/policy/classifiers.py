"""Content classifiers: count likely PHI in a message's text.

A classifier is a set of built-in detectors and custom regular expressions with a
threshold; it matches a message when the matches it counts, over the subject, every
text part and every text attachment (``text/*``, also inside attached messages), reach
the threshold.  Built-in detectors (US formats, tuned against false positives):

- ``ssn``: US Social Security numbers, ``123-45-6789`` or ``123 45 6789`` (area 000,
  666 and 9xx, group 00 and serial 0000 never occur), or nine digits right after
  "SSN" / "social security number";
- ``mrn``: medical record numbers after "MRN" / "medical record number" / "med rec #";
- ``icd10``: ICD-10(-CM) codes with a decimal part (``E11.9``, ``S72.001A``), or
  without one right after "ICD-10", "diagnosis" or "dx";
- ``dob``: a date right after "DOB" / "date of birth" / "born", or a date within 60
  characters after a labelled name ("Patient: Jane Doe").

Attached documents are read too: PDF, DOCX and XLSX (`gateway.policy.documents`).
One that cannot be read (a password, damage, too much text, longer than ``scan_time``)
counts as matching every classifier when the policy says ``unreadable: sensitive``
(the default), and as no text with ``unreadable: ignore``.

Text is scanned up to ``scan_limit`` characters; a message with more, or one that
cannot be parsed, counts as matching every classifier (an error means the most secure
outcome, never "no PHI").
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.policy.documents import Unreadable, document_kind, document_text

SENSITIVE, IGNORE = "sensitive", "ignore"  # what an unreadable document counts as
DEFAULT_SCAN_TIME = 5.0  # seconds to read one message's documents

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{2}-\d{2}"
    rf"|{_MONTH}\s+\d{{1,2}},?\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}})"
)

# Each detector: regular expressions, each with the words (lower case) one of which must
# occur in the text for the expression to be tried at all - a substring search runs at
# C speed, a regular expression pass over 50 KB of text costs about a millisecond.
Detector = tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]
DETECTORS: dict[str, Detector] = {
    "ssn": (
        (re.compile(r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b"), ()),
        (
            re.compile(
                r"(?i)\b(?:ssn|social\s+security(?:\s+(?:no\.?|number|#))?)\W{0,5}"
                r"(?!000|666|9\d\d)\d{9}\b"
            ),
            ("ssn", "social"),
        ),
    ),
    "mrn": (
        (
            re.compile(
                r"(?i)\b(?:mrn|medical\s+record\s*(?:no\.?|number|#)?|med\.?\s*rec\.?\s*(?:no\.?|#)?)"
                r"\s*[:#]?\s*[a-z]{0,3}-?\d{5,12}\b"
            ),
            ("mrn", "record", "rec"),
        ),
    ),
    "icd10": (
        (re.compile(r"\b[A-TV-Z]\d[0-9AB]\.[0-9A-TV-Z]{1,4}\b"), ()),
        (
            re.compile(
                r"(?i)\b(?:icd-?10(?:-cm)?|diagnosis|dx)\W{0,10}[A-TV-Z]\d[0-9AB]\b(?!\.\w)"
            ),
            ("icd", "diagnosis", "dx"),
        ),
    ),
    "dob": (
        (
            re.compile(
                rf"(?i)\b(?:dob|d\.o\.b\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?)\W{{0,5}}{_DATE}"
            ),
            ("dob", "d.o.b", "birth", "born"),
        ),
        (
            re.compile(
                rf"(?i:\b(?:patient|pt|name)\s*:)\s*[A-Z][a-z]+(?:\s+[A-Z]\.?)?\s+[A-Z][a-z]+"
                rf"[^\n]{{0,60}}?(?i:{_DATE})"
            ),
            ("patient", "pt", "name"),
        ),
    ),
}


@dataclass(frozen=True)
class Classifier:
    name: str
    detectors: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    threshold: int

    def count(self, texts: list[str]) -> int:
        total = 0
        regexes = [r for d in self.detectors for r in DETECTORS[d]]
        regexes += [(p, ()) for p in self.patterns]
        for text in texts:
            lower = text.lower()
            for regex, words in regexes:
                if not words or any(w in lower for w in words):
                    total += sum(1 for _ in regex.finditer(text))
        return total


@dataclass(frozen=True)
class ClassifierResult:
    count: int
    threshold: int
    error: str = ""

    @property
    def matched(self) -> bool:
        return bool(self.error) or self.count >= self.threshold


def message_texts(
    data: bytes, limit: int, unreadable: str = SENSITIVE, scan_time: float = DEFAULT_SCAN_TIME
) -> list[str]:
    """The subject, every text part's decoded content and the text of every attached
    PDF, DOCX and XLSX; ValueError when there is more text than ``limit`` characters,
    the message cannot be read, or (``unreadable: sensitive``) a document cannot be
    read within ``scan_time`` seconds for all of them."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    subject = str(message.get("subject", ""))
    if "=?" in subject:
        subject = str(email.header.make_header(email.header.decode_header(subject)))
    texts = [subject]
    size = len(subject)
    deadline = time.monotonic() + scan_time
    for number, part in enumerate(_leaf_parts(message), 1):
        payload = part.get_payload(decode=True)  # transfer encoding undone, leniently
        if not isinstance(payload, bytes):
            continue
        if part.get_content_maintype() == "text":
            try:
                text = payload.decode(part.get_content_charset() or "us-ascii", "replace")
            except LookupError:  # a charset Python does not know: read it as UTF-8
                text = payload.decode("utf-8", "replace")
        else:
            kind = document_kind(part.get_content_type(), part.get_filename(), payload[:8])
            if kind is None:
                continue  # images, archives, ...: not read
            try:
                text = document_text(kind, payload, limit - size, deadline)
            except Unreadable as e:
                if unreadable == IGNORE:
                    continue
                # the part's number, never its file name (names can carry PHI)
                raise ValueError(f"part {number} unreadable: {e}") from None
        size += len(text)
        if size > limit:
            raise ValueError(f"more than {limit} characters of text to scan")
        texts.append(text)
    return texts


def _leaf_parts(message: email.message.Message) -> Iterator[email.message.Message]:
    for part in message.walk():
        if not part.is_multipart():
            yield part


def classify(
    classifiers: dict[str, Classifier],
    data: bytes,
    limit: int,
    unreadable: str = SENSITIVE,
    scan_time: float = DEFAULT_SCAN_TIME,
) -> dict[str, ClassifierResult]:
    if not classifiers:
        return {}
    try:
        texts = message_texts(data, limit, unreadable, scan_time)
    except Exception as e:  # noqa: BLE001 - any failure means "assume PHI"
        why = f"{type(e).__name__}: {str(e)[:200]}"
        return {n: ClassifierResult(0, c.threshold, why) for n, c in classifiers.items()}
    results = {}
    for name, classifier in classifiers.items():
        try:
            results[name] = ClassifierResult(classifier.count(texts), classifier.threshold)
        except Exception as e:  # noqa: BLE001
            results[name] = ClassifierResult(0, classifier.threshold, type(e).__name__)
    return results
