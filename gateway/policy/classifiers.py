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

Text is scanned up to ``scan_limit`` characters; a message with more, or one that
cannot be parsed, counts as matching every classifier (an error means the most secure
outcome, never "no PHI").
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{2}-\d{2}"
    rf"|{_MONTH}\s+\d{{1,2}},?\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}})"
)

DETECTORS: dict[str, tuple[re.Pattern[str], ...]] = {
    "ssn": (
        re.compile(r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b"),
        re.compile(
            r"(?i)\b(?:ssn|social\s+security(?:\s+(?:no\.?|number|#))?)\W{0,5}"
            r"(?!000|666|9\d\d)\d{9}\b"
        ),
    ),
    "mrn": (
        re.compile(
            r"(?i)\b(?:mrn|medical\s+record\s*(?:no\.?|number|#)?|med\.?\s*rec\.?\s*(?:no\.?|#)?)"
            r"\s*[:#]?\s*[a-z]{0,3}-?\d{5,12}\b"
        ),
    ),
    "icd10": (
        re.compile(r"\b[A-TV-Z]\d[0-9AB]\.[0-9A-TV-Z]{1,4}\b"),
        re.compile(r"(?i)\b(?:icd-?10(?:-cm)?|diagnosis|dx)\W{0,10}[A-TV-Z]\d[0-9AB]\b(?!\.\w)"),
    ),
    "dob": (
        re.compile(
            rf"(?i)\b(?:dob|d\.o\.b\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?)\W{{0,5}}{_DATE}"
        ),
        re.compile(
            rf"(?i:\b(?:patient|pt|name)\s*:)\s*[A-Z][a-z]+(?:\s+[A-Z]\.?)?\s+[A-Z][a-z]+"
            rf"[^\n]{{0,60}}?(?i:{_DATE})"
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
        regexes = [p for d in self.detectors for p in DETECTORS[d]] + list(self.patterns)
        for text in texts:
            for regex in regexes:
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


def message_texts(data: bytes, limit: int) -> list[str]:
    """The subject and every text part's decoded content; ValueError when there is
    more text than ``limit`` characters or the message cannot be read."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    texts = [str(message.get("subject", ""))]
    size = len(texts[0])
    for part in _text_parts(message):
        try:
            text = part.get_content()
        except (LookupError, ValueError, AssertionError):  # unknown charset, bad encoding
            payload = part.get_payload(decode=True)
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if not isinstance(text, str):
            continue
        size += len(text)
        if size > limit:
            raise ValueError(f"more than {limit} characters of text to scan")
        texts.append(text)
    return texts


def _text_parts(message: email.message.Message) -> Iterator[email.message.EmailMessage]:
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        assert isinstance(part, email.message.EmailMessage)
        yield part


def classify(
    classifiers: dict[str, Classifier], data: bytes, limit: int
) -> dict[str, ClassifierResult]:
    if not classifiers:
        return {}
    try:
        texts = message_texts(data, limit)
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
