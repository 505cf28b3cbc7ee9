"""places - how many delivery attempts may run at once, and for which destinations.

Postfix's queue manager starts a new destination at a low concurrency and raises it
as mail goes through; a destination that stalls keeps few of its processes.  Here a
destination is one of three kinds, by its last attempt (`QueueManager._places`):

- quick (its last attempt took less than `QUICK` - less than `QUICK_AGAIN` once it
  was slow): any of the total places;
- slow (one took `QUICK` or more - a slow server, a tarpit - and none since less
  than `QUICK_AGAIN`): from the slow share (a
  quarter of the places, and whatever quick and new destinations leave idle of
  three quarters once none of theirs has waited for a place for `LEND_AFTER`:
  `Total`),
  `SLOW_PLACES` attempts at once to begin with; each attempt that delivers raises
  the destination's window by one (up to `delivery.concurrency_per_destination`),
  each that delivers nothing lowers it by one (down to one), as Postfix's
  scheduler does with its destinations' concurrency; a place its attempt gives back
  goes to its next attempt first, when one waits (`Share.release`: the session it
  left open is reused), `HANDOFFS` times in a row at most;
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
import time
from collections.abc import Callable

QUICK = 10.0  # seconds: an attempt that took longer marks its destination slow
# and one that took less than this marks a slow one quick again: a server that
# answers each command in 1-5 s, on a session kept open, can take less than `QUICK`
# for one message - taken for quick, its hundreds of attempts waiting filled the
# claims' room (`QueueManager._quick_attempts`)
QUICK_AGAIN = 2.5
NEW_QUICK = 3.0  # seconds: a first attempt still running then leaves the new share
STALL = 60.0  # seconds: an attempt still running then gives up its places
SLOW_PLACES = 2  # attempts at once to a destination when it turns slow
NEW_PLACES = 1  # and to a new one, until its first attempt is over
# seconds without a quick or new destination's attempt waiting for a place before
# the slow share borrows their idle places (`Total`): about as long as a slow
# attempt keeps a place (`QUICK` to `STALL`)
LEND_AFTER = 30.0
HANDOFFS = 10  # a place passes to the same destination at most this often in a row


class Share:
    """At most ``limit`` places taken by `acquire`, given in the order asked - but
    for a place given back for a ``key`` someone waits with (`release`); `force`
    takes one beyond the limit."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._waiting: collections.deque[tuple[asyncio.Future[int], str | None]] = (
            collections.deque()
        )

    async def acquire(self, key: str | None = None, slow: bool = False) -> int:
        """A place; how many times in a row it has passed to ``key`` (0: a place
        given in turn).  ``slow``: for a slow destination's attempt (`Total` counts
        them apart from the others')."""
        if not self.full:
            self.used += 1
            self._changed()
            return 0
        entry: tuple[asyncio.Future[int], str | None] = (
            asyncio.get_running_loop().create_future(),
            key,
        )
        self._waiting.append(entry)
        try:
            return await entry[0]  # `release` counted the place for us when it woke us
        except asyncio.CancelledError:
            if entry[0].done() and not entry[0].cancelled():
                self.release()  # given, but we are gone: the next one has it
            elif entry in self._waiting:  # (`_wake` drops a cancelled one it meets)
                self._waiting.remove(entry)
            raise

    @property
    def full(self) -> bool:
        """An `acquire` now would wait."""
        return self.used >= self.limit or bool(self._waiting)

    def force(self) -> None:
        self.used += 1
        self._changed()

    def resize(self, limit: int) -> None:
        """A new limit: those waiting get the places it adds; a lower one lets
        nobody in until the places taken are under it."""
        self.limit = max(1, limit)
        self._wake()

    def release(self, key: str | None = None, passed: int = 0, slow: bool = False) -> None:
        """Give a place back - straight to the first one waiting with ``key`` (the
        next attempt to the same destination: its session is still open), ahead
        of the others, unless the share is over its limit or the place has passed
        to ``key`` `HANDOFFS` times in a row already (``passed``): then it takes
        its turn, and no destination keeps places from the others for long.
        ``slow``: as given to `acquire`."""
        if key is not None and passed < HANDOFFS and self.used <= self.limit:
            for entry in self._waiting:
                if entry[1] == key and not entry[0].done():
                    self._waiting.remove(entry)
                    entry[0].set_result(passed + 1)  # the place passes on: as many used
                    return
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.used < self.limit:
            waiter, _ = self._waiting.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(0)
        self._changed()

    def _changed(self) -> None:
        """``used`` or ``limit`` changed (`Total` lends)."""

    def turned_slow(self) -> None:
        """A place taken for a new destination's attempt is now a slow one's
        (`Place.overrun`; `Total` counts them)."""


