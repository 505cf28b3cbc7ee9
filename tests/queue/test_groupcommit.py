"""Group commit: operations arriving together share a transaction; a failing one is
undone alone; nobody sees a result before it is committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.queue.groupcommit import GroupCommit
from gateway.queue.store import QueueStore
from tests.support.envelopes import envelope as _envelope


@pytest.fixture
def store_and_thread(tmp_path):
    thread = ThreadPoolExecutor(1)
    store = thread.submit(QueueStore, tmp_path / "queue.db").result()
    yield store, thread
    thread.submit(store.close).result()
    thread.shutdown()


async def test_operations_that_arrive_while_a_commit_runs_share_the_next(store_and_thread):
    store, thread = store_and_thread
    commits = GroupCommit(store, thread)
    gate = threading.Event()
    thread.submit(gate.wait)  # the database thread is busy: the operations queue up
    adds = [
        asyncio.ensure_future(commits.run(lambda i=i: store.add(_envelope(f"Q{i}", "a@x.test"))))
        for i in range(20)
    ]
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(*adds) == [True] * 20
    assert commits.batches == 1
    other = QueueStore(store.path)  # another connection sees all of them committed
    assert len(other.known()) == 20
    other.close()


async def test_a_failing_operation_is_undone_alone_and_its_caller_gets_the_error(
    store_and_thread,
):
    store, thread = store_and_thread
    commits = GroupCommit(store, thread)
    gate = threading.Event()
    thread.submit(gate.wait)

    def add_then_fail() -> None:
        store.add(_envelope("BAD", "a@x.test"))
        store._db.execute("INSERT INTO no_such_table VALUES (1)")

    good = asyncio.ensure_future(commits.run(lambda: store.add(_envelope("GOOD", "a@x.test"))))
    bad = asyncio.ensure_future(commits.run(add_then_fail))
    await asyncio.sleep(0.05)
    gate.set()
    assert await good is True
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await bad
    assert commits.batches == 1
    assert set(thread.submit(store.known).result()) == {"GOOD"}  # BAD's add was undone
