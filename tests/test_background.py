import asyncio
import gc

from gateway.background import Background


async def test_work_nobody_else_holds_runs_to_its_end_and_is_then_let_go() -> None:
    background = Background()
    finished = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    background.run(work())  # the caller keeps no reference
    gc.collect()
    assert len(background) == 1
    await asyncio.wait_for(finished.wait(), 2)
    await asyncio.sleep(0)  # the done callback runs
    assert len(background) == 0


async def test_settle_waits_for_the_running_work_at_most_the_timeout() -> None:
    background = Background()
    quick = background.run(asyncio.sleep(0.05))
    slow = background.run(asyncio.sleep(30))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await background.settle(0.5)
    assert quick.done() and not slow.done()  # not cancelled: it goes on
    assert 0.4 <= loop.time() - started < 5
    slow.cancel()


async def test_settle_returns_at_once_when_nothing_runs() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await Background().settle(30)
    assert loop.time() - started < 1
