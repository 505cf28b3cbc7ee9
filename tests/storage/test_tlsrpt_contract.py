"""The TLS-RPT store's contract on SQLite and on a real PostgreSQL server: the counts
of every node add up (a second connection, as another node, adds to the same rows);
a report is claimed by one node only; what was claimed is no longer due; POSTs to
retry are found again; old days are pruned."""

from __future__ import annotations

from gateway.tlsrpt.model import Failure, ReportPolicy, ResultType
from gateway.tlsrpt.store import TlsRptStore

STS = ReportPolicy("dest.test", "sts", ("version: STSv1", "mode: enforce"), ("mx1.dest.test",))
BAD = Failure(ResultType.CERTIFICATE_EXPIRED, "mx1.dest.test", "127.0.0.5")


def test_counts_of_two_nodes_add_up_by_day_domain_policy_and_failure(connect):
    one, two = TlsRptStore(connect()), TlsRptStore(connect())
    one.add([("2026-11-30", "dest.test", STS.key(), None, 3)])
    one.add([("2026-11-30", "dest.test", STS.key(), BAD, 1)])
    two.add(
        [
            ("2026-11-30", "dest.test", STS.key(), None, 2),
            ("2026-11-30", "dest.test", STS.key(), BAD, 4),
            ("2026-12-01", "dest.test", STS.key(), None, 7),
            ("2026-11-30", "other.test", STS.key(), None, 1),
        ]
    )
    counts = one.counts("2026-11-30")
    assert counts["dest.test"] == {STS.key(): (5, {BAD: 5})}
    assert set(counts) == {"dest.test", "other.test"}
    assert two.counts("2026-11-30", "other.test") == {"other.test": {STS.key(): (1, {})}}
    assert one.counts("2026-12-01")["dest.test"][STS.key()][0] == 7


def test_a_report_is_claimed_once_and_is_then_no_longer_due(connect):
    one, two = TlsRptStore(connect()), TlsRptStore(connect())
    one.add([("2026-11-30", "dest.test", STS.key(), None, 1)])
    one.add([("2026-12-01", "dest.test", STS.key(), None, 1)])
    assert one.due("2026-12-01") == [("2026-11-30", "dest.test")]
    assert one.claim("2026-11-30", "dest.test", "node-a", "r1@x", 1.0)
    assert not two.claim("2026-11-30", "dest.test", "node-b", "r2@x", 2.0)
    assert two.due("2026-12-01") == []
    assert two.due("2026-12-02") == [("2026-12-01", "dest.test")]
    (report,) = two.reports("2026-11-30")
    assert report["node"] == "node-a" and report["report_id"] == "r1@x"
    assert report["state"] == "sending"


def test_reports_to_retry_are_found_until_settled(connect):
    store = TlsRptStore(connect())
    store.add([("2026-11-30", "dest.test", STS.key(), None, 1)])
    store.claim("2026-11-30", "dest.test", "node-a", "r1@x", 1.0)
    detail = {"report_id": "r1@x", "posts": {"https://r.test/": "HTTP 503"}, "next_try": 5}
    store.settle("2026-11-30", "dest.test", "retry", detail)
    assert TlsRptStore(connect()).retrying() == [("2026-11-30", "dest.test", detail)]
    store.settle("2026-11-30", "dest.test", "sent", detail)
    assert store.retrying() == []


def test_days_before_the_kept_ones_are_pruned(connect):
    store = TlsRptStore(connect())
    store.add([("2026-11-01", "dest.test", STS.key(), None, 1)])
    store.add([("2026-11-20", "dest.test", STS.key(), None, 1)])
    store.claim("2026-11-01", "dest.test", "node-a", "r1@x", 1.0)
    store.prune("2026-11-10")
    assert store.counts("2026-11-01") == {} and store.reports("2026-11-01") == []
    assert store.counts("2026-11-20") != {}
