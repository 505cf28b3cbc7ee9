"""groupcommit - many small state-store writes, one transaction.

Every message needs two writes to the state store: its recipients when it arrives,
their results after the attempt.  One transaction each costs a commit (WAL frames, a
lock, a thread handoff) per write.  `GroupCommit` queues the operations that arrive
while the database thread is busy and runs them together in one transaction
(`QueueStore.batch`): under load, tens of messages per commit; when idle, one.

Each caller's result is returned only after the commit, so nobody acts on state that
is not in the database.  An operation that raises is undone alone (a savepoint) and
its caller gets the exception; the others commit.  If the commit itself fails, every
caller in the batch gets that error.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from gateway.queue.store import QueueStore

T = TypeVar("T")


class GroupCommit:
    def __init__(self, store: QueueStore, executor: Executor):
        self.store = store
        self.executor = executor  # the one thread that uses the store
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._draining = False
        self.batches = 0  # commits made (for tests and curiosity)

    async def run(self, operation: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending.append((operation, future))
            start = not self._draining
            self._draining = True
        if start:
            # Start at the end of this turn of the event loop: operations issued in
            # the same turn (several arrivals read at once, attempts ending together)
            # share the batch, and the thread is woken once for them.
            loop.call_soon(lambda: loop.run_in_executor(self.executor, self._drain, loop))
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the database thread: commit batches until nothing is pending."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            try:
                results = self.store.batch([operation for operation, _ in batch])
            except Exception as e:  # the commit failed: nothing of the batch is stored
                results = [(None, e)] * len(batch)
            self.batches += 1
            loop.call_soon_threadsafe(_resolve, [f for _, f in batch], results)


def _resolve(
    futures: list[asyncio.Future[Any]], results: list[tuple[Any, Exception | None]]
) -> None:
    for future, (value, error) in zip(futures, results, strict=True):
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
