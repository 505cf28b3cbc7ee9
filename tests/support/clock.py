"""A clock the tests move instead of waiting: `Clock.install(obj)` replaces
``obj.clock`` (the portal store's, the AUTH throttle's) by one that runs with the
real one plus an offset, and `advance` adds to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Clock:
    def __init__(self, real: Callable[[], float]):
        self.real = real
        self.offset = 0.0

    def __call__(self) -> float:
        return self.real() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    @classmethod
    def install(cls, owner: Any) -> Clock:
        clock = cls(owner.clock)
        owner.clock = clock
        return clock
