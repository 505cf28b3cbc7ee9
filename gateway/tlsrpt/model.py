"""model - TLS-RPT's counts and reports (RFC 8460 4 and 5).

A session is counted under the policy that governed it: the MX host's TLSA records
(``tlsa``, DANE outranks MTA-STS) or the domain's MTA-STS policy (``sts``, in
``enforce`` or ``testing`` mode).  A session that established TLS as the policy
requires is a success; one that failed is a failure of one of the RFC's result
types, with the MX host and address.  Only sessions on new connections count (a
reused one was counted when it was made), as in Postfix's TLSRPT support.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import gzip
import json
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.crypto.mime import base64_body
from gateway.events import TlsFailure

if TYPE_CHECKING:  # (names for the annotations: the probes' modules load aiohttp and
    # dnspython's resolver, which the command line's reading of a store does not need)
    from gateway.probe.dane import Tlsa
    from gateway.probe.mta_sts import StsPolicy

REPORT_MEDIA_TYPE = "application/tlsrpt+gzip"


class ResultType(enum.StrEnum):
    """RFC 8460 4.3: why a session failed."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


_OF_TLS_FAILURE = {
    TlsFailure.NOT_OFFERED: ResultType.STARTTLS_NOT_SUPPORTED,
    TlsFailure.HANDSHAKE: ResultType.VALIDATION_FAILURE,
    TlsFailure.UNTRUSTED: ResultType.CERTIFICATE_NOT_TRUSTED,
    TlsFailure.NAME_MISMATCH: ResultType.CERTIFICATE_HOST_MISMATCH,
    TlsFailure.EXPIRED: ResultType.CERTIFICATE_EXPIRED,
    TlsFailure.DANE_MISMATCH: ResultType.TLSA_INVALID,
}


def result_type_of(failure: TlsFailure) -> ResultType:
    return _OF_TLS_FAILURE[failure]


