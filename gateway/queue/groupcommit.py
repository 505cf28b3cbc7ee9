"""groupcommit - many small state-store writes, one transaction.

Every message needs two writes to the state store: its recipients when it arrives,
their results after the attempt.  One transaction each costs a commit (WAL frames, a
lock, a thread handoff) per write.  `GroupCommit` is a `gateway.batching.Batcher`
whose batch is one transaction (`QueueStore.batch`): under load, tens of messages
per commit (it lingers: `gateway.batching`); when idle, one.

Each caller's result is returned only after the commit, so nobody acts on state that
is not in the database.  An operation that raises is undone alone (a savepoint) and
its caller gets the exception; the others commit.  If the commit itself fails, every
caller in the batch gets that error.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from gateway.batching import LINGER, Batcher, Job
from gateway.queue.store import QueueStore

T = TypeVar("T")


class GroupCommit(Batcher[Job]):
    def __init__(self, store: QueueStore, executor: Executor):
        # executor: the one thread using the store
        super().__init__(executor, store.batch, linger=LINGER)
        self.store = store

    async def run(self, job: Callable[[], T]) -> T:
        """Run ``job`` in the next transaction; its value, once that has committed."""
        value: T = await super().run(job)
        return value
