"""Where an unclosed socket transport was made.

asyncio warns "unclosed transport" when the garbage collector finds a transport
whose socket is still open - in whichever test the collection happens to run, often
a later one than the test that left it.  This plugin notes, for every selector
transport the test process makes, the test that made it and the innermost frames
that did; when one is collected unclosed, that, its addresses and its protocol go
to stderr beside the warning, so the failing test's report names the culprit.  A
few microseconds a transport.
"""

from __future__ import annotations

import sys
from asyncio import selector_events

import pytest

_FRAMES = 14
_running = ["(no test)"]
_made = selector_events._SelectorTransport.__init__
_collected = selector_events._SelectorTransport.__del__


def _init(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    _made(self, *args, **kwargs)
    frame, where = sys._getframe(1), []
    while frame is not None and len(where) < _FRAMES:
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    self._made_where = (_running[0], where)


def _del(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    if getattr(self, "_sock", None) is not None:
        test, where = getattr(self, "_made_where", ("?", []))
        lines = "\n  ".join(where)
        protocol = type(getattr(self, "_protocol", None))
        ends = (self.get_extra_info("sockname"), self.get_extra_info("peername"))
        sys.stderr.write(
            f"unclosed {type(self).__name__} {ends[0]} -> {ends[1]}, protocol "
            f"{protocol.__module__}.{protocol.__qualname__}, made in {test}, at:\n  {lines}\n"
        )
    _collected(self, *args, **kwargs)


selector_events._SelectorTransport.__init__ = _init  # type: ignore[method-assign]
selector_events._SelectorTransport.__del__ = _del  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[0] = item.nodeid
