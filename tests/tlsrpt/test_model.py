"""The pieces of a TLS report: the domain's _smtp._tls record (RFC 8460 3), the report
in RFC 8460's JSON format, the policies sessions are counted under, and a tally that
keeps its counts when they cannot be written."""

from __future__ import annotations

import datetime

import pytest

from gateway.probe.mta_sts import StsMode, StsPolicy, StsResult, StsSource
from gateway.tlsrpt.model import (
    Failure,
    Reporter,
    ReportPolicy,
    ResultType,
    Tally,
    parse_record,
    report_json,
    sts_policy,
)
from tests.support.tlsrpt import check_report

REPORTER = Reporter("Clinic Example", "tls-admin@clinic.test")
DAY = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("txt", "rua"),
    [
        ("v=TLSRPTv1; rua=mailto:reports@example.com", ["mailto:reports@example.com"]),
        (
            "v=TLSRPTv1;rua=https://r.example.com/v1, mailto:a@example.com",
            ["https://r.example.com/v1", "mailto:a@example.com"],
        ),
        ("v=TLSRPTv1; ext=1; rua=mailto:a@example.com;", ["mailto:a@example.com"]),
        ("v=TLSRPTv1; rua=ftp://x.example,mailto:a@example.com", ["mailto:a@example.com"]),
    ],
)
def test_a_record_gives_its_usable_rua_uris(txt, rua):
    assert parse_record(txt) == rua


@pytest.mark.parametrize(
    "txt",
    [
        "v=TLSRPTv2; rua=mailto:a@example.com",
        "rua=mailto:a@example.com; v=TLSRPTv1",  # the version comes first
        "v=TLSRPTv1;",
        "v=TLSRPTv1; rua=ftp://x.example",
    ],
)
def test_a_record_without_a_usable_rua_is_refused(txt):
    with pytest.raises(ValueError):
        parse_record(txt)


def test_a_days_tally_becomes_a_report_in_rfc_8460s_format():
    sts = sts_policy("dest.test", StsPolicy(StsMode.TESTING, 604800, ("*.dest.test",)))
    tlsa = ReportPolicy("dest.test", "tlsa", ("3 1 1 " + "ab" * 32,))
    expired = Failure(ResultType.CERTIFICATE_EXPIRED, "mx1.dest.test", "127.0.0.5")
    tally = Tally()
    for _ in range(3):
        tally.add(sts, None, DAY)
    tally.add(sts, expired, DAY)
    tally.add(sts, expired, DAY)
    tally.add(tlsa, Failure(ResultType.TLSA_INVALID, "mx2.dest.test", "127.0.0.6"), DAY)
    tally.add(sts, None, DAY + datetime.timedelta(days=1))  # another day
    rows = tally.drain()
    assert not tally
    policies: dict[str, tuple[int, dict[Failure, int]]] = {}
    for day, domain, key, failure, n in rows:
        if day != "2026-11-30":
            continue
        assert domain == "dest.test"
        ok, failed = policies.get(key, (0, {}))
        if failure is None:
            ok += n
        else:
            failed[failure] = n
        policies[key] = (ok, failed)
    report = check_report(report_json(REPORTER, "2026-11-30", "r1@clinic.test", policies))
    by_type = {p["policy"]["policy-type"]: p for p in report["policies"]}
    assert by_type["sts"]["policy"]["policy-string"] == [
        "version: STSv1",
        "mode: testing",
        "mx: *.dest.test",
        "max_age: 604800",
    ]
    assert by_type["sts"]["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 2,
    }
    assert by_type["tlsa"]["policy"]["policy-string"] == ["3 1 1 " + "ab" * 32]
    assert by_type["tlsa"]["failure-details"][0]["result-type"] == "tlsa-invalid"


def test_counts_that_could_not_be_written_are_kept_for_the_next_flush():
    sts = sts_policy("dest.test", StsPolicy(StsMode.ENFORCE, 60, ("mx.dest.test",)))
    tally = Tally()
    tally.add(sts, None, DAY)
    tally.add(sts, Failure(ResultType.VALIDATION_FAILURE, "mx.dest.test"), DAY)
    rows = tally.drain()
    tally.restore(rows)
    tally.add(sts, None, DAY)
    again = {(f, n) for *_, f, n in tally.drain()}
    assert again == {(None, 2), (Failure(ResultType.VALIDATION_FAILURE, "mx.dest.test"), 1)}


def test_a_policy_that_could_not_be_fetched_is_counted_once_per_attempt(tmp_path):
    from gateway.config import Config
    from gateway.observability.metrics import Metrics
    from gateway.tlsrpt.service import TlsRptService

    service = TlsRptService(
        Config(state_dir=tmp_path), "gw.test", Metrics(), None, None, lambda: None
    )
    failed = StsResult(
        "dest.test", None, StsSource.NONE, detail="HTTP 404", failure="sts-policy-fetch-error"
    )
    observed = service.observe("dest.test", failed)
    assert observed.sts is None  # no policy: its sessions are not counted
    ((day, domain, key, failure, n),) = service.tally.drain()
    assert (domain, ReportPolicy.from_key(key).kind, n) == ("dest.test", "sts", 1)
    assert failure == Failure(ResultType.STS_POLICY_FETCH_ERROR)
    testing = StsResult(
        "dest.test", StsPolicy(StsMode.TESTING, 60, ("mx.dest.test",)), StsSource.CACHED, "x"
    )
    observed = service.observe("dest.test", testing)
    assert observed.testing and observed.sts is not None and not service.tally
    none = StsResult("dest.test", StsPolicy(StsMode.NONE, 60, ()), StsSource.CACHED, "x")
    assert service.observe("dest.test", none).sts is None
