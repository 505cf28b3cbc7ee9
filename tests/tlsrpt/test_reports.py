"""TLS-RPT end to end: a domain with MTA-STS enforce and a _smtp._tls record, one
certificate failure and one session that worked during a day; the next day its report
(RFC 8460's JSON, checked against the format) goes to every rua: by mail through the
gateway's own queue - held to no TLS policy, not counted itself - and by HTTPS POST,
retried when the receiver fails; each node's counts add up and one report is sent;
every report is archived."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import re

import pytest

from gateway.tlsrpt import service
from gateway.tlsrpt.model import ReportPolicy
from gateway.tlsrpt.service import SEND_AFTER
from tests.conftest import free_port, leaf_files, run_sealgate
from tests.support.delivery import send, state
from tests.support.https import PolicyServer, SilentServer
from tests.support.tlsrpt import check_report, read_mailed
from tests.support.world import wait_until

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.dest.test\nmx: mx2.dest.test\nmax_age: 86400\n"


@pytest.fixture
async def servers():
    started: list[PolicyServer] = []
    yield started
    for server in started:
        await server.stop()


async def https_server(world, pki, tmp_path, servers, name, ip, **kwargs):
    leaf = pki.ca.issue_cert(name)
    chain, key = leaf_files(leaf, tmp_path, name)
    world.dns.add(name, "A", ip)
    server = await PolicyServer(ip, free_port(), (chain, key), **kwargs).start()
    servers.append(server)
    return server


async def a_day_at_dest(gateway_factory, world, pki, tmp_path, servers, rua, **overrides):
    """dest.test: MTA-STS enforce; its first MX's certificate is not trusted, its
    second's is. One message is sent: one failed session and one that worked."""
    bad = await world.mta("mx1.dest.test", "127.0.0.81", cert="self-signed")
    good = await world.mta("mx2.dest.test", "127.0.0.82")
    world.dns.add("dest.test", "MX", "5 mx1.dest.test.")
    world.dns.add("dest.test", "MX", "10 mx2.dest.test.")
    world.dns.add("_mta-sts.dest.test", "TXT", '"v=STSv1; id=one"')
    sts = await https_server(
        world, pki, tmp_path, servers, "mta-sts.dest.test", "127.0.0.79", body=ENFORCE
    )
    if rua is not None:
        world.dns.add("_smtp._tls.dest.test", "TXT", f'"v=TLSRPTv1; rua={rua}"')
    gw = await gateway_factory(
        world.config(
            {
                "delivery.retry_schedule": ["1h"],
                "mta_sts.port": sts.port,
                "tlsrpt.enabled": True,
                "tlsrpt.organization": "Clinic Example",
                "tlsrpt.contact": "tls-admin@clinic.test",
                **overrides,
            }
        )
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "delivered", what="sent"
    )
    assert bad.received == [] and len(good.received) == 1
    return gw, bad, good


def tomorrow(gw, hours: float = 0.0):
    """Let the gateway's TLS-RPT clock run to the next day, after the reports' hour."""
    today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    later = today + datetime.timedelta(days=1, seconds=SEND_AFTER + 60, hours=hours)
    gw.tlsrpt.clock = later.timestamp
    return today.strftime("%Y-%m-%d")


