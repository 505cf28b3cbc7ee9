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

from concurrent.futures import Executor

from gateway.batching import LINGER, Batcher
from gateway.queue.store import QueueStore


class GroupCommit(Batcher):
    def __init__(self, store: QueueStore, executor: Executor):
        # executor: the one thread using the store
        super().__init__(executor, store.batch, linger=LINGER)
        self.store = store
