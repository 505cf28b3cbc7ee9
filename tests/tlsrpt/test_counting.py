"""What delivery counts for TLS-RPT, session by session, on real connections: under
the MX host's TLSA records when it has usable ones, else under the domain's MTA-STS
policy; new sessions only; a connection that fails before TLS is not a TLS session.
Under an MTA-STS 'testing' policy a session the policy engine let go unverified is
counted as what 'enforce' would have found - the chain the server presented, checked
afterwards."""

from __future__ import annotations

import hashlib

import pytest

from gateway.delivery.client import ClientSettings, deliver
from gateway.delivery.router import NextHop, Routed
from gateway.delivery.sessions import ReuseLimits, SessionCache
from gateway.delivery.tls_policy import TlsLevel
from gateway.probe.mta_sts import StsMode, StsPolicy
from gateway.tlsrpt.model import Failure, Observation, ReportPolicy, ResultType, sts_policy
from tests.support.delivery import publish
from tests.support.world import MESSAGE


def observation(mode: StsMode | None = StsMode.ENFORCE, mx=("*.dest.test",)):
    counted: list[tuple[ReportPolicy, Failure | None]] = []
    policy = None if mode is None else sts_policy("dest.test", StsPolicy(mode, 86400, mx))
    observed = Observation(
        "dest.test", policy, mode is StsMode.TESTING, lambda p, f: counted.append((p, f))
    )
    return observed, counted


async def send(world, hosts, level, observed, *, dane=False, sessions=None, ca=True):
    settings = ClientSettings(
        helo_name="gw.sealgate.test",
        ca_file=world.settings.ca_file if ca else None,
        connect_timeout=5,
        command_timeout=10,
        dane=dane,
    )
    routed = Routed(tuple(NextHop(h, world.port, i) for i, h in enumerate(hosts)), dane)
    return await deliver(
        routed,
        level,
        "s@clinic.test",
        ["r@dest.test"],
        MESSAGE,
        settings,
        world.resolver,
        sessions=sessions,
        observed=observed,
    )


async def test_enforce_counts_a_failed_certificate_and_the_session_that_worked(world):
    await world.mta("mx1.dest.test", "127.0.0.81", cert="self-signed")
    await world.mta("mx2.dest.test", "127.0.0.82")
    observed, counted = observation()
    (result,) = await send(world, ["mx1.dest.test", "mx2.dest.test"], TlsLevel.MTA_STS, observed)
    assert result.outcome == "delivered"
    assert counted == [
        (
            observed.sts,
            Failure(ResultType.CERTIFICATE_NOT_TRUSTED, "mx1.dest.test", "127.0.0.81"),
        ),
        (observed.sts, None),
    ]


@pytest.mark.parametrize(
    ("cert", "result"),
    [
        ("expired", ResultType.CERTIFICATE_EXPIRED),
        ("wrong-name", ResultType.CERTIFICATE_HOST_MISMATCH),
        (None, ResultType.STARTTLS_NOT_SUPPORTED),
    ],
)
async def test_enforce_counts_each_kind_of_failure(world, cert, result):
    await world.mta("mx1.dest.test", "127.0.0.81", cert=cert)
    observed, counted = observation()
    (outcome,) = await send(world, ["mx1.dest.test"], TlsLevel.MTA_STS, observed)
    assert outcome.outcome == "deferred"
    assert counted == [(observed.sts, Failure(result, "mx1.dest.test", "127.0.0.81"))]


@pytest.mark.parametrize(
    ("cert", "result"),
    [
        ("good", None),
        ("self-signed", ResultType.CERTIFICATE_NOT_TRUSTED),
        ("expired", ResultType.CERTIFICATE_EXPIRED),
        ("wrong-name", ResultType.CERTIFICATE_HOST_MISMATCH),
        (None, ResultType.STARTTLS_NOT_SUPPORTED),
    ],
)
async def test_testing_delivers_unverified_and_counts_what_enforce_would_have_found(
    world, cert, result
):
    mx = await world.mta("mx1.dest.test", "127.0.0.81", cert=cert)
    observed, counted = observation(StsMode.TESTING)
    (outcome,) = await send(world, ["mx1.dest.test"], TlsLevel.MAY, observed)
    assert outcome.outcome == "delivered" and len(mx.received) == 1
    expected = Failure(result, "mx1.dest.test", "127.0.0.81") if result else None
    assert counted == [(observed.sts, expected)]


async def test_a_reused_session_is_not_counted_again(world):
    await world.mta("mx1.dest.test", "127.0.0.81")
    sessions = SessionCache(ReuseLimits(30, 300, 100), per_key=1)
    observed, counted = observation()
    for _ in range(3):
        (result,) = await send(
            world, ["mx1.dest.test"], TlsLevel.MTA_STS, observed, sessions=sessions
        )
        assert result.outcome == "delivered"
    await sessions.close()
    assert counted == [(observed.sts, None)]


async def test_a_connection_refused_is_not_a_tls_session(world):
    observed, counted = observation()
    world.dns.add("mx1.dest.test", "A", "127.0.0.89")  # nothing listens there
    (result,) = await send(world, ["mx1.dest.test"], TlsLevel.MTA_STS, observed)
    assert result.outcome == "deferred" and counted == []


async def test_without_an_sts_policy_or_tlsa_records_nothing_is_counted(world):
    await world.mta("mx1.dest.test", "127.0.0.81")
    observed, counted = observation(None)
    (result,) = await send(world, ["mx1.dest.test"], TlsLevel.VERIFY, observed)
    assert result.outcome == "delivered" and counted == []


async def test_dane_sessions_are_counted_under_the_mx_hosts_tlsa_records(world):
    bad = await world.mta("mx1.dest.test", "127.0.0.81")
    publish(world, "mx1.dest.test", "3 1 1 " + "00" * 32)
    good = await world.mta("mx2.dest.test", "127.0.0.82", cert="self-signed")
    record = f"3 0 1 {hashlib.sha256(good.cert_der).hexdigest()}"
    publish(world, "mx2.dest.test", record)
    observed, counted = observation()  # DANE outranks MTA-STS (RFC 8461 2)
    (result,) = await send(
        world, ["mx1.dest.test", "mx2.dest.test"], TlsLevel.MAY, observed, dane=True
    )
    assert result.outcome == "delivered" and bad.received == []
    (first, failure), (second, success) = counted
    assert first.kind == "tlsa" and first.strings == ("3 1 1 " + "00" * 32,)
    assert failure == Failure(ResultType.TLSA_INVALID, "mx1.dest.test", "127.0.0.81")
    assert second.kind == "tlsa" and second.strings == (record,) and success is None
    assert first.domain == second.domain == "dest.test"


async def test_a_failed_tlsa_lookup_is_counted_as_dnssec_invalid(world):
    await world.mta("mx1.dest.test", "127.0.0.81")
    world.dns.fail(f"_{world.port}._tcp.mx1.dest.test")
    observed, counted = observation()
    (result,) = await send(world, ["mx1.dest.test"], TlsLevel.MAY, observed, dane=True)
    assert result.status == "4.7.5"
    ((policy, failure),) = counted
    assert policy.kind == "tlsa" and failure is not None
    assert (failure.result, failure.mx) == (ResultType.DNSSEC_INVALID, "mx1.dest.test")