async def test_the_days_report_goes_to_the_rua_by_mail_and_https_and_is_archived(
    gateway_factory, world, pki, tmp_path, servers
):
    sink = await world.mta("mx.reports.test", "127.0.0.83")
    world.dns.add("reports.test", "MX", "10 mx.reports.test.")
    receiver = await https_server(world, pki, tmp_path, servers, "rua.reports.test", "127.0.0.84")
    rua = f"mailto:tls@reports.test,https://rua.reports.test:{receiver.port}/v1/tlsrpt"
    gw, _, _ = await a_day_at_dest(gateway_factory, world, pki, tmp_path, servers, rua)
    assert await gw.tlsrpt.run_once() == []  # today's report waits for tomorrow
    day = tomorrow(gw)
    (sent,) = await gw.tlsrpt.run_once()
    assert (sent.domain, sent.day, sent.state) == ("dest.test", day, "sent")
    await wait_until(lambda: sink.received, what="the mailed report")

    (mailed,) = sink.received
    assert mailed.mail_from == "tls-admin@clinic.test" and mailed.rcpt_tos == ["tls@reports.test"]
    message, name, report = read_mailed(mailed.data)
    report_id = report["report-id"]
    assert message["Subject"] == (
        f"Report Domain: dest.test Submitter: clinic.test Report-ID: <{report_id}>"
    )
    assert message["TLS-Report-Domain"] == "dest.test"
    assert message["TLS-Report-Submitter"] == "clinic.test"
    begin = int(datetime.datetime.fromisoformat(day + "T00:00:00+00:00").timestamp())
    assert re.fullmatch(rf"clinic\.test!dest\.test!{begin}!{begin + 86399}!\w+\.json\.gz", name)
    assert report["organization-name"] == "Clinic Example"
    assert report["contact-info"] == "tls-admin@clinic.test"
    assert report["date-range"] == {
        "start-datetime": f"{day}T00:00:00Z",
        "end-datetime": f"{day}T23:59:59Z",
    }
    (policy,) = report["policies"]
    assert policy["policy"] == {
        "policy-type": "sts",
        "policy-domain": "dest.test",
        "policy-string": ENFORCE.strip().split("\n"),
        "mx-host": ["mx1.dest.test", "mx2.dest.test"],
    }
    assert policy["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert policy["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "receiving-mx-hostname": "mx1.dest.test",
            "receiving-ip": "127.0.0.81",
            "failed-session-count": 1,
        }
    ]
    assert b"Biopsy" not in mailed.data and b"r@dest.test" not in mailed.data  # counts only

    ((method, headers, body),) = receiver.received
    assert method == "POST" and receiver.paths == ["/v1/tlsrpt"]
    assert headers["content-type"] == "application/tlsrpt+gzip"
    assert check_report(json.loads(gzip.decompress(body))) == report  # the same report

    for queue_id in (sent.detail["queued"], sent.detail["archived"]):
        await wait_until(lambda q=queue_id: gw.archive.archive.has_content(q), what="archived")
    assert (
        gw.metrics.registry.get_sample_value(
            "sealgate_tlsrpt_reports_total", {"transport": "https", "outcome": "posted"}
        )
        == 1
    )
    assert await gw.tlsrpt.run_once() == []  # sent once

    shown = run_sealgate("tlsrpt", "show", "--day", day, "--state-dir", str(gw.config.state_dir))
    listed = json.loads(shown.stdout)
    assert listed["sent"][0]["report_id"] == report_id and listed["sent"][0]["state"] == "sent"
    assert check_report(listed["reports"][0])["policies"] == report["policies"]


async def test_a_mailed_report_is_held_to_no_tls_policy_and_not_counted_itself(
    gateway_factory, world, pki, tmp_path, servers
):
    # the report goes to dest.test itself: under its enforce policy the untrusted
    # first MX would be skipped - a report about a broken TLS setup must get through it
    gw, bad, _ = await a_day_at_dest(
        gateway_factory, world, pki, tmp_path, servers, "mailto:tlsrpt@dest.test"
    )
    day = tomorrow(gw)
    (sent,) = await gw.tlsrpt.run_once()
    await wait_until(lambda: bad.received, what="the report, over unverified TLS")
    (received,) = bad.received
    assert received.rcpt_tos == ["tlsrpt@dest.test"]
    _, _, report = read_mailed(received.data)
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    await gw.tlsrpt.flush()
    counted = gw.tlsrpt.store.counts(day)["dest.test"]
    assert [(ok, sum(failed.values())) for ok, failed in counted.values()] == [(1, 1)]
    after = datetime.date.fromisoformat(day) + datetime.timedelta(days=1)
    assert gw.tlsrpt.store.counts(after.isoformat()) == {}  # nor on the day it was sent
    # (the server has the report before the gateway records its attempt)
    queued = sent.detail["queued"]
    await wait_until(lambda: gw.queue.store.attempts(queued), what="the attempt recorded")
    evidence = gw.queue.store.attempts(queued)[-1]["evidence"]
    assert evidence["mx_host"] == "mx1.dest.test" and evidence["verification"] == "none"


