"""The spool: durable, self-validating files; failures leave nothing half-written."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import aiosmtplib
import pytest

from gateway.errors import SpoolError
from gateway.model import ClientInfo, Envelope, Recipient
from gateway.spool import Spool, new_queue_id
from gateway.spool import store as store_module
from gateway.spool.store import (
    FOOTER_LEN,
    MAGIC,
    RECYCLE_SIZE,
    SPILL_THRESHOLD,
    WHOLE_READ,
    Recycler,
    Reuse,
    is_queue_id,
    read_envelope,
)
from tests.conftest import make_message, queued, smtp_client
from tests.support.fs import small_filesystem
from tests.support.world import wait_until


def _envelope(queue_id: str, size: int, sha: str) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        received_at="2026-11-22T07:00:00+00:00",
        mail_from="s@clinic.test",
        mail_options=("BODY=8BITMIME",),
        recipients=(Recipient("r@example.test"),),
        client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
        size=size,
        sha256=sha,
    )


async def _store(spool: Spool, chunks: list[bytes]) -> Envelope:
    writer = spool.writer(new_queue_id())
    for chunk in chunks:
        await writer.write(chunk)
    return await writer.commit(lambda size, sha: _envelope(writer.queue_id, size, sha))


@pytest.fixture(params=["threaded", "inline"])
def spool(tmp_path, request):
    """A spool committing in its I/O threads (the main process's) or small messages
    on the event loop (an SMTP worker's): the same guarantees either way."""
    s = Spool(tmp_path / "spool", io_threads=2)
    s.inline_commits = request.param == "inline"
    s.open()
    yield s
    s.close()


def test_queue_ids_are_unique_and_sort_by_arrival():
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)
    assert ids == sorted(ids)


# a file of more than WHOLE_READ bytes is read in three pieces, not in one
@pytest.mark.parametrize("size", [0, 10, SPILL_THRESHOLD * 3 + 17, WHOLE_READ + 1])
async def test_committed_file_is_message_then_envelope_then_footer(spool, size):
    data = os.urandom(size)
    env = await _store(spool, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    raw = (spool.queue_dir / env.queue_id).read_bytes()
    assert raw[:size] == data
    footer = raw[-FOOTER_LEN:]
    assert footer.startswith(MAGIC + b" ") and footer.endswith(b"\n")
    assert int(footer.split()[1]) == size
    read_env, read_data = spool.read(env.queue_id)
    assert read_data == data and read_env == env
    assert read_envelope(spool.queue_dir / env.queue_id) == env
    assert env.sha256 == hashlib.sha256(data).hexdigest()
    assert list(spool.tmp_dir.iterdir()) == []


def test_an_envelope_says_its_data_is_its_own_wire_form_only_when_it_was_seen_so():
    import dataclasses
    import json

    plain = _envelope(new_queue_id(), 10, "0" * 64)
    assert "data_is_wire" not in plain.to_dict()  # files of earlier versions alike
    assert Envelope.from_dict(plain.to_dict()).data_is_wire is False
    seen = dataclasses.replace(plain, data_is_wire=True)
    assert Envelope.from_dict(json.loads(json.dumps(seen.to_dict()))) == seen
    assert Envelope.from_dict({**plain.to_dict(), "data_is_wire": "yes"}).data_is_wire is False


async def test_the_envelope_is_written_canonical_and_kept_as_read_for_the_archive(spool):
    """The spool writes the envelope's JSON canonical (`gateway.canonical`): read back,
    an envelope keeps those bytes (`Envelope.spooled_json`), which the archive
    journals as they are - the same as writing them again, for every kind of
    envelope; so does the envelope the commit returns (which a worker hands over).
    A file an earlier version wrote (keys unsorted), an envelope that is not ASCII,
    and a changed copy of one read have none."""
    import dataclasses
    import json

    from gateway.canonical import canonical_text
    from gateway.model import Purpose

    base = _envelope("X", 0, "0" * 64)
    kinds = [
        base,
        dataclasses.replace(
            base,
            recipients=(Recipient("a@x.test", ("NOTIFY=NEVER",)), Recipient("b@y.test")),
            extra={"portal_item": "p1", "n": [1, 2.5, None, True]},
            data_is_wire=True,
            trace_headers='Received: from h\r\n\t"quoted" \\ back\r\n',
            client=ClientInfo(
                ip="::1",
                port=2,
                helo="h",
                tls_version="TLSv1.3",
                client_cert_sha256="ab" * 32,
                authorized_by="client-cert",
            ),
        ),
        dataclasses.replace(base, purpose=Purpose.DSN, mail_from=""),
        dataclasses.replace(base, portal_passphrase="$argon2id$v=19$m=65536,t=3,p=4$abc"),
    ]
    for kind in kinds:
        writer = spool.writer(new_queue_id())
        await writer.write(b"Subject: x\r\n\r\nbody\r\n")
        env = await writer.commit(
            lambda size, sha, kind=kind, queue_id=writer.queue_id: dataclasses.replace(
                kind, queue_id=queue_id, size=size, sha256=sha
            )
        )
        read, _ = spool.read(env.queue_id)
        assert read == env
        assert read.spooled_json == canonical_text(env.to_dict()).encode()
        assert env.spooled_json == read.spooled_json  # the bytes written, kept
        assert read.spooled_json == canonical_text(read.to_dict()).encode()
        assert read_envelope(spool.queue_dir / env.queue_id).spooled_json == read.spooled_json
        assert dataclasses.replace(read, extra={"changed": 1}).spooled_json is None

    # a file of an earlier version: the same envelope, none kept
    path = spool.queue_dir / env.queue_id
    data = b"Subject: x\r\n\r\nbody\r\n"
    unsorted = json.dumps(env.to_dict(), separators=(",", ":")).encode() + b"\n"
    path.write_bytes(data + unsorted + store_module._footer(len(data), len(unsorted)))
    old, _ = spool.read(env.queue_id)
    assert old == env and old.spooled_json is None

    # an address that is not ASCII (SMTPUTF8): journaled the way it was before
    writer = spool.writer(new_queue_id())
    await writer.write(data)
    utf8 = await writer.commit(
        lambda size, sha: dataclasses.replace(
            base, queue_id=writer.queue_id, size=size, sha256=sha, mail_from="jos\u00e9@x.test"
        )
    )
    assert utf8.spooled_json is None
    assert spool.read(utf8.queue_id)[0].spooled_json is None


async def test_open_removes_unacknowledged_leftovers_and_counts_the_queue(tmp_path, spool):
    await _store(spool, [b"one\r\n"])
    await _store(spool, [b"two\r\n"])
    (spool.tmp_dir / new_queue_id()).write_bytes(b"half a mess")
    spool.close()
    again = Spool(tmp_path / "spool")
    report = again.open()
    again.close()
    assert (report.recovered, report.recovered_bytes, report.incomplete_removed) == (2, 10, 1)
    assert list(again.tmp_dir.iterdir()) == []


async def test_a_torn_file_is_quarantined_not_deleted(tmp_path, spool):
    env = await _store(spool, [b"message\r\n"])
    path = spool.queue_dir / env.queue_id
    path.write_bytes(path.read_bytes()[:-10])  # lose the end of the footer
    spool.close()
    again = Spool(tmp_path / "spool")
    report = again.open()
    again.close()
    assert report.corrupt == (env.queue_id,)
    assert (again.corrupt_dir / env.queue_id).exists()
    assert not path.exists()


async def test_a_footer_with_the_magic_but_no_lengths_is_set_aside_at_start(tmp_path, spool):
    env = await _store(spool, [b"message\r\n"])
    path = spool.queue_dir / env.queue_id
    data = path.read_bytes()
    footer = data[-FOOTER_LEN:]
    path.write_bytes(
        data[:-FOOTER_LEN] + footer[: len(MAGIC) + 1] + b"x" * (FOOTER_LEN - len(MAGIC) - 2) + b"\n"
    )
    spool.close()
    again = Spool(tmp_path / "spool")
    report = again.open()  # not a ValueError that keeps the gateway from starting
    again.close()
    assert report.corrupt == (env.queue_id,) and report.recovered == 0
    assert (again.corrupt_dir / env.queue_id).exists()


async def test_altered_message_bytes_fail_verification(spool):
    env = await _store(spool, [b"dose: 5 mg\r\n"])
    path = spool.queue_dir / env.queue_id
    path.write_bytes(path.read_bytes().replace(b"5 mg", b"9 mg"))
    with pytest.raises(SpoolError, match="do not match their SHA-256"):
        spool.read(env.queue_id)


async def test_a_spool_that_cannot_write_answers_451_and_keeps_nothing(gateway_factory):
    gw = await gateway_factory()
    gw.spool.tmp_dir.rmdir()
    gw.spool.tmp_dir.write_text("not a directory")  # every create in tmp/ now fails
    async with smtp_client(gw) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as e:
            await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    assert e.value.code == 451
    assert e.value.message.startswith("4.3.0")
    assert queued(gw) == []
    assert gw.metrics.messages_rejected.labels("spool_error")._value.get() == 1


@pytest.mark.parametrize("message_size", [20_000, SPILL_THRESHOLD * 4])
async def test_disk_full_answers_451_leaves_nothing_and_recovers(
    gateway_factory, tmp_path, message_size
):
    with small_filesystem(tmp_path / "small", "2m") as mount:
        gw = await gateway_factory(
            {"state_dir": str(mount / "state"), "spool.min_free_space": "1KiB"}
        )
        filler = mount / "filler"
        body = ("x" * 76 + "\r\n") * (message_size // 78)
        async with smtp_client(gw) as client:
            await client.mail("s@clinic.test")
            await client.rcpt("r@example.test")
            # the disk fills up between MAIL (which saw room) and the end of DATA
            with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            with pytest.raises(aiosmtplib.SMTPDataError) as e:
                await client.data(make_message(body=body))
            assert e.value.code == 451
            assert queued(gw) == [] and list(gw.spool.tmp_dir.iterdir()) == []
            filler.unlink()
            errors, _ = await client.sendmail(
                "s@clinic.test", ["r@example.test"], make_message(body=body)
            )
            assert errors == {}
        assert len(queued(gw)) == 1
        await gw.stop()


async def test_commit_returns_only_after_file_fsync_rename_and_directory_fsync(spool, monkeypatch):
    import gateway.spool.store as store

    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        calls.append(
            "fsync-dir" if Path(f"/proc/self/fd/{fd}").resolve().is_dir() else "fsync-file"
        )

    def rename(src, dst) -> None:
        real_rename(src, dst)
        calls.append("rename")

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(store.os, "rename", rename)
    await _store(spool, [b"durable\r\n"])
    assert calls == ["fsync-file", "rename", "fsync-dir"]


async def test_commits_of_one_turn_share_one_directory_fsync_after_all_their_renames(
    spool, monkeypatch
):
    import gateway.spool.store as store

    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        calls.append("dir" if Path(f"/proc/self/fd/{fd}").resolve().is_dir() else "file")

    def rename(src, dst) -> None:
        real_rename(src, dst)
        calls.append("rename")

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(store.os, "rename", rename)
    await asyncio.gather(*(_store(spool, [b"message %d\r\n" % i]) for i in range(3)))
    assert calls == ["file", "rename"] * 3 + ["dir"]


def test_metrics_from_other_processes_are_added_to_ours():
    from gateway.observability.metrics import Metrics

    main, worker = Metrics(), Metrics()
    main.spool_messages.set(3)
    worker.messages_accepted.labels("TLSv1.3").inc(5)
    worker.acceptance_latency.observe(0.004)
    text = main.render(worker.snapshot(), worker.snapshot()).decode()
    assert 'sealgate_messages_accepted_total{tls_version="TLSv1.3"} 10.0' in text
    assert "sealgate_acceptance_latency_seconds_count 2.0" in text
    assert "sealgate_spool_messages 3.0" in text


def test_samples_only_another_process_has_are_shown_too():
    """A label value only a worker used (the API's submissions, the first worker's
    webhook posts) is in the main process's /metrics, its value whole."""
    from gateway.observability.metrics import Metrics

    main, worker = Metrics(), Metrics()
    worker.api_requests.labels("submit", "202").inc(7)
    worker.webhook_posts.labels("ehr", "posted").inc(4)
    worker.webhook_backlog.labels("a,b=c").set(2)  # a value with ',' and '='
    main.api_requests.labels("status", "200").inc()
    text = main.render(worker.snapshot()).decode()
    assert 'sealgate_api_requests_total{operation="submit",status="202"} 7.0' in text
    assert 'sealgate_api_requests_total{operation="status",status="200"} 1.0' in text
    assert 'sealgate_webhook_posts_total{endpoint="ehr",outcome="posted"} 4.0' in text
    assert 'sealgate_webhook_outbox_events{endpoint="a,b=c"} 2.0' in text


async def test_a_failing_commit_fails_alone_in_its_batch(spool):
    def boom() -> int:
        raise OSError("disk on fire")

    results = await asyncio.gather(
        spool.commit_io(lambda: 1),
        spool.commit_io(boom),
        spool.commit_io(lambda: 3),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], OSError) and "disk on fire" in str(results[1])


@pytest.mark.parametrize(
    ("commits", "when"),
    [
        ("threaded", "before its step runs"),
        ("inline", "before its step runs"),
        ("threaded", "while its step runs"),  # (an inline step holds the event loop)
    ],
)
async def test_a_commit_whose_caller_is_cancelled_keeps_nothing(
    tmp_path, monkeypatch, commits, when
):
    """A session reset while its message is being committed never got its 250: the
    message is not kept (else it waited in queue/, announced to no one, until the
    next start delivered it) - removed once the commit is through."""
    import gateway.spool.store as store

    spool = Spool(tmp_path / "spool", io_threads=2)
    spool.inline_commits = commits == "inline"
    spool.open()
    running, go_on, done = threading.Event(), threading.Event(), threading.Event()
    real = store.SpoolWriter._commit_sync

    def commit_sync(self, blob):
        running.set()
        go_on.wait(5)
        real(self, blob)
        done.set()

    monkeypatch.setattr(store.SpoolWriter, "_commit_sync", commit_sync)
    writer = spool.writer(new_queue_id())
    await writer.write(b"Subject: never answered\r\n\r\nbody\r\n")
    task = asyncio.ensure_future(
        writer.commit(lambda size, sha: _envelope(writer.queue_id, size, sha))
    )
    if when == "before its step runs":
        await asyncio.sleep(0)  # the commit is queued; the batch has not run
        task.cancel()
        go_on.set()
    else:
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        go_on.set()  # the step completes after its caller is gone
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(
            lambda: (
                done.is_set()
                and spool.queue_ids() == []
                and (spool.messages, spool.bytes) == (0, 0)
            ),
            timeout=5,
            what="the abandoned commit undone",
        )
        assert list(spool.tmp_dir.iterdir()) == []
    finally:
        spool.close()


async def test_a_worker_commits_small_messages_on_its_event_loop_and_large_ones_in_a_thread(
    tmp_path, monkeypatch
):
    """Inline commits: a batch of small messages runs on the event loop's thread; a
    spilled message's commit goes to an I/O thread, and so does every batch for a
    while after one held the event loop too long (a slow disk)."""
    import gateway.spool.store as store

    spool = Spool(tmp_path / "spool", io_threads=2)
    spool.inline_commits = True
    spool.open()
    threads: list[str] = []
    real = store.SpoolWriter._commit_sync

    def commit_sync(self, blob):
        threads.append(threading.current_thread().name)
        real(self, blob)

    monkeypatch.setattr(store.SpoolWriter, "_commit_sync", commit_sync)
    loop_thread = threading.current_thread().name
    try:
        await asyncio.gather(*(_store(spool, [b"small %d\r\n" % i]) for i in range(3)))
        assert threads == [loop_thread] * 3
        threads.clear()
        big = os.urandom(SPILL_THRESHOLD + 10)
        await _store(spool, [big])
        assert len(threads) == 1 and threads[0].startswith("spool-io")
        threads.clear()

        def where() -> None:
            threads.append(threading.current_thread().name)

        # a batch with one commit that is not small goes to a thread as a whole
        await asyncio.gather(spool.commit_io(where, small=True), spool.commit_io(where))
        assert len(threads) == 2 and all(t.startswith("spool-io") for t in threads)
        threads.clear()
        monkeypatch.setattr(store, "INLINE_STALL", 0.0)  # any batch is too long now
        await _store(spool, [b"held the loop\r\n"])
        await _store(spool, [b"the next one\r\n"])
        assert threads[0] == loop_thread and threads[1].startswith("spool-io")
        assert spool.read(spool.queue_ids()[0])[1]  # all durable and readable
        assert len(spool.queue_ids()) == 6
    finally:
        spool.close()


async def test_one_slow_fsync_keeps_a_workers_commits_inline_and_a_slow_disk_does_not(
    tmp_path, monkeypatch
):
    """A batch of 30 ms on the event loop once (another process's checkpoint, the
    disk's hiccup) leaves the next batches on the event loop - it sent every batch of
    the next 10 s to a thread, at a cost of CPU a message; batches that stay slow (a
    slow disk: 50 ms each) go to a thread after a few."""
    import gateway.spool.store as store

    spool = Spool(tmp_path / "spool", io_threads=2)
    spool.inline_commits = True
    spool.open()
    threads: list[str] = []
    slow: list[float] = []  # how long the next commits take at least
    real = store.SpoolWriter._commit_sync

    def commit_sync(self, blob):
        threads.append(threading.current_thread().name)
        if slow:
            time.sleep(slow.pop())
        real(self, blob)

    monkeypatch.setattr(store.SpoolWriter, "_commit_sync", commit_sync)
    loop_thread = threading.current_thread().name
    try:
        slow.append(0.03)
        await _store(spool, [b"held the loop once\r\n"])
        for i in range(3):
            await _store(spool, [b"quick %d\r\n" % i])
        assert threads == [loop_thread] * 4
        threads.clear()
        for i in range(4):
            slow.append(0.05)
            await _store(spool, [b"slow %d\r\n" % i])
        assert threads[0] == loop_thread and threads[-1].startswith("spool-io")
        assert len(spool.queue_ids()) == 8
    finally:
        spool.close()


@pytest.fixture
def recycling(tmp_path, monkeypatch):
    """A main process's spool recycling for one writer, and that writer's spool
    (looking for recycled files each time)."""
    monkeypatch.setattr("gateway.spool.store.RESCAN_AFTER", 0.0)
    main = Spool(tmp_path / "spool", io_threads=2)
    main.open()
    main.recycler = Recycler(main.free_dir, 1)
    writer = Spool(tmp_path / "spool", io_threads=2)
    writer.reuse = Reuse(writer.free_dir, 0)
    writer.start_io()
    yield main, writer
    writer.close()
    main.close()


@pytest.mark.parametrize("second", [100, 9000, SPILL_THRESHOLD + 5000])
async def test_a_done_message_file_is_zeroed_and_the_next_message_written_into_it(
    recycling, second
):
    main, writer = recycling
    first = os.urandom(5000)
    env = await _store(writer, [first])
    inode = os.stat(main.queue_dir / env.queue_id).st_ino
    main.remove(env.queue_id, env.size)
    assert not (main.queue_dir / env.queue_id).exists()
    (kept,) = list((main.free_dir / "0").iterdir())
    assert kept.stat().st_ino == inode
    assert set(kept.read_bytes()) == {0}  # nothing of the message is left to read
    data = os.urandom(second)
    env2 = await _store(writer, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    path = main.queue_dir / env2.queue_id
    assert path.stat().st_ino == inode  # the same file, shorter or longer
    assert main.read(env2.queue_id) == (env2, data)  # footer, length and digest check out
    assert list((main.free_dir / "0").iterdir()) == []


async def test_large_files_and_files_beyond_the_kept_number_are_removed(recycling, monkeypatch):
    main, writer = recycling
    monkeypatch.setattr("gateway.spool.store.RECYCLE_KEEP", 2)
    envs = [await _store(writer, [b"x" * 100]) for _ in range(3)]
    big = await _store(writer, [b"y" * (RECYCLE_SIZE + 1)])
    for env in [*envs, big]:
        main.remove(env.queue_id, env.size)
    assert len(list((main.free_dir / "0").iterdir())) == 2
    assert list(main.queue_dir.iterdir()) == [] and main.messages == 0


async def test_a_file_that_cannot_be_overwritten_is_removed_and_counted_out(recycling, monkeypatch):
    main, _ = recycling
    env = await _store(main, [b"x" * 100])
    assert (main.messages, main.bytes) == (1, 100)

    def failing(fd, data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("gateway.spool.store.write_all", failing)
    main.remove(env.queue_id, env.size)
    assert list(main.queue_dir.iterdir()) == []
    assert [p for p in main.free_dir.rglob("*") if p.is_file()] == []  # not handed out
    assert (main.messages, main.bytes) == (0, 0)
    assert main.recycler._held == [0]  # its place in the pool given back


async def test_a_full_pool_that_its_writer_emptied_is_filled_again(recycling, monkeypatch):
    main, writer = recycling
    monkeypatch.setattr("gateway.spool.store.RECYCLE_KEEP", 2)
    monkeypatch.setattr("gateway.spool.store.RECOUNT_EVERY", 3)
    pool = main.free_dir / "0"
    done = [await _store(writer, [b"x" * 100]) for _ in range(4)]
    for env in done:  # two kept, two removed: the pool is full
        main.remove(env.queue_id, env.size)
    assert len(list(pool.iterdir())) == 2
    taken = [await _store(writer, [b"y" * 100]) for _ in range(2)]  # the writer takes both
    assert list(pool.iterdir()) == []
    more = [await _store(writer, [b"z" * 100]) for _ in range(4)]
    for env in taken + more:
        main.remove(env.queue_id, env.size)
    # counted again after at most RECOUNT_EVERY turns, then filled
    assert len(list(pool.iterdir())) == 2
    assert list(main.queue_dir.iterdir()) == [] and main.messages == 0


async def test_a_pool_holds_no_more_bytes_than_its_bound(recycling, monkeypatch):
    main, writer = recycling
    envs = [await _store(writer, [b"x" * 100]) for _ in range(3)]
    file_size = (main.queue_dir / envs[0].queue_id).stat().st_size  # with envelope, footer
    monkeypatch.setattr("gateway.spool.store.RECYCLE_BYTES", file_size * 5 // 2)
    for env in envs:
        main.remove(env.queue_id, env.size)
    kept = list((main.free_dir / "0").iterdir())
    assert len(kept) == 2 and sum(p.stat().st_size for p in kept) == 2 * file_size
    assert list(main.queue_dir.iterdir()) == []


async def test_no_file_is_kept_while_the_disk_is_short_of_space(tmp_path):
    main = Spool(tmp_path / "spool", io_threads=2)
    main.open()
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    main.recycler = Recycler(main.free_dir, 1, keep_free=free)  # half of it must stay free
    env = await _store(main, [b"x" * 100])
    main.remove(env.queue_id, env.size)
    assert list(main.queue_dir.iterdir()) == [] and list((main.free_dir / "0").iterdir()) == []
    main.close()


async def test_recycled_files_are_dealt_to_the_writers_in_turn_and_cleared_at_start(tmp_path):
    main = Spool(tmp_path / "spool", io_threads=2)
    main.open()
    main.recycler = Recycler(main.free_dir, 2)
    worker = Spool(tmp_path / "spool", io_threads=2)
    worker.start_io()
    envs = [await _store(worker, [b"z" * 50]) for _ in range(4)]
    worker.close()
    for env in envs:
        main.remove(env.queue_id, env.size)
    # two SMTP workers' pools, and the main process's own (none of theirs)
    assert [len(list((main.free_dir / str(n)).iterdir())) for n in (0, 1, 2)] == [2, 2, 0]
    (main.free_dir / "staged-when-it-crashed").write_bytes(b"phi")
    main.close()
    again = Spool(tmp_path / "spool", io_threads=2)
    again.open()
    assert [p for p in again.free_dir.rglob("*") if p.is_file()] == []
    again.close()


async def test_the_main_process_writes_its_own_mail_into_files_of_its_own_pool(
    tmp_path, monkeypatch
):
    """Its own mail (a DSN, a portal notification) and the API's go back to its own
    pool when done, not to the SMTP workers': it writes over them, instead of
    creating a file for each message."""
    monkeypatch.setattr("gateway.spool.store.RESCAN_AFTER", 0.0)
    main = Spool(tmp_path / "spool", io_threads=2)
    main.open()
    main.recycler = Recycler(main.free_dir, 2)
    main.reuse = Reuse(main.free_dir, main.recycler.own)
    worker = Spool(tmp_path / "spool", io_threads=2)
    worker.start_io()
    try:
        own = await _store(main, [b"a notification\r\n"])
        relayed = await _store(worker, [b"a message\r\n"])
        inode = os.stat(main.queue_dir / own.queue_id).st_ino
        main.remove(own.queue_id, own.size)
        main.remove(relayed.queue_id, relayed.size)
        assert [len(list((main.free_dir / str(n)).iterdir())) for n in (0, 1, 2)] == [1, 0, 1]
        again = await _store(main, [b"the next notification\r\n"])
        assert os.stat(main.queue_dir / again.queue_id).st_ino == inode
        assert main.read(again.queue_id)[1] == b"the next notification\r\n"
    finally:
        worker.close()
        main.close()


async def test_while_other_sessions_are_open_a_commit_soon_after_a_batch_joins_the_next(
    spool, monkeypatch
):
    # (an SMTP worker's commits: one directory fsync for those of several sessions)
    monkeypatch.setattr("gateway.spool.store.COMMIT_LINGER", 0.5)
    fsyncs: list[str] = []
    real = store_module.fsync_dir
    monkeypatch.setattr(store_module, "fsync_dir", lambda d: (fsyncs.append(str(d)), real(d)))
    spool.siblings = lambda: 3
    assert await spool.commit_io(lambda: 0) == 0
    first = spool.commit_io(lambda: 1)
    await asyncio.sleep(0.05)  # turns of the loop later: without waiting, its own batch
    second = spool.commit_io(lambda: 2)
    assert await asyncio.gather(first, second) == [1, 2]
    assert len(fsyncs) == 2


async def test_a_lone_sessions_commit_never_waits(spool, monkeypatch):
    monkeypatch.setattr("gateway.spool.store.COMMIT_LINGER", 60.0)
    assert spool.siblings() == 0  # (the main process's, and a worker's lone session)
    assert await spool.commit_io(lambda: 0) == 0
    assert await asyncio.wait_for(spool.commit_io(lambda: 1), 5) == 1  # not 60 s later
