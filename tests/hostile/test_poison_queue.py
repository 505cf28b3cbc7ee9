"""A message the queue cannot take never keeps the gateway down and never waits
forever: a spooled envelope that fails the listener's checks (written by an earlier
version, or by a way in that missed them) is quarantined - archived, every recipient
bounced, the sender told in a DSN when its address is usable, the file kept under
spool/quarantine/ - and a recipient whose attempts fail in an unexpected way expires
like any other."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import gateway.delivery.attempt as attempt_module
from gateway.model import ClientInfo, Envelope, Purpose, Recipient
from gateway.queue.store import QueueStore
from gateway.spool import Spool, new_queue_id
from tests.conftest import make_message, queued, run_sealgate, smtp_client
from tests.support.archive import archive_of
from tests.support.world import tls_only, wait_until


async def spool_legacy(
    state_dir,
    sender: str,
    rcpts: list[str],
    helo: str = "client.test",
    days_ago: float = 0,
    queue_id: str | None = None,
):
    """Spool a message as a version without envelope checks did: addresses exactly as
    the client sent them (non-UTF-8 bytes as surrogate escapes); received ``days_ago``."""
    spool = Spool(state_dir / "spool")
    spool.open()
    queue_id = queue_id or new_queue_id()
    writer = spool.writer(queue_id)
    await writer.write(make_message())
    received = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_ago)
    await writer.commit(
        lambda size, sha: Envelope(
            queue_id=queue_id,
            received_at=received.isoformat(timespec="microseconds"),
            mail_from=sender,
            mail_options=("SMTPUTF8",),
            recipients=tuple(Recipient(r) for r in rcpts),
            client=ClientInfo("127.0.0.1", 40000, helo, "TLSv1.3", authorized_by="network"),
            size=size,
            sha256=sha,
            trace_headers="X-Sealgate-Processed: gw.sealgate.test\r\n",
        )
    )
    spool.close()
    return queue_id


def states(gw, queue_id):
    return [(r.address, r.state, r.status) for r in gw.queue.store.recipients(queue_id)]


async def test_a_poison_spool_file_is_quarantined_at_start_and_the_gateway_runs(relay, tmp_path):
    state_dir = tmp_path / "state"
    poison = await spool_legacy(
        state_dir, "a@clinic.test", ["r\udcff\udcfe@tls.test", "ok@tls.test"], "a\udcffb.test"
    )
    good = await spool_legacy(state_dir, "a@clinic.test", ["good@tls.test"])
    gw, dest, sender = await relay()  # started: the bad file did not stop it

    await wait_until(lambda: sender.received, what="the DSN for the quarantined message")
    await wait_until(lambda: dest.received, what="the good message delivered")
    assert [m.rcpt_tos for m in dest.received] == [["good@tls.test"]]
    assert states(gw, poison) == [
        ("r\\xff\\xfe@tls.test", "bounced", "5.1.3"),
        ("ok@tls.test", "bounced", "5.3.0"),
    ]
    (dsn,) = sender.received
    text = dsn.data.decode()
    assert dsn.rcpt_tos == ["a@clinic.test"]
    assert "Final-Recipient: rfc822; r\\xff\\xfe@tls.test" in text and "Status: 5.1.3" in text
    assert "Final-Recipient: rfc822; ok@tls.test" in text and "Status: 5.3.0" in text
    assert "quarantined" in text
    await wait_until(
        lambda: (gw.spool.quarantine_dir / poison).exists(), what="the file in quarantine/"
    )
    assert poison not in [p.name for p in queued(gw)]
    with archive_of(gw) as archive:
        envelope, data = archive.message(poison)
    assert envelope["client"]["helo"] == "a\\xffb.test"
    assert envelope["extra"]["quarantined"].startswith("recipient 1: not valid UTF-8")
    assert data == make_message()
    assert gw.metrics.quarantined._value.get() == 1
    assert gw.queue.store.message(good)["done"]

    config = gw.config
    await gw.stop()
    shown = run_sealgate("queue", "show", poison, "--json", "--state-dir", str(config.state_dir))
    assert shown.returncode == 0, shown.stderr
    assert "quarantined" in shown.stdout and "5.1.3" in shown.stdout


async def test_a_poison_sender_is_quarantined_without_a_dsn(relay, tmp_path):
    state_dir = tmp_path / "state"
    poison = await spool_legacy(state_dir, "a\x00z@clinic.test", ["ok@tls.test"])
    gw, dest, sender = await relay()
    await wait_until(
        lambda: (gw.spool.quarantine_dir / poison).exists(), what="the file in quarantine/"
    )
    assert states(gw, poison) == [("ok@tls.test", "bounced", "5.1.7")]
    message = gw.queue.store.message(poison)
    assert message["done"] and not message["dsn_sent"]
    assert gw.queue.store.message(poison)["mail_from"] == "a\\x00z@clinic.test"
    # the next message goes through as usual
    async with smtp_client(gw) as client:
        await client.sendmail("a@clinic.test", ["r@tls.test"], make_message())
    await wait_until(lambda: dest.received, what="delivered")
    assert sender.received == [] and [m.rcpt_tos for m in dest.received] == [["r@tls.test"]]


async def test_a_poison_message_from_inside_is_quarantined_when_it_is_queued(relay):
    gw, dest, sender = await relay()
    queue_id = await gw.submitter.submit(
        "a@clinic.test", ["r\x00@tls.test"], make_message(), Purpose.MESSAGE
    )
    await wait_until(lambda: sender.received, what="the DSN")
    assert states(gw, queue_id) == [("r\\x00@tls.test", "bounced", "5.1.3")]
    assert (gw.spool.quarantine_dir / queue_id).exists()


async def test_an_attempt_that_fails_unexpectedly_is_retried_then_expires_with_a_dsn(
    relay, monkeypatch
):
    real = attempt_module.deliver

    async def failing(routed, level, sender, rcpts, *args, **kwargs):
        if any(r.endswith("@tls.test") for r in rcpts):
            raise RuntimeError("a bug in the delivery path")
        return await real(routed, level, sender, rcpts, *args, **kwargs)

    monkeypatch.setattr(attempt_module, "deliver", failing)
    gw, dest, sender = await relay(**{"delivery.max_queue_lifetime": "3s"})
    async with smtp_client(gw) as client:
        await client.sendmail("a@clinic.test", ["r@tls.test"], make_message())
    (path,) = queued(gw)
    await wait_until(lambda: sender.received, timeout=20, what="the DSN after expiry")
    ((address, state, status),) = states(gw, path.name)
    assert (state, status) == ("expired", "4.4.7")
    (row,) = gw.queue.store.recipients(path.name)
    assert row.attempts >= 2 and "internal error" in row.diagnostic
    assert "Status: 4.4.7" in sender.received[0].data.decode()
    attempts = gw.queue.store.attempts(path.name)
    assert {a["outcome"] for a in attempts} == {"error"}
    assert json.dumps(attempts)  # recorded like any attempt


async def test_a_spool_file_found_long_after_it_was_received_is_bounced_not_delivered(
    relay, tmp_path
):
    """Unknown to the queue and received longer ago than any message may wait
    (``delivery.max_queue_lifetime``, ``delivery.history_retention``), with no
    attempt in the archive: never recorded, and expired - bounced, not sent."""
    late = await spool_legacy(tmp_path / "state", "a@clinic.test", ["late@tls.test"], days_ago=10)
    gw, dest, sender = await relay()
    await wait_until(lambda: sender.received, what="the DSN for the expired message")
    assert dest.received == []
    assert states(gw, late) == [("late@tls.test", "bounced", "5.3.0")]
    (dsn,) = sender.received
    assert "never recorded" in dsn.data.decode()
    assert (gw.spool.quarantine_dir / late).exists()
    assert gw.metrics.quarantined._value.get() == 1


async def test_a_finished_message_whose_file_outlived_its_history_is_not_sent_again(
    relay, gateway_factory, world, tmp_path
):
    """A message delivered, archived and forgotten by the queue, whose spool file is
    back (another node finished it while this one was down with the file): set aside
    at start - not delivered a second time, no bounce."""
    gw, dest, sender = await relay()
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("a@clinic.test", ["once@tls.test"], make_message())
    queue_id = reply.rsplit(" ", 1)[1]
    await wait_until(lambda: dest.received and not queued(gw), what="delivered and done")
    await gw.stop()
    forgotten = QueueStore(gw.config.state_dir / "queue.db")
    assert forgotten.prune(before=time.time() + 1) == 1  # its history retention is over
    forgotten.close()
    await spool_legacy(
        tmp_path / "state", "a@clinic.test", ["once@tls.test"], days_ago=10, queue_id=queue_id
    )

    settings = {"relay.networks": ["127.0.0.1/32"], "delivery.retry_schedule": ["1s"]}
    again = await gateway_factory(world.config(settings, tls_only("may")))
    assert (again.spool.quarantine_dir / queue_id).exists()
    assert queue_id not in [p.name for p in queued(again)]
    assert again.queue.store.message(queue_id) is None
    assert again.metrics.quarantined._value.get() == 1
    await asyncio.sleep(1.5)  # a retry round: nothing goes out
    assert len(dest.received) == 1 and sender.received == []
