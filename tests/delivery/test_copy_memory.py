"""``delivery.copy_memory``: the recipients' own copies (S/MIME here) being made and
sent at once stay within it - a large message to recipients at several domains is
encrypted and sent one copy after another when two would not fit, and every copy
still arrives and decrypts; the budget itself is first come, first served, lets a
copy larger than all of it go alone, and forgets an attempt cancelled while waiting."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from gateway.delivery.budget import ByteBudget, copy_cost
from tests.conftest import make_message, run_sealgate, smtp_client
from tests.support.delivery import start, state
from tests.support.smime_pki import mailbox
from tests.support.world import wait_until

DOMAINS = [f"d{n}.test" for n in range(1, 5)]
KEYS = mailbox(*(f"r@{d}" for d in DOMAINS), n=7)  # one certificate for the four
LINE = "Potassium 4.1 mmol/L, sodium 139 mmol/L, creatinine 0.9 mg/dL - all in range.\r\n"
BODY = LINE * 2500  # ~200 KB: its copy counts ~1.5 MB


def sample(gw, name: str) -> float:
    return gw.metrics.registry.get_sample_value(name) or 0.0


@pytest.mark.parametrize(("limit", "at_once"), [("2MiB", 1), ("512MiB", 4)])
async def test_copies_beyond_the_budget_wait_their_turn_and_all_arrive(
    gateway_factory, world, pki, tmp_path, limit, at_once
):
    # one server for four domains (none can prove itself: S/MIME is chosen), slow to
    # answer DATA, so copies in flight at once are seen there at once
    mx = await world.mta("mx.dest.test", "127.0.0.73", cert="self-signed", data_delay=0.6)
    for domain in DOMAINS:
        world.dns.add(domain, "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki, **{"delivery.copy_memory": limit})
    cert, key = KEYS.write(tmp_path, "r")
    imported = await asyncio.to_thread(
        run_sealgate, "keys", "import", str(cert), "--state-dir", str(gw.config.state_dir)
    )
    assert imported.returncode == 0, imported.stderr
    rcpts = [f"r@{d}" for d in DOMAINS]
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("doctor@clinic.test", rcpts, make_message("Labs", BODY))
    queue_id = reply.rsplit(" ", 1)[1]
    await wait_until(lambda: len(mx.received) == 4, timeout=60, what="four copies")
    assert mx.most_in_data == at_once
    await wait_until(  # the results are recorded after the remote 250s
        lambda: set(state(gw, queue_id).values()) == {("delivered", "2.0.0")},
        what="four delivered",
    )
    for copy in mx.received:
        assert b"Potassium" not in copy.data
        decrypted = subprocess.run(
            ["openssl", "cms", "-decrypt", "-recip", str(cert), "-inkey", str(key)],
            input=copy.data,
            capture_output=True,
            timeout=30,
        )
        assert decrypted.returncode == 0, decrypted.stderr
        assert decrypted.stdout.count(b"Potassium") == 2500
    await wait_until(lambda: sample(gw, "sealgate_delivery_copy_memory_bytes") == 0)
    assert sample(gw, "sealgate_delivery_copies_waiting") == 0


async def test_the_budget_is_first_come_first_served_and_a_copy_too_large_goes_alone():
    budget = ByteBudget(100)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcd"}

    async def copy(name: str, size: int) -> None:
        async with budget.hold(size):
            order.append(name)
            await release[name].wait()

    a = asyncio.create_task(copy("a", 60))
    await asyncio.sleep(0)
    b = asyncio.create_task(copy("b", 500))  # larger than all of it: waits for a alone
    c = asyncio.create_task(copy("c", 30))  # would fit beside a, but b came first
    await asyncio.sleep(0.01)
    assert order == ["a"] and budget.waiting == 2 and budget.held == 60
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b"] and budget.held == 500  # alone
    release["b"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c"] and budget.held == 30
    release["c"].set()
    await asyncio.gather(a, b, c)
    assert budget.held == 0 and budget.waiting == 0


async def test_an_attempt_cancelled_while_waiting_gives_its_turn_to_the_next():
    budget = ByteBudget(100)
    first = asyncio.Event()

    async def hold(size: int, until: asyncio.Event | None = None) -> None:
        async with budget.hold(size):
            if until is not None:
                await until.wait()

    a = asyncio.create_task(hold(90, first))
    await asyncio.sleep(0)
    big = asyncio.create_task(hold(80))  # waits behind a
    small = asyncio.create_task(hold(10))  # waits behind big (first come, first served)
    await asyncio.sleep(0.01)
    assert budget.waiting == 2
    big.cancel()
    await asyncio.sleep(0.01)
    assert small.done() and budget.waiting == 0  # 10 fits beside a once big is gone
    first.set()
    await a
    with pytest.raises(asyncio.CancelledError):
        await big
    assert budget.held == 0


async def test_a_larger_budget_after_a_reload_lets_the_waiting_in():
    budget = ByteBudget(100)
    gate = asyncio.Event()

    async def hold(size: int) -> None:
        async with budget.hold(size):
            await gate.wait()

    tasks = [asyncio.create_task(hold(70)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert budget.held == 70 and budget.waiting == 1
    budget.resize(200)
    await asyncio.sleep(0)
    assert budget.held == 140 and budget.waiting == 0
    gate.set()
    await asyncio.gather(*tasks)
    assert budget.held == 0


async def test_a_copy_handed_to_the_archive_stays_counted_until_it_is_written():
    budget = ByteBudget(100)
    written = asyncio.get_running_loop().create_future()
    async with budget.hold(60) as after:
        after.append(written)
    assert budget.held == 60  # sent, not yet archived
    written.set_exception(OSError("disk full"))  # failed: written again later, apart
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert budget.held == 0


def test_a_copy_is_counted_as_seven_times_the_message():
    assert copy_cost(1_000_000) == 7_000_000 + 64 * 1024
