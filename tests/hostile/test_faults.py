"""Faults under the mail path: a full disk, a queue state or an archive that refuses
writes.  Nothing that was delivered is forgotten (and delivered again), evidence is
never dropped, and the gateway says it is not ready before the disk is full."""

from __future__ import annotations

import contextlib
import sqlite3

import aiosmtplib
from structlog.testing import capture_logs

from gateway.events import Event
from gateway.queue.store import QueueStore
from tests.conftest import make_message, queued, smtp_client
from tests.support.archive import archive_of, refusing
from tests.support.fs import small_filesystem
from tests.support.http import http_get
from tests.support.world import wait_until


async def test_a_result_the_queue_state_cannot_write_is_written_later_not_delivered_twice(
    relay, monkeypatch
):
    real = QueueStore.record
    failures = {"left": 3}

    def record(self, queue_id, results, now=None, every=None):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, queue_id, results, now, every)

    monkeypatch.setattr(QueueStore, "record", record)
    gw, dest, _ = await relay()
    with capture_logs() as logs:
        async with smtp_client(gw) as client:
            await client.sendmail("a@clinic.test", ["r@tls.test"], make_message())
        (path,) = queued(gw)
        await wait_until(
            lambda: (gw.queue.store.message(path.name) or {}).get("done"),
            what="the delivery recorded",
        )
    assert len(dest.received) == 1  # delivered once, recorded after three refusals
    (row,) = gw.queue.store.recipients(path.name)
    assert (row.state, row.attempts) == ("delivered", 1)
    assert [a["outcome"] for a in gw.queue.store.attempts(path.name)] == ["delivered"]
    events = [e["event"] for e in logs]
    assert events.count(Event.QUEUE_STORE_FAILED) == 3
    assert events.index(Event.DELIVERY_ATTEMPT) < events.index(Event.QUEUE_STORE_FAILED)
    assert gw.metrics.queue_store_errors._value.get() == 3
    await gw.stop()  # a restart does not deliver it again
    assert len(dest.received) == 1


async def test_an_attempt_record_the_archive_refuses_is_retried_and_the_spool_file_waits(relay):
    gw, dest, _ = await relay()
    with refusing(gw, "events", "NEW.kind = 'attempt'"):
        async with smtp_client(gw) as client:
            await client.sendmail("a@clinic.test", ["r@tls.test"], make_message())
        (path,) = queued(gw)
        await wait_until(lambda: dest.received, what="delivered")
        await wait_until(lambda: gw.archive.has_failed(path.name), what="the record failed")
        await wait_until(lambda: (gw.queue.store.message(path.name) or {}).get("done"), what="done")
        assert path.exists()  # kept: the archive lacks the evidence of its delivery
    await wait_until(lambda: not path.exists(), timeout=20, what="removed once archived")
    with archive_of(gw) as archive:
        (attempt,) = archive.events(path.name, ("attempt",))
    (recipient,) = attempt["body"]["recipients"]
    assert recipient["state"] == "delivered" and recipient["evidence"]["tls_version"]


async def test_below_the_free_space_floor_mail_is_refused_and_readyz_says_so(
    gateway_factory, tmp_path
):
    with small_filesystem(tmp_path / "small", "4m") as mount:
        gw = await gateway_factory(
            {"state_dir": str(mount / "state"), "spool.min_free_space": "1MiB"}
        )
        assert await http_get(gw, "/readyz") == (200, "ready\n")
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while gw.spool.free_space() > 512 * 1024:
                f.write(b"\0" * 65536)
        status, text = await http_get(gw, "/readyz")
        assert status == 503 and "spool.min_free_space" in text
        await wait_until(lambda: gw.smtp.ctx.free_space() < 1024**2, what="free space read again")
        async with smtp_client(gw) as client:
            try:
                await client.mail("s@clinic.test")
                raise AssertionError("MAIL was accepted")
            except aiosmtplib.SMTPSenderRefused as e:
                assert (e.code, e.message[:5]) == (452, "4.3.1")
        filler.unlink()
        assert await http_get(gw, "/readyz") == (200, "ready\n")
        await gw.stop()


async def test_a_dsn_that_cannot_be_spooled_is_sent_at_the_next_round(relay, monkeypatch):
    import gateway.queue.manager as manager_module
    from gateway.errors import SpoolError

    monkeypatch.setattr(manager_module, "PRUNE_INTERVAL", 1.0)
    gw, dest, sender = await relay()
    dest.rcpt_replies["gone@tls.test"] = "550 5.1.1 No such user"
    real, refusals = gw.queue.submit, {"left": 1}

    async def inject(*args, **kwargs):
        if refusals["left"]:
            refusals["left"] -= 1
            raise SpoolError("cannot commit: No space left on device")
        return await real(*args, **kwargs)

    monkeypatch.setattr(gw.queue, "submit", inject)
    async with smtp_client(gw) as client:
        await client.sendmail("a@clinic.test", ["gone@tls.test"], make_message())
    (path,) = queued(gw)
    await wait_until(lambda: sender.received, what="the DSN, at the next round")
    assert len(sender.received) == 1 and "Status: 5.1.1" in sender.received[0].data.decode()
    message = gw.queue.store.message(path.name)
    assert message["done"] and message["dsn_sent"]
    (row,) = gw.queue.store.recipients(path.name)
    assert (row.state, row.attempts) == ("bounced", 1)  # the result stood


async def test_attempt_records_never_written_before_a_stop_are_completed_at_the_next_start(
    relay, gateway_factory, world
):
    gw, dest, _ = await relay()
    with refusing(gw, "events", "NEW.kind = 'attempt'"):
        async with smtp_client(gw) as client:
            await client.sendmail("a@clinic.test", ["r@tls.test"], make_message())
        (path,) = queued(gw)
        await wait_until(lambda: (gw.queue.store.message(path.name) or {}).get("done"), what="done")
        await gw.stop()  # the attempt's record was never written: the file stays
        assert path.exists()

    again = await gateway_factory(world.config({"relay.networks": ["127.0.0.1/32"]}))
    await wait_until(lambda: not path.exists(), what="removed once the evidence is in")
    with archive_of(again) as archive:
        (attempt,) = archive.events(path.name, ("attempt",))
    (recipient,) = attempt["body"]["recipients"]
    assert (recipient["attempt"], recipient["state"]) == (1, "delivered")
    assert recipient["recovered"] == "from the queue state"
    assert recipient["evidence"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert len(dest.received) == 1  # not delivered again
