"""places - how many delivery attempts may run at once, and for which destinations.

Postfix's queue manager starts a new destination at a low concurrency and raises it
as mail goes through; a destination that stalls keeps few of its processes.  Here a
destination is one of three kinds, by its last attempt (`QueueManager._places`):

- quick (its last attempt took less than `QUICK`): any of the total places;
- slow (one took `QUICK` or more - a slow server, a tarpit): at most `SLOW_PLACES`
  at once, from the slow share;
- new (not tried yet): one attempt at a time (`NEW_PLACES`), from a share of their
  own, so that first attempts never wait behind slow destinations.  A first attempt
  still running after `NEW_QUICK` moves into the slow share there and then
  (`Place.overrun`), leaving its place to the next new destination.

A `Share` counts its places itself (not a semaphore) because a place can be taken
beyond its limit: an attempt under way that turns out slow joins the slow share at
once, and the share lets nobody else in until it is back under its limit.
"""

from __future__ import annotations

import asyncio
import collections

QUICK = 10.0  # seconds: an attempt that took longer marks its destination slow
NEW_QUICK = 3.0  # seconds: a first attempt still running then leaves the new share
SLOW_PLACES = 2  # at most this many attempts at once to a slow destination
NEW_PLACES = 1  # and to a new one, until its first attempt is over


class Share:
    """At most ``limit`` places taken by `acquire`, given in the order asked; `force`
    takes one beyond it."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiting:
            self.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # `release` counted the place for us when it woke us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # given, but we are gone: the next one has it
            else:
                self._waiting.remove(waiter)
            raise

    def force(self) -> None:
        self.used += 1

    def release(self) -> None:
        self.used -= 1
        while self._waiting and self.used < self.limit:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class Place:
    """The share place an attempt holds (None: a quick destination's, from the total
    only), moved to the slow share when a new destination's attempt overruns."""

    def __init__(self, share: Share | None, new: Share | None = None, slow: Share | None = None):
        self.share = share
        self._new, self._slow = new, slow

    def overrun(self) -> None:
        if self.share is not None and self.share is self._new and self._slow is not None:
            self.share.release()
            self._slow.force()
            self.share = self._slow

    def release(self) -> None:
        if self.share is not None:
            self.share.release()
            self.share = None