class Total(Share):
    """Every place.  What quick and new destinations' attempts do not hold of the
    first three quarters is lent to the ``slow`` share, which never has less than
    its own limit - but only once none of their attempts has waited for a place
    for `LEND_AFTER`: until then the slow share has its own quarter and no more.
    Once the quick mail has gone, slow servers get three quarters of the places,
    not half (20,000 messages into a world of slow servers drained in 2,214 s with
    half, Postfix's in 1,911).  Not lent in a burst of quick mail: a slow attempt
    keeps a place 10-60 s, and the quick mail, claimed a round at a time, leaves
    places idle for a moment between rounds.  Lent whenever none of its attempts
    waited at that moment, the slow share grew to three quarters in every such
    gap and kept them (the quick domains with 25 places and their p95 latency
    1.9 times what it was without slow ones); lent half then, it kept half."""

    def __init__(self, limit: int, slow: Share, clock: Callable[[], float] = time.monotonic):
        self._slow, self._own = slow, slow.limit
        self._clock = clock
        self._others_asking = 0  # quick and new destinations' attempts in `acquire`
        # Places of the total held by slow destinations' attempts.  Not the slow
        # share's ``used``: it also counts attempts let into the share and still
        # waiting for a place here - taken for held, they made the others' places
        # seem fewer (below none), the loan grew with each one let in, and slow
        # attempts took every place while quick mail waited.
        self.slow_held = 0
        self._waited = -LEND_AFTER  # when an attempt of the others last had to wait
        super().__init__(limit)
        self._changed()

    async def acquire(self, key: str | None = None, slow: bool = False) -> int:
        if slow:
            passed = await super().acquire(key)
            self.turned_slow()
            return passed
        self._others_asking += 1
        if self.full:
            self._waited = self._clock()
        self._changed()  # the loan shrinks back to the slow share's own at once
        try:
            return await super().acquire(key)
        finally:
            self._others_asking -= 1
            self._changed()

    def release(self, key: str | None = None, passed: int = 0, slow: bool = False) -> None:
        self.slow_held -= slow
        super().release(key, passed)

    def turned_slow(self) -> None:
        self.slow_held += 1
        self._changed()

    def _changed(self) -> None:
        others = self.used - self.slow_held
        asked = self._others_asking or self._clock() - self._waited < LEND_AFTER
        lendable = self.limit * (1 if asked else 3) // 4
        if self._slow.limit != (limit := max(self._own, lendable - others)):
            self._slow.resize(limit)


class Place:
    """The places an attempt holds: one of the ``total`` and, for a slow or new
    destination, one of its share's; moved to the slow share when a new
    destination's attempt overruns, given up when the attempt stalls."""

    def __init__(self, new: Share | None = None, slow: Share | None = None):
        self.share: Share | None = None
        self.total: Share | None = None
        self.stalled = False
        self.passed = 0  # times in a row the share's place came from the same destination
        self.slow = False  # the place of the total is a slow destination's
        self._new, self._slow = new, slow

    async def take(self, total: Share, share: Share | None = None, key: str = "") -> None:
        """A place of ``share`` (a quick destination's attempt: None), then one of
        ``total``; `release` gives back what was taken even if this was cancelled.
        ``key``: the destination, for a place given back by its attempt before."""
        if share is not None:
            self.passed = await share.acquire(key or None)
            self.share = share
        slow = share is not None and share is self._slow
        await total.acquire(slow=slow)
        self.total, self.slow = total, slow

    def overrun(self) -> None:
        if self.share is not None and self.share is self._new and self._slow is not None:
            self.share.release()
            self._slow.force()
            self.share = self._slow
            if self.total is not None:  # one place fewer held by the others: lent
                self.total.turned_slow()
                self.slow = True

    def stall(self) -> bool:
        """Give up every place held; False when there was none (it ended, or had
        stalled already)."""
        if self.stalled or self.total is None:
            return False
        self.release()
        self.stalled = True
        return True

    def release(self, key: str | None = None) -> None:
        """Give back what is held; ``key``: the share's place to the next attempt to
        the same destination first (`Share.release`)."""
        if self.share is not None:
            self.share.release(key, self.passed)
        if self.total is not None:
            self.total.release(slow=self.slow)
        self.share = self.total = None
        self.slow = False
