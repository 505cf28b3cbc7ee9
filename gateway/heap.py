"""heap - the interpreter's cyclic garbage collector, set for a long-running server.

CPython's collector runs a young-generation pass every 700 allocations of container
objects, and a full pass over every object now and then - in a process that has just
imported its modules and built its configuration, ~70,000 objects that live as long
as it does.  Measured on the relay (bench/compare.py, `gc.callbacks` timing each pass,
4,000 x 4 KB, three runs): the main process spent 0.40-0.51 s of its ~9 s of CPU
collecting and found almost no cyclic garbage (what it allocates is freed by
reference counting) - frozen and with a young threshold of 10,000, 0.07-0.08 s, about
0.1 ms of CPU per message.  An SMTP worker's closed sessions left ~50 small objects
each in a cycle (0.17-0.26 s before, 0.16-0.21 s with these settings); a finished
session now breaks its cycle itself (`GatewaySMTP._unlink`): 0.035-0.045 s, most of
it at start.
"""

from __future__ import annotations

import gc

YOUNG = 10_000  # container allocations between young-generation passes (CPython: 700)
OLDER = 10  # passes of a generation between passes of the next (CPython: 10, 10)


def settle() -> None:
    """Once a process has started (modules, configuration, listeners): what exists
    now lives as long as the process and is moved out of the collector's sight
    (`gc.freeze`), and young garbage is looked for less often.  Cycles are still
    collected."""
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
