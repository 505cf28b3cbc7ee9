"""background - work started and not awaited where it starts, held until it is done.

The event loop keeps only a weak reference to a task: one that nobody holds can be
collected mid-way, its work silently dropped.  A `Background` holds its tasks until
they end, and lets whoever owns it wait for the last ones when it closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Background:
    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def run(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Start ``work`` (a coroutine or a future) and hold it until it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the tasks still running (none is
        cancelled: what is not done by then goes on, or ends with the loop)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
