"""RFC 8460's report format (4.4) as a JSON Schema, and a reader of mailed reports."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from typing import Any

import jsonschema

DATETIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
COUNT = {"type": "integer", "minimum": 0}
TEXT = {"type": "string", "minLength": 1}

RESULT_TYPES = [
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
]

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": TEXT,
        "date-range": {
            "type": "object",
            "required": ["start-datetime", "end-datetime"],
            "properties": {
                "start-datetime": {"type": "string", "pattern": DATETIME},
                "end-datetime": {"type": "string", "pattern": DATETIME},
            },
            "additionalProperties": False,
        },
        "contact-info": TEXT,
        "report-id": TEXT,
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["policy", "summary"],
                "additionalProperties": False,
                "properties": {
                    "policy": {
                        "type": "object",
                        "required": ["policy-type", "policy-domain"],
                        "additionalProperties": False,
                        "properties": {
                            "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                            "policy-string": {"type": "array", "items": {"type": "string"}},
                            "policy-domain": TEXT,
                            "mx-host": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "summary": {
                        "type": "object",
                        "required": [
                            "total-successful-session-count",
                            "total-failure-session-count",
                        ],
                        "additionalProperties": False,
                        "properties": {
                            "total-successful-session-count": COUNT,
                            "total-failure-session-count": COUNT,
                        },
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["result-type", "failed-session-count"],
                            "additionalProperties": False,
                            "properties": {
                                "result-type": {"enum": RESULT_TYPES},
                                "sending-mta-ip": TEXT,
                                "receiving-mx-hostname": TEXT,
                                "receiving-mx-helo": TEXT,
                                "receiving-ip": TEXT,
                                "failed-session-count": COUNT,
                                "additional-information": TEXT,
                                "failure-reason-code": TEXT,
                            },
                        },
                    },
                },
            },
        },
    },
    "additionalProperties": False,
}


def check_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report, after checking it against RFC 8460's format (and that its summary
    adds up: the failures counted are the failure details' sum)."""
    jsonschema.validate(report, SCHEMA)
    for entry in report["policies"]:
        details = sum(d["failed-session-count"] for d in entry.get("failure-details", []))
        assert entry["summary"]["total-failure-session-count"] == details
    return report


def read_mailed(data: bytes) -> tuple[email.message.EmailMessage, str, dict[str, Any]]:
    """A mailed report: the message, the attachment's file name and the report."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    (part,) = [p for p in message.iter_attachments() if p.get_content_type().startswith("app")]
    assert part.get_content_type() == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(part.get_payload(decode=True)))
    return message, str(part.get_filename()), check_report(report)
