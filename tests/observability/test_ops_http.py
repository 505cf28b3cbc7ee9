"""The ops listener: health, readiness and Prometheus metrics."""

from __future__ import annotations

from tests.conftest import make_message, smtp_client
from tests.support.http import http_get


async def test_healthz_and_readyz_answer_200_when_running(gateway_factory):
    gw = await gateway_factory()
    assert await http_get(gw, "/healthz") == (200, "ok\n")
    assert await http_get(gw, "/readyz") == (200, "ready\n")
    assert (await http_get(gw, "/nope"))[0] == 404
    assert (await http_get(gw, "/metrics", "POST"))[0] == 405


async def test_readyz_fails_when_the_spool_is_gone(gateway_factory):
    gw = await gateway_factory()
    gw.spool.queue_dir.rename(gw.spool.root / "moved")
    assert await http_get(gw, "/readyz") == (503, "spool not writable\n")


async def test_metrics_count_connections_messages_bytes_and_latency(gateway_factory):
    gw = await gateway_factory({"relay.networks": ["127.0.0.1/32"]})
    message = make_message()
    async with smtp_client(gw) as client:
        await client.sendmail("s@clinic.test", ["r@example.test"], message)
    async with smtp_client(gw, source="127.0.0.2") as client:
        await client.mail("s@clinic.test")
        await client.execute_command(b"RCPT", b"TO:<r@example.test>")
    status, text = await http_get(gw, "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'sealgate_smtp_connections_total{result="accepted"} 2.0' in lines
    assert any(
        line.startswith('sealgate_messages_accepted_total{tls_version="TLSv1.')
        and line.endswith(" 1.0")
        for line in lines
    )
    assert 'sealgate_messages_rejected_total{reason="relay_denied"} 1.0' in lines
    assert f"sealgate_accepted_bytes_total {float(len(message))}" in lines
    assert "sealgate_acceptance_latency_seconds_count 1.0" in lines
    assert "sealgate_spool_messages 1.0" in lines
    assert f"sealgate_spool_bytes {float(len(message))}" in lines
    assert "example.test" not in text and "clinic.test" not in text  # labels are enums


async def test_the_oldest_queued_message_and_the_build_are_visible(gateway_factory):
    import gateway
    from tests.support.world import wait_until

    gw = await gateway_factory()  # the next hop is a dead port: mail waits
    assert "\nsealgate_queue_oldest_message_age_seconds 0.0" in (await http_get(gw, "/metrics"))[1]
    async with smtp_client(gw) as client:
        await client.sendmail("s@clinic.test", ["r@example.test"], make_message())

    def age() -> float:
        return gw.metrics.registry.get_sample_value("sealgate_queue_oldest_message_age_seconds")

    await wait_until(lambda: age() > 0, what="an age")
    assert age() < 60
    text = (await http_get(gw, "/metrics"))[1]
    assert (
        'sealgate_build_info{python="' in text and f'version="{gateway.__version__}"}} 1.0' in text
    )
    expiry = gw.metrics.registry.get_sample_value(
        "sealgate_certificate_expiry_timestamp_seconds", {"use": "smtp"}
    )
    assert expiry is not None and expiry > __import__("time").time()  # the self-signed one
