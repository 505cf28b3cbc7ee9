"""Message features: what the policy reads from the message itself - its header
fields, its subject (and the subject tags in it) and the content classifiers' counts.
Computed once per message, whatever the number of recipients.  Pure computation;
`strip_subject_tags` makes the copy that is delivered without the tags.
"""

from __future__ import annotations

import email.header
import re
from dataclasses import dataclass, field

from gateway.policy.classifiers import ClassifierResult, classify
from gateway.policy.language import Policy

# A header field (RFC 5322 2.2): name, colon, value with its folded continuation lines.
_FIELD = re.compile(rb"^([!-9;-~]+):[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r?\n", re.M)


@dataclass(frozen=True)
class Features:
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # lower-case names
    subject: str = ""
    content: dict[str, ClassifierResult] = field(default_factory=dict)
    error: str = ""  # the header block could not be read
    # a changed copy would be DKIM-signed by its From domain's key (dkim.keys);
    # None: not known (nobody asked the signing keys)
    dkim_key: bool | None = None


def message_features(policy: Policy, data: bytes) -> Features:
    """Read what ``policy`` looks at.  The classifiers run only when a rule uses them;
    a message that cannot be read counts as matching them (see `classify`)."""
    headers: dict[str, list[str]] = {}
    error = ""
    for match in _FIELD.finditer(data, 0, _header_end(data)):
        name = match.group(1).decode("ascii").lower()
        try:
            value = _decoded(match.group(2))
        except Exception as e:  # noqa: BLE001 - a header we cannot decode matches nothing
            error = f"{name}: {type(e).__name__}: {str(e)[:200]}"
            continue
        headers.setdefault(name, []).append(value)
    content = (
        classify(policy.classifiers, data, policy.scan_limit, policy.unreadable, policy.scan_time)
        if policy.reads_content
        else {}
    )
    subject = headers.get("subject", [""])[0]
    return Features({k: tuple(v) for k, v in headers.items()}, subject, content, error)


def _decoded(raw: bytes) -> str:
    """A field value unfolded, with RFC 2047 encoded words decoded."""
    value = raw.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
    if "=?" in value:
        value = str(email.header.make_header(email.header.decode_header(value)))
    return value.strip()


def _header_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def _utf8(text: str) -> bool:
    """No lone surrogates: no bytes that were not UTF-8 (decoded with surrogateescape)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def has_tag(subject: str, tag: str) -> bool:
    return tag.lower() in subject.lower()


def strip_subject_tags(data: bytes, tags: tuple[str, ...]) -> bytes:
    """The message with ``tags`` removed from its Subject (case-insensitive), the rest
    byte for byte as it was.  The new Subject is one line, RFC 2047-encoded when it
    is not ASCII."""
    end = _header_end(data)
    head = data[:end]
    match = re.search(rb"(?im)^subject:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n", head)
    if match is None or not tags:
        return data
    raw = match.group(0)[len(b"subject:") :].decode("utf-8", "surrogateescape")
    value = str(email.header.make_header(email.header.decode_header(raw.replace("\r\n", ""))))
    for tag in tags:
        value = re.sub(re.escape(tag), "", value, flags=re.IGNORECASE)
    value = re.sub(r"\s{2,}", " ", value).strip()
    if value.isascii():
        line = f"Subject: {value}\r\n".encode()
    elif not _utf8(value):  # raw bytes that are not UTF-8 (a client's Latin-1): as they came
        line = f"Subject: {value}\r\n".encode("utf-8", "surrogateescape")
    else:
        encoded = email.header.Header(value, "utf-8", header_name="Subject").encode(linesep="\r\n")
        line = f"Subject: {encoded}\r\n".encode()
    return head[: match.start()] + line + head[match.end() :] + data[end:]