@dataclass(frozen=True)
class ReportPolicy:
    """RFC 8460 4.4's ``policy`` object: what a session was held to."""

    domain: str
    kind: str  # "sts" or "tlsa"
    strings: tuple[str, ...] = ()  # the policy's text lines, or the TLSA records
    mx_host: tuple[str, ...] = ()  # an MTA-STS policy's MX patterns

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"policy-type": self.kind, "policy-domain": self.domain}
        if self.strings:
            found["policy-string"] = list(self.strings)
        if self.mx_host:
            found["mx-host"] = list(self.mx_host)
        return found

    def key(self) -> str:
        """Its canonical JSON: how the store tells policies apart."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> ReportPolicy:
        found = json.loads(key)
        return cls(
            found["policy-domain"],
            found["policy-type"],
            tuple(found.get("policy-string", ())),
            tuple(found.get("mx-host", ())),
        )


def sts_policy(domain: str, policy: StsPolicy | None) -> ReportPolicy:
    """An MTA-STS policy as reported: its lines as the policy file has them (none
    when it could not be fetched)."""
    if policy is None:
        return ReportPolicy(domain, "sts")
    lines = ["version: STSv1", f"mode: {policy.mode.value}"]
    lines += [f"mx: {mx}" for mx in policy.mx]
    lines.append(f"max_age: {policy.max_age}")
    return ReportPolicy(domain, "sts", tuple(lines), policy.mx)


def tlsa_policy(domain: str, records: Iterable[Tlsa]) -> ReportPolicy:
    """An MX host's TLSA RRset as reported (the policy domain is the recipient
    domain; RFC 8460 4.4 lists the records in presentation form)."""
    texts = tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)
    return ReportPolicy(domain, "tlsa", texts)


@dataclass(frozen=True)
class Failure:
    """One kind of failed session (the fields of a ``failure-details`` entry)."""

    result: ResultType
    mx: str = ""
    ip: str = ""
    reason: str = ""  # failure-reason-code: our words for it, short


@dataclass
class Tally:
    """Sessions counted since the last flush, by UTC day and policy (in memory:
    delivery adds to it without waiting; `gateway.tlsrpt.service` writes it out)."""

    _counts: dict[tuple[str, str], tuple[list[int], dict[Failure, int]]] = field(
        default_factory=dict
    )

    def add(
        self, policy: ReportPolicy, failure: Failure | None, now: datetime.datetime | None = None
    ) -> None:
        day = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d")
        self._add(day, policy.key(), failure, 1)

    def _add(self, day: str, key: str, failure: Failure | None, sessions: int) -> None:
        entry = self._counts.get((day, key))
        if entry is None:
            entry = self._counts[(day, key)] = ([0], defaultdict(int))
        if failure is None:
            entry[0][0] += sessions
        else:
            entry[1][failure] += sessions

    def restore(self, rows: list[tuple[str, str, str, Failure | None, int]]) -> None:
        """Take back what `drain` gave (it could not be written)."""
        for day, _domain, key, failure, sessions in rows:
            self._add(day, key, failure, sessions)

    def __bool__(self) -> bool:
        return bool(self._counts)

    def drain(self) -> list[tuple[str, str, str, Failure | None, int]]:
        """Every count as (day, domain, policy key, failure or None, sessions), and
        the tally empty."""
        rows: list[tuple[str, str, str, Failure | None, int]] = []
        for (day, key), (ok, failed) in self._counts.items():
            domain = json.loads(key)["policy-domain"]
            if ok[0]:
                rows.append((day, domain, key, None, ok[0]))
            rows += [(day, domain, key, f, n) for f, n in failed.items()]
        self._counts = {}
        return rows


@dataclass(frozen=True)
class Observation:
    """What delivery to one domain counts: the domain, its MTA-STS policy when it
    has one in ``enforce`` or ``testing`` mode, and where a counted session goes."""

    domain: str
    sts: ReportPolicy | None
    testing: bool  # the MTA-STS policy only asks to be told (RFC 8461 5)
    count: Callable[[ReportPolicy, Failure | None], None]


# -- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reporter:
    """Who sends the reports (``tlsrpt.organization``, ``tlsrpt.contact``)."""

    organization: str
    contact: str  # an address: contact-info, and From of the mailed reports

    @property
    def submitter(self) -> str:
        """The reporting domain (RFC 8460 5.3's Submitter): the contact's."""
        return self.contact.rpartition("@")[2]


def report_json(
    reporter: Reporter,
    day: str,
    report_id: str,
    policies: dict[str, tuple[int, dict[Failure, int]]],
) -> dict[str, Any]:
    """The report of one domain for one UTC day (RFC 8460 4.4); ``policies``: by
    policy key, the successful sessions and the failed ones by kind."""
    entries = []
    for key in sorted(policies):
        ok, failed = policies[key]
        entry: dict[str, Any] = {
            "policy": ReportPolicy.from_key(key).to_json(),
            "summary": {
                "total-successful-session-count": ok,
                "total-failure-session-count": sum(failed.values()),
            },
        }
        details = []
        for f in sorted(failed, key=lambda f: (f.result, f.mx, f.ip, f.reason)):
            detail: dict[str, Any] = {"result-type": f.result.value}
            if f.ip:
                detail["receiving-ip"] = f.ip
            if f.mx:
                detail["receiving-mx-hostname"] = f.mx
            detail["failed-session-count"] = failed[f]
            if f.reason:
                detail["failure-reason-code"] = f.reason
            details.append(detail)
        if details:
            entry["failure-details"] = details
        entries.append(entry)
    return {
        "organization-name": reporter.organization,
        "date-range": {
            "start-datetime": f"{day}T00:00:00Z",
            "end-datetime": f"{day}T23:59:59Z",
        },
        "contact-info": reporter.contact,
        "report-id": report_id,
        "policies": entries,
    }


def new_report_id(day: str, domain: str, submitter: str) -> str:
    return f"{day}.{domain}.{secrets.token_hex(8)}@{submitter}"


def gzipped(report: dict[str, Any]) -> bytes:
    text = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    return gzip.compress(text, mtime=0)


def _day_bounds(day: str) -> tuple[int, int]:
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return int(start.timestamp()), int(start.timestamp()) + 86399


def filename(reporter: Reporter, domain: str, day: str, report_id: str) -> str:
    """RFC 8460 5.1: submitter!policy-domain!begin!end!unique-id.json.gz"""
    begin, end = _day_bounds(day)
    unique = report_id.split("@")[0].rsplit(".", 1)[-1]
    return f"{reporter.submitter}!{domain}!{begin}!{end}!{unique}.json.gz"


def report_mail(
    reporter: Reporter,
    domain: str,
    day: str,
    report_id: str,
    compressed: bytes,
    to: list[str],
    hostname: str,
) -> bytes:
    """The report as a mail (RFC 8460 5.3): multipart/report of type tlsrpt, a
    line of text and the gzipped JSON.  ``TLS-Required: No`` (RFC 8689 5): a report
    about a broken TLS setup must get through it."""
    boundary = f"=_tlsrpt_{secrets.token_hex(12)}"
    name = filename(reporter, domain, day, report_id)
    encoded = base64_body(compressed).decode()
    head = [
        f"From: {reporter.contact}",
        *([f"To: {', '.join(to)}"] if to else []),
        f"Subject: Report Domain: {domain} Submitter: {reporter.submitter} "
        f"Report-ID: <{report_id}>",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Message-ID: <{report_id}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {reporter.submitter}",
        "TLS-Required: No",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
    ]
    text = (
        f"This is an aggregate TLS report from {reporter.organization} ({hostname}) "
        f"for {domain}, for {day} (UTC)."
    )
    parts = [
        f"--{boundary}",
        'Content-Type: text/plain; charset="us-ascii"',
        "",
        text,
        "",
        f"--{boundary}",
        f'Content-Type: {REPORT_MEDIA_TYPE}; name="{name}"',
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"',
        "",
        encoded.rstrip("\r\n"),
        f"--{boundary}--",
        "",
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(parts)).encode("ascii")


# -- the domain's record ----------------------------------------------------------------


def parse_record(txt: str) -> list[str]:
    """The ``rua`` URIs of a ``v=TLSRPTv1`` TXT record (RFC 8460 3): ``mailto:`` and
    ``https:`` ones, in order; ValueError when it is not such a record."""
    fields = [f.strip() for f in txt.split(";")]
    if not fields or fields[0].replace(" ", "") != "v=TLSRPTv1":
        raise ValueError("not a v=TLSRPTv1 record")
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "rua":
            uris = [u.strip() for u in value.split(",") if u.strip()]
            usable = [u for u in uris if u.lower().startswith(("mailto:", "https://"))]
            if usable:
                return usable
            raise ValueError("rua has no mailto: or https: URI")
    raise ValueError("the record has no rua")