async def test_a_failed_post_is_retried_and_a_domain_without_a_record_gets_none(
    gateway_factory, world, pki, tmp_path, servers
):
    receiver = await https_server(
        world, pki, tmp_path, servers, "rua.reports.test", "127.0.0.84", status=503
    )
    rua = f"https://rua.reports.test:{receiver.port}/"
    gw, _, _ = await a_day_at_dest(gateway_factory, world, pki, tmp_path, servers, rua)
    tomorrow(gw)
    (sent,) = await gw.tlsrpt.run_once()
    assert sent.state == "retry" and sent.detail["posts"] == {rua: "HTTP 503"}
    assert await gw.tlsrpt.run_once() == []  # not before its time
    receiver.status = 200
    tomorrow(gw, hours=1)
    (again,) = await gw.tlsrpt.run_once()
    assert again.state == "sent" and again.detail["posts"] == {rua: "posted"}
    bodies = [body for _, _, body in receiver.received]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same report, the same id


async def test_no_record_means_no_report(gateway_factory, world, pki, tmp_path, servers):
    gw, _, _ = await a_day_at_dest(gateway_factory, world, pki, tmp_path, servers, None)
    tomorrow(gw)
    (sent,) = await gw.tlsrpt.run_once()
    assert sent.state == "no-rua" and "0 v=TLSRPTv1 records" in sent.detail["why"]


async def test_a_receiver_that_hangs_does_not_hold_up_other_domains_reports(
    gateway_factory, world, pki, tmp_path, servers, monkeypatch
):
    """Two domains' reports are due; the first one's https receiver takes the
    connection and never answers: the second one's report is posted while the first
    still waits, and the first is retried later."""
    monkeypatch.setattr(service, "POST_TIMEOUT", 3.0)
    silent_port = free_port()
    silent = await SilentServer("127.0.0.85", silent_port).start()
    world.dns.add("rua.slow.test", "A", "127.0.0.85")
    quick = await https_server(world, pki, tmp_path, servers, "rua.quick.test", "127.0.0.84")
    slow_rua = f"https://rua.slow.test:{silent_port}/"
    world.dns.add("_smtp._tls.a-slow.test", "TXT", f'"v=TLSRPTv1; rua={slow_rua}"')
    world.dns.add(
        "_smtp._tls.b-quick.test", "TXT", f'"v=TLSRPTv1; rua=https://rua.quick.test:{quick.port}/"'
    )
    gw = await gateway_factory(
        world.config(
            {
                "tlsrpt.enabled": True,
                "tlsrpt.organization": "Clinic Example",
                "tlsrpt.contact": "tls-admin@clinic.test",
            }
        )
    )
    for domain in ("a-slow.test", "b-quick.test"):
        gw.tlsrpt.count(ReportPolicy(domain, "sts"), None)
    tomorrow(gw)
    try:
        round_ = asyncio.ensure_future(gw.tlsrpt.run_once())
        await wait_until(lambda: len(quick.received) == 1, what="the quick domain's report")
        # posted while the slow one still waited for its answer
        assert silent.held and not silent.gave_up
        sent = {s.domain: s for s in await round_}
    finally:
        await silent.stop()
    assert sent["b-quick.test"].state == "sent"
    assert sent["a-slow.test"].state == "retry"
    assert sent["a-slow.test"].detail["posts"] == {slow_rua: "no answer within 3 s"}
