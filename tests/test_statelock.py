"""One gateway per state directory (`gateway.statelock`): a second daemon - or
`storage copy` - on the directory of a running one stops at once with the holder's
pid and exit status 75, touching nothing; the lock is gone with the process that
held it, however it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gateway.statelock import StateInUse, StateLock
from tests.conftest import make_message, run_sealgate, smtp_client


async def test_a_second_gateway_on_the_same_state_directory_does_not_start(gateway_factory):
    first = await gateway_factory()
    state = first.config.state_dir
    with pytest.raises(StateInUse, match=f"in use by another sealgate \\(pid {os.getpid()}\\)"):
        await gateway_factory()
    # the one that runs is untouched: it still takes mail
    async with smtp_client(first) as client:
        await client.sendmail("doctor@clinic.test", ["pat@example.org"], make_message())
    await first.stop(grace=1.0)
    again = await gateway_factory()
    assert again.config.state_dir == state


def test_sealgate_run_and_storage_copy_on_a_held_state_directory_exit_75(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    held = StateLock(state / "sealgate.lock")
    held.acquire()
    try:
        run = run_sealgate("run", "--state-dir", str(state))
        assert run.returncode == 75
        assert f"{state} is in use by another sealgate (pid {os.getpid()})" in run.stderr
        copy = run_sealgate(
            "storage", "copy", "--to", "postgresql://127.0.0.1:1/x", "--state-dir", str(state)
        )
        assert copy.returncode == 75 and "in use by another sealgate" in copy.stderr
        assert sorted(p.name for p in state.iterdir()) == ["sealgate.lock"]  # nothing else
    finally:
        held.release()


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    lock = tmp_path / "sealgate.lock"
    with subprocess.Popen(  # noqa: S603 - our own interpreter
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from gateway.statelock import StateLock; "
            f"StateLock(Path({str(lock)!r})).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(StateInUse, match=f"pid {holder.pid}"):
                StateLock(lock).acquire()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
    mine = StateLock(lock)
    mine.acquire()
    assert lock.read_text() == f"{os.getpid()}\n"
    mine.release()
