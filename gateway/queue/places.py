"""places - how many delivery attempts may run at once, and for which destinations.

Postfix's queue manager starts a new destination at a low concurrency and raises it
as mail goes through; a destination that stalls keeps few of its processes.  Here a
destination is one of three kinds, by its last attempt (`QueueManager._places`):

- quick (its last attempt took less than `QUICK`): any of the total places;
- slow (one took `QUICK` or more - a slow server, a tarpit): from the slow share (a
  quarter of the places, and whatever quick and new destinations leave idle of the
  first half: `Total`), `SLOW_PLACES` attempts at once to begin with; each attempt
  that delivers raises the destination's window by one (up to
  `delivery.concurrency_per_destination`), each that delivers nothing lowers it by
  one (down to one), as Postfix's scheduler does with its destinations' concurrency;
- new (not tried yet): one attempt at a time (`NEW_PLACES`), from a share of their
  own, so that first attempts never wait behind slow destinations.  A first attempt
  still running after `NEW_QUICK` moves into the slow share there and then
  (`Place.overrun`), leaving its place to the next new destination.

An attempt still running after `STALL` is stalled - a tarpit, a server that has
stopped answering - and gives up its places there and then (`Place.stall`): it only
waits for its reply or its timeout, and the places are for attempts that work.  Its
destination's window falls to one, and the destination's own limit
(`delivery.concurrency_per_destination`, kept by the attempt) still counts it.

A `Share` counts its places itself (not a semaphore) because a place can be taken
beyond its limit - an attempt under way that turns out slow joins the slow share at
once, and the share lets nobody else in until it is back under its limit - and
because its limit can change (a slow destination's window, the slow share's loan).
"""

from __future__ import annotations

import asyncio
import collections

QUICK = 10.0  # seconds: an attempt that took longer marks its destination slow
NEW_QUICK = 3.0  # seconds: a first attempt still running then leaves the new share
STALL = 60.0  # seconds: an attempt still running then gives up its places
SLOW_PLACES = 2  # attempts at once to a destination when it turns slow
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
            self._changed()
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
        self._changed()

    def resize(self, limit: int) -> None:
        """A new limit: those waiting get the places it adds; a lower one lets
        nobody in until the places taken are under it."""
        self.limit = max(1, limit)
        self._wake()

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.used < self.limit:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)
        self._changed()

    def _changed(self) -> None:
        """``used`` or ``limit`` changed (`Total` lends)."""


class Total(Share):
    """Every place.  Of the first half, what quick and new destinations' attempts do
    not hold is lent to the ``slow`` share, which never has less than its own limit:
    slow destinations use the places the others leave idle, and a burst of quick
    mail still finds half the places free or its own."""

    def __init__(self, limit: int, slow: Share):
        self._slow, self._own = slow, slow.limit
        super().__init__(limit)
        self._changed()

    def _changed(self) -> None:
        others = self.used - self._slow.used
        if self._slow.limit != (limit := max(self._own, self.limit // 2 - others)):
            self._slow.resize(limit)


class Place:
    """The places an attempt holds: one of the ``total`` and, for a slow or new
    destination, one of its share's; moved to the slow share when a new
    destination's attempt overruns, given up when the attempt stalls."""

    def __init__(self, new: Share | None = None, slow: Share | None = None):
        self.share: Share | None = None
        self.total: Share | None = None
        self.stalled = False
        self._new, self._slow = new, slow

    async def take(self, total: Share, share: Share | None = None) -> None:
        """A place of ``share`` (a quick destination's attempt: None), then one of
        ``total``; `release` gives back what was taken even if this was cancelled."""
        if share is not None:
            await share.acquire()
            self.share = share
        await total.acquire()
        self.total = total

    def overrun(self) -> None:
        if self.share is not None and self.share is self._new and self._slow is not None:
            self.share.release()
            self._slow.force()
            self.share = self._slow

    def stall(self) -> bool:
        """Give up every place held; False when there was none (it ended, or had
        stalled already)."""
        if self.stalled or self.total is None:
            return False
        self.release()
        self.stalled = True
        return True

    def release(self) -> None:
        for share in (self.share, self.total):
            if share is not None:
                share.release()
        self.share = self.total = None
