"""The batcher behind the queue's writes and removals and the archive's writes: jobs
issued in one turn of the event loop run as one batch, and under load (``linger``)
those of the next turns too; a failing job fails alone; once its executor is shut
down (its owner stopping) a job fails at once with the reason - never a caller left
waiting, never an error loose in the event loop."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.batching import Batcher, run_each
from tests.support.world import wait_until


async def test_jobs_of_one_turn_share_a_batch_and_a_failing_one_fails_alone() -> None:
    sizes: list[int] = []
    run_batch = _recording(sizes)

    def boom() -> int:
        raise ValueError("this one")

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(executor, run_batch)
        results = await asyncio.gather(
            batcher.run(lambda: 1), batcher.run(boom), batcher.run(lambda: 3),
            return_exceptions=True,
        )  # fmt: skip
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError)
    assert sizes == [3]


async def test_after_its_executor_shut_down_a_job_fails_at_once_and_nothing_is_loose() -> None:
    loose: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: loose.append(context))
    try:
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(executor, run_each)
        assert await batcher.run(lambda: "before") == "before"
        executor.shutdown(wait=True)
        batcher.post(lambda: None)  # nobody waits: dropped with the rest
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.wait_for(batcher.run(lambda: "after"), 2)
        with pytest.raises(RuntimeError, match="shutdown"):  # and again: not stuck
            await asyncio.wait_for(batcher.run(lambda: "later"), 2)
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert loose == []


async def test_under_load_a_batch_lingers_for_the_jobs_of_the_next_turns() -> None:
    sizes: list[int] = []
    run_batch = _recording(sizes)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(executor, run_batch, linger=0.5)
        assert await asyncio.gather(batcher.run(lambda: 0), batcher.run(lambda: 0)) == [0, 0]
        await _idle(batcher)  # a batch of two has just ended: under load
        first = batcher.submit(lambda: 1)
        await asyncio.sleep(0.05)  # turns of the loop later
        second = batcher.submit(lambda: 2)
        assert await asyncio.gather(first, second) == [1, 2]
    assert sizes == [2, 2]


async def test_after_a_quiet_spell_a_job_goes_at_once() -> None:
    now = [0.0]
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(executor, run_each, linger=60, clock=lambda: now[0])
        assert await asyncio.gather(batcher.run(lambda: 1), batcher.run(lambda: 1)) == [1, 1]
        await _idle(batcher)
        now[0] = 61.0  # a quiet minute since that batch
        assert await asyncio.wait_for(batcher.run(lambda: 2), 5) == 2  # not 60 s later


async def test_a_lone_job_after_a_lone_job_goes_at_once() -> None:
    # (a quiet gateway's message: its recipients recorded, then its attempt's result)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(executor, run_each, linger=60, clock=lambda: 0.0)
        assert await batcher.run(lambda: 1) == 1
        await _idle(batcher)
        assert await asyncio.wait_for(batcher.run(lambda: 2), 5) == 2


async def test_a_flush_does_not_wait_out_the_linger_and_takes_what_is_pending() -> None:
    # (a stopping archive: its last records and checkpoint go now, not a linger later)
    sizes: list[int] = []
    run_batch = _recording(sizes)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(executor, run_batch, linger=60, clock=lambda: 0.0)
        assert await asyncio.gather(batcher.run(lambda: 0), batcher.run(lambda: 0)) == [0, 0]
        await _idle(batcher)  # a batch of two has just ended: the next one lingers
        waiting = batcher.submit(lambda: 1)
        await asyncio.sleep(0.05)
        assert not waiting.done()  # lingering
        assert await asyncio.wait_for(batcher.flush(lambda: 2), 5) == 2
        assert waiting.result() == 1
        await _idle(batcher)
        assert await asyncio.wait_for(batcher.flush(lambda: 3), 5) == 3  # its own linger too
    assert sizes == [2, 2, 1]


def _recording(sizes: list[int]):
    """A batch runner that notes each batch's size in ``sizes``."""

    def run_batch(jobs):
        sizes.append(len(jobs))
        return run_each(jobs)

    return run_batch


async def _idle(batcher: Batcher) -> None:
    """Until the batcher's thread has run out of jobs (it looks once more after the
    callers of its last batch were answered)."""
    await wait_until(lambda: not batcher.busy, timeout=5, what="the batcher idle")
