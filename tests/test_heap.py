"""The collector settings a started process runs with (gateway.heap)."""

from __future__ import annotations

import subprocess
import sys


def test_settle_freezes_what_exists_and_raises_the_young_threshold():
    # In a process of its own: freezing the test process would keep its garbage.
    script = (
        "import gc\n"
        "from gateway import heap\n"
        "kept = [[i] for i in range(1000)]\n"
        "assert gc.get_freeze_count() == 0\n"
        "heap.settle()\n"
        "assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (heap.YOUNG, heap.OLDER, heap.OLDER)\n"
        "a = []; a.append(a); del a\n"  # a cycle made later is still collected
        "assert gc.collect() >= 1\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
