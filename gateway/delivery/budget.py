"""budget - how many bytes the recipients' own copies may hold at once.

An S/MIME or PGP copy is made for one recipient and kept until it is sent: a 50 MB
message to a hundred recipients at a hundred domains, each attempt under way at
once, would be a hundred copies of ~70 MB in memory - enough to have the daemon
killed for memory, and again after its restart, since the same message is then
retried the same way.  `ByteBudget` keeps the total of copies being made and sent
under ``delivery.copy_memory``: an attempt asks for its copy's bytes before it makes
it and gives them back when it is sent (a large one: and archived); one that does
not fit waits its turn (first come, first served, so a large copy is not overtaken
forever by small ones).  A copy larger than the whole budget goes when it is the
only one: every message can be delivered, one at a time if need be.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable

# what making, sending and archiving a copy of ``n`` bytes holds at most: the copy
# (base64: 4/3 of the message), the archive's copy as sent (the same again) and its
# compressed and encrypted forms, and the transform's working copies (DER, base64).
# Measured: one 20 MB message to 20 S/MIME recipients, the main process's peak RSS
# grew by 130-140 MB for each copy allowed at once
COPY_FACTOR = 7
COPY_OVERHEAD = 64 * 1024


def copy_cost(size: int) -> int:
    """The bytes a recipient's copy of a ``size``-byte message is counted as."""
    return COPY_FACTOR * size + COPY_OVERHEAD


class ByteBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0  # bytes given out and not yet given back
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[list[Awaitable[object]]]:
        """``size`` bytes of the budget for the time of the block (waiting for them
        first when they are not free) - or, when the block put something to wait for
        in the list it is given (the archive writing a large copy), until that is
        done too."""
        await self.take(size)
        after: list[Awaitable[object]] = []
        try:
            yield after
        finally:
            if after:  # (a failed one too: it is written again later, apart)
                waited = asyncio.gather(*after, return_exceptions=True)
                waited.add_done_callback(lambda _: self.give(size))
            else:
                self.give(size)

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    async def take(self, size: int) -> None:
        """``size`` bytes of the budget, once they are free; `give` them back."""
        if not self._waiting and self._fits(size):
            self.held += size
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (size, turn)
        self._waiting.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give(size)  # given, then cancelled before it was used
            else:
                with contextlib.suppress(ValueError):  # (`_wake` may have dropped it)
                    self._waiting.remove(entry)
                self._wake()  # it may have been the one the others waited behind
            raise

    def give(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, turn = self._waiting.popleft()
            if turn.cancelled():
                continue
            self.held += size
            turn.set_result(None)

    def resize(self, limit: int) -> None:
        """A new limit (SIGHUP); copies already counted keep their bytes."""
        self.limit = limit
        self._wake()
