"""A node stopping while the archive is still writing the records of mail it has
delivered (here: held up by a lock on the archive's log) leaves nothing behind: the
queue waits for those records, then removes the spool files and drops the shared
copies, and only then closes its store - no connection to the database left open, no
error loose in the event loop, and no shared copy of finished mail left."""

from __future__ import annotations

import asyncio
import logging
import threading

import psycopg

from gateway.storage.database import Database
from tests.cluster.support import shared_keys
from tests.conftest import make_message, smtp_client
from tests.support.world import wait_until

CONTENTS = "SELECT count(*) FROM sealgate_queue.contents"  # the shared copies


def count(url: str, password: str, sql: str) -> int:
    db = Database.postgresql(url, password)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


async def node_a(world, postgres, tmp_path):
    """An MTA for dest.test; node a's database URL, password and settings."""
    mta = await world.mta("mx.dest.test", "127.0.0.52")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    url, password = postgres.database(), postgres.password_file.read_text().strip()
    settings = world.config(
        {
            "storage.database": url,
            "storage.password_file": str(postgres.password_file),
            "storage.auto_migrate": True,
            "cluster.ack": "shared",  # the content is shared as it is accepted
            "cluster.node_id": "a",
            **shared_keys(tmp_path / "keys"),
        }
    )
    return mta, url, password, settings


async def deliver_then_stop(gw, mta, url, password, n, held, grace, caplog) -> None:
    """Send ``n`` messages while the archive's log is locked (its records wait), stop
    the gateway once the MTA has them all, the lock let go ``held`` seconds into the
    stop; nothing may go wrong loose in the event loop meanwhile."""
    locker = psycopg.connect(url, password=password)  # a transaction: the lock is held
    locker.execute("LOCK TABLE sealgate_archive.leaves IN EXCLUSIVE MODE")
    try:
        async with smtp_client(gw) as client:
            for i in range(n):
                await client.sendmail("doctor@clinic.test", [f"m{i}@dest.test"], make_message())
        await wait_until(lambda: len(mta.received) == n, what="all of them at the MTA")
        threading.Timer(held, locker.rollback).start()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            await gw.stop(grace=grace)
    finally:
        locker.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_node_stopped_as_it_finishes_mail_holds_no_connection_and_leaves_no_copy(
    gateway_factory, world, postgres, tmp_path, caplog
):
    mta, url, password, settings = await node_a(world, postgres, tmp_path)
    gw = await gateway_factory(settings)
    # released a second into the stop, within its grace
    await deliver_then_stop(gw, mta, url, password, 5, held=1.0, grace=5, caplog=caplog)
    assert not list(gw.spool.queue_ids())  # removed once their records were written

    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    others += "AND pid <> pg_backend_pid()"
    assert await asyncio.to_thread(count, url, password, others) == 0

    assert await asyncio.to_thread(count, url, password, CONTENTS) == 0


async def test_what_a_stopping_node_could_not_finish_in_time_the_next_start_does(
    gateway_factory, world, postgres, tmp_path, caplog
):
    """The archive held up longer than the stop's grace: the queue stops anyway; the
    spool files and shared copies it could not let go are let go at the next start."""
    mta, url, password, settings = await node_a(world, postgres, tmp_path)
    gw = await gateway_factory(settings)
    # released after the queue's grace
    await deliver_then_stop(gw, mta, url, password, 3, held=2.5, grace=1.0, caplog=caplog)
    assert len(list(gw.spool.queue_ids())) == 3  # kept: the queue had stopped
    assert await asyncio.to_thread(count, url, password, CONTENTS) == 3

    again = await gateway_factory(settings)
    await wait_until(
        lambda: count(url, password, CONTENTS) == 0 and not list(again.spool.queue_ids()),
        what="the spool files and the shared copies let go at start",
    )
    assert len(mta.received) == 3  # nothing delivered twice


async def test_shared_copies_a_stop_left_go_at_start_even_without_the_spool_files(
    gateway_factory, world, postgres, tmp_path, caplog
):
    """As above, and the node comes back without its spool (a disk replaced): the
    copies it left are brought into the archive where it lacks them (each message and
    attempt recorded once) and then go."""
    mta, url, password, settings = await node_a(world, postgres, tmp_path)
    gw = await gateway_factory(settings)
    await deliver_then_stop(gw, mta, url, password, 3, held=2.5, grace=1.0, caplog=caplog)
    for path in gw.spool.queue_dir.iterdir():
        path.unlink()
    assert await asyncio.to_thread(count, url, password, CONTENTS) == 3

    await gateway_factory(settings)
    await wait_until(lambda: count(url, password, CONTENTS) == 0, what="the copies let go")
    messages = "SELECT count(*) FROM sealgate_archive.leaves WHERE kind='message'"
    attempts = "SELECT count(*) FROM sealgate_archive.events WHERE kind='attempt'"
    for sql in (messages, attempts):  # a record each, none written twice
        assert await asyncio.to_thread(count, url, password, sql) == 3, sql
    assert len(mta.received) == 3
