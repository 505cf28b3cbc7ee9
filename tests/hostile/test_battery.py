"""A bounded slice of the hostile battery (`tests/hostile/battery.py`) in the suite:
about 210 seeded sessions of every category against one gateway, then the check -
the gateway answers, nothing acknowledged is lost, stuck or unarchived, nothing
from client input reached the error log.  The full run is ``make hostile``."""

from __future__ import annotations

from hashlib import sha256

from structlog.testing import capture_logs

from tests.hostile import battery

SLICE = {"mutation": 60, "address": 50, "mime": 14, "fault": 30, "slow": 6, "world": 10, "web": 40}
TOKEN = "t-admin-battery-0123456789"


async def test_the_battery_slice_loses_nothing_and_logs_no_error(relay, world):
    tokens = [
        {"name": "admin-1", "role": "admin", "token_sha256": sha256(TOKEN.encode()).hexdigest()}
    ]
    gw, dest, sender = await relay(
        **{"delivery.max_queue_lifetime": "15s", "archive.api_tokens": tokens}
    )
    await battery.hostile_world(world.dns, world.mta)
    host, port = gw.smtp_address
    web = battery.WebTargets(gw.portal.address, gw.api.address, TOKEN, gw.console.address)
    with capture_logs() as logs, battery.stdlib_errors() as stdlib:
        report = await battery.run(host, port, seed=13, per_category=SLICE, web=web)
        seen = battery.InProcess(gw, logs, stdlib)
        try:
            await battery.check(seen, report, timeout=45)
        finally:
            seen.close()
    summary = report.summary()
    print(summary)
    assert summary["total"] == sum(SLICE.values())
    assert summary["acknowledged"] > 20  # the battery does get mail through
    assert report.problems == []
    assert {k: summary[k] for k in ("crashes", "lost", "unarchived", "stuck_past_lifetime")} == {
        "crashes": 0,
        "lost": 0,
        "unarchived": 0,
        "stuck_past_lifetime": 0,
    }
    assert summary["errors_logged"] == 0 and summary["tracebacks"] == 0
    assert summary["waiting_with_reason"] == 0  # the world's mail expired, with DSNs
    assert summary["bounced_without_dsn"] == 0
