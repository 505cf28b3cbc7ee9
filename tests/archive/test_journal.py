"""The journal: messages and events in, verification names every record that was
altered or removed, and checkpoints pin the log.  This is the archive index's
contract too: every test runs on SQLite (blobs in files and in the index) and on a
real PostgreSQL server, where several nodes append to one log."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import os
import sqlite3
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.archive.journal import Archive, canonical, copy_name
from gateway.archive.query import Query
from gateway.archive.sealing import MasterKeys
from gateway.archive.service import _Copy, _Journal
from gateway.archive.store import BLOCK, ArchiveIndex, FileBlobStore, SqlBlobStore
from gateway.config import load_config_text
from gateway.model import Envelope
from gateway.spool import Spool, new_queue_id
from gateway.storage.database import StorageError
from gateway.storage.stores import ARCHIVE_PAGE_SIZE, Storage
from tests.support.envelopes import envelope
from tests.support.stores import opener

ENVELOPE = {
    "queue_id": "Q1",
    "received_at": "2026-11-22T10:00:00+00:00",
    "mail_from": "dr@clinic.test",
    "recipients": [{"address": "a@dest.test"}, {"address": "bcc@dest.test"}],
}
DATA = b"From: dr@clinic.test\r\nSubject: Biopsy\r\n\r\nThe margins are clear.\r\n"


KEYS = MasterKeys("k1", {"k1": os.urandom(32)})
SIGNER = ed25519.Ed25519PrivateKey.generate()


def node(index: ArchiveIndex, blobs=None) -> Archive:
    """An archive on ``index`` (blobs in its database unless given): one node's view."""
    return Archive(
        blobs or SqlBlobStore(index.db),
        index,
        KEYS,
        "archive.clinic.test/sealgate",
        SIGNER,
        "archive.clinic.test",
    )


@pytest.fixture(params=["files", "sqlite", "postgresql"])
def connect_index(tmp_path, request):
    """Opens the index as one node would (each call a new connection to the same
    index): SQLite in the test's directory, or the test's PostgreSQL database."""
    opened: list[ArchiveIndex] = []
    engine = "postgresql" if request.param == "postgresql" else "sqlite"
    connect = opener(engine, request, tmp_path, [])

    def open_index() -> ArchiveIndex:
        opened.append(ArchiveIndex(connect(), subjects=True))
        return opened[-1]

    open_index.files = request.param == "files"
    yield open_index
    for index in opened:
        index.close()


@pytest.fixture
def archive(tmp_path, connect_index):
    index = connect_index()
    a = node(index, FileBlobStore(tmp_path / "blobs") if connect_index.files else None)
    for n in range(1, 4):
        envelope = {**ENVELOPE, "queue_id": f"Q{n}"}
        a.journal_message(envelope, DATA.replace(b"Biopsy", f"Biopsy {n}".encode()), subject=True)
        a.journal_event(f"Q{n}", "attempt", {"rcpt": "a@dest.test", "outcome": "delivered"})
    return a


def test_a_message_comes_back_byte_for_byte_with_its_envelope(archive, tmp_path):
    envelope, data = archive.message("Q2")
    assert data == DATA.replace(b"Biopsy", b"Biopsy 2")
    assert [r["address"] for r in envelope["recipients"]] == ["a@dest.test", "bcc@dest.test"]
    assert b"Biopsy" not in archive.blobs.get("msg-Q2")  # encrypted at rest
    leaves = archive.index.db.execute("SELECT kind, record_id FROM leaves").fetchall()
    assert leaves == [
        ("message", "msg-Q1"),
        ("event", "evt-1"),
        ("message", "msg-Q2"),
        ("event", "evt-3"),
        ("message", "msg-Q3"),
        ("event", "evt-5"),
    ]


def test_an_intact_archive_verifies(archive):
    archive.checkpoint()
    archive.journal_message({**ENVELOPE, "queue_id": "Q4"}, DATA)
    archive.checkpoint()
    report = archive.verify()
    assert report.ok, report.problems
    assert (report.leaves, report.checkpoints) == (7, 2)


def test_a_flipped_byte_a_removed_blob_and_an_altered_row_are_each_named(archive, tmp_path):
    archive.checkpoint()
    raw = bytearray(archive.blobs.get("msg-Q1"))  # behind the archive's back
    raw[-3] ^= 1
    archive.blobs.put("msg-Q1", bytes(raw))
    archive.blobs.delete("msg-Q2")
    archive.index.db.execute(
        "UPDATE events SET body=replace(body, 'delivered', 'bounced') WHERE record_id='evt-5'"
    )
    problems = {(p.record_id, p.what) for p in archive.verify().problems}
    assert (
        "msg-Q1",
        "its stored content: record msg-Q1: altered, or not this record's",
    ) in problems
    assert ("msg-Q2", "its stored content is gone") in problems
    assert ("evt-5", "its index row was altered") in problems
    assert len(problems) == 3


def test_a_removed_index_row_or_leaf_is_named_and_the_checkpoint_catches_it(archive):
    archive.checkpoint()
    archive.index.db.execute("DELETE FROM events WHERE record_id='evt-3'")
    archive.index.db.execute("DELETE FROM leaves WHERE record_id='msg-Q3'")
    problems = {(p.record_id, p.what) for p in archive.verify().problems}
    assert ("evt-3", "its index row is gone") in problems
    assert ("msg-Q3", "indexed but not in the log") in problems
    assert ("msg-Q3", "a stored blob the log does not know") in problems
    assert ("evt-5", "a leaf is missing before it") in problems
    assert ("checkpoint-6", "the log no longer has this root") in problems


def test_a_rewritten_history_is_not_consistent_with_an_earlier_checkpoint(archive):
    archive.checkpoint()  # size 6
    # someone with database access replaces a leaf and re-signs... without our key
    forger = ed25519.Ed25519PrivateKey.generate()
    archive.index.db.execute("UPDATE leaves SET hash=? WHERE idx=2", (b"\x00" * 32,))
    problems = {(p.record_id, p.what) for p in archive.verify().problems}
    assert ("evt-1", "its index row was altered") in problems
    assert ("checkpoint-6", "the log no longer has this root") in problems
    real = archive.signing_key
    archive.signing_key = forger
    archive.journal_event("Q1", "attempt", {"outcome": "delivered"})
    archive.checkpoint()  # a new checkpoint under the wrong key
    archive.signing_key = real
    problems = {(p.record_id, p.what) for p in archive.verify().problems}
    assert ("checkpoint-7", "no signature of archive.clinic.test") in problems


def test_a_purge_under_retention_is_not_tampering_and_a_held_message_is_not_purged(
    archive, tmp_path
):
    now = archive.index.db.execute("SELECT max(retain_until) FROM messages").fetchone()[0] + 1
    assert archive.expired(now - 10 * 365 * 86400) == []  # nothing expired yet
    assert archive.hold("case-1042 Roe v. Clinic", "counsel@clinic.test", ["Q2"]) == 1
    assert archive.expired(now) == ["Q1", "Q3"]  # Q2 is held
    assert archive.purge(["Q1", "Q2"], "retention: 6 years", "records@clinic.test", now) == ["Q1"]
    assert archive.blobs.get("msg-Q1") is None
    assert archive.blobs.get("msg-Q2") is not None  # the hold beats retention
    report = archive.verify()
    assert report.ok, report.problems  # a lawful purge, recorded in the log
    kinds = [k for (k,) in archive.index.db.execute("SELECT kind FROM events ORDER BY leaf")]
    assert kinds[-2:] == ["hold", "disposition"]
    archive.release("case-1042 Roe v. Clinic", "counsel@clinic.test")
    assert archive.expired(now) == ["Q2", "Q3"]
    # a removal without a disposition record is tampering
    archive.blobs.delete("msg-Q3")
    problems = {(p.record_id, p.what) for p in archive.verify().problems}
    assert problems == {("msg-Q3", "its stored content is gone")}


def test_what_is_written_or_purged_while_verify_runs_is_not_a_problem(
    archive, connect_index, monkeypatch
):
    """Verify reads one snapshot of the index, while the blob store (files, a
    bucket) is read live: what another node journals or purges meanwhile - and a
    batch whose blobs are stored but whose rows are not committed yet - is newer
    than the snapshot, not tampering."""
    import threading

    other = node(connect_index(), archive.blobs if connect_index.files else None)
    now = archive.index.db.execute("SELECT max(retain_until) FROM messages").fetchone()[0] + 1
    real_get, real_names = archive.blobs.get, archive.blobs.names
    stored = threading.Event()

    def get_after_others_wrote(name):  # the walk has begun: its snapshot is taken
        if not stored.is_set() and name == "msg-Q1":
            other.journal_message({**ENVELOPE, "queue_id": "Q5"}, DATA)
            assert other.purge(["Q1"], "retention: 6 years", "records@clinic.test", now) == ["Q1"]
        return real_get(name)

    def in_flight():  # a batch: Q6's blob is stored, then its rows commit 0.5 s later
        other.batch(
            [
                lambda: other.journal_message({**ENVELOPE, "queue_id": "Q6"}, DATA),
                lambda: (stored.set(), time.sleep(0.5)),
            ]
        )

    def names_while_a_batch_is_in_flight():
        writer.start()
        assert stored.wait(10)
        return real_names()

    writer = threading.Thread(target=in_flight)
    monkeypatch.setattr(archive.blobs, "get", get_after_others_wrote)
    monkeypatch.setattr(archive.blobs, "names", names_while_a_batch_is_in_flight)
    report = archive.verify()
    writer.join(10)
    assert report.ok, report.problems
    assert report.leaves == 6  # the snapshot's log: what came later is for the next run
    assert archive.blobs.get("msg-Q1") is None and archive.blobs.get("msg-Q6") is not None
    monkeypatch.undo()
    assert archive.verify().ok  # and the next run sees it all
    archive.blobs.put("msg-Q7", archive.blobs.get("msg-Q6"))  # stored behind the log's back
    assert [(p.record_id, p.what) for p in archive.verify().problems] == [
        ("msg-Q7", "a stored blob the log does not know")
    ]


def test_content_a_stopped_writer_left_without_its_record_is_unfinished_and_swept(
    archive, monkeypatch
):
    """Files and buckets take content before its record commits: a node that dies in
    between leaves content the log never knew.  It was registered first, so verify
    knows it for an unfinished write, and the sweep removes it (unless locked)."""
    copy = b"-----BEGIN PKCS7-----\r\nencrypted for a@dest.test\r\n"
    name = copy_name(copy)

    def killed(*args):
        raise RuntimeError("kill -9")  # after the content was stored, before the commit

    monkeypatch.setattr(archive, "_append", killed)
    with pytest.raises(RuntimeError):
        archive.journal_copy("Q1", copy)
    monkeypatch.undo()
    outside = not isinstance(archive.blobs, SqlBlobStore)
    # in the index's database, content commits with its record: nothing is left
    assert (archive.blobs.get(name) is not None) == outside
    report = archive.verify()
    assert report.ok, report.problems
    assert report.unfinished == (1 if outside else 0)

    assert archive.sweep_unfinished(3600) == (0, 0)  # a write of a moment ago: in flight
    monkeypatch.setattr(
        archive.blobs,
        "delete",
        lambda n: (_ for _ in ()).throw(StorageError("s3://archive: AccessDenied: object locked")),
    )
    assert archive.sweep_unfinished(0) == (0, 1 if outside else 0)  # under Object Lock
    monkeypatch.undo()
    assert archive.verify().unfinished == (1 if outside else 0)  # still known for what it is
    archive.journal_copy("Q1", b"another copy")  # a live write of this node is not touched
    assert archive.sweep_unfinished(3600, node=archive.node) == (1 if outside else 0, 0)
    assert archive.blobs.get(name) is None
    assert archive.blobs.get(copy_name(b"another copy")) is not None
    report = archive.verify()
    assert report.ok and report.unfinished == 0, report.problems


def test_a_batch_is_one_transaction_and_a_failing_job_is_undone_alone(archive):
    def bad():
        archive.journal_event("Q9", "attempt", {"n": 1})
        raise RuntimeError("disk full")

    results = archive.batch(
        [lambda: archive.journal_event("Q1", "attempt", {"n": 2}), bad, archive.checkpoint]
    )
    assert results[0][1] is None and isinstance(results[1][1], RuntimeError)
    assert results[2][0].split("\n")[1] == "7"  # the checkpoint saw the good job only
    assert archive.verify().ok


def _copies(archive, record_id: str) -> tuple[int, int]:
    """(rows in ``copies``, leaves in the log) for one copy."""
    db = archive.index.db
    rows = db.execute("SELECT count(*) FROM copies WHERE record_id=?", (record_id,)).fetchone()
    leaves = db.execute("SELECT count(*) FROM leaves WHERE record_id=?", (record_id,)).fetchone()
    return int(rows[0]), int(leaves[0])


def test_each_copy_of_a_batch_is_kept_once_however_often_it_comes(archive):
    """A copy the archive has, or one that comes twice in a batch, is kept once - in
    the batch's first run and in its run again one job at a time after a failure."""
    old, new, third = b"a copy kept before", b"a new copy", b"a third copy"
    archive.journal_copy("Q1", old)

    def copy(data: bytes) -> _Copy:
        return _Copy(archive, "Q1", data, copy_name(data))

    results = archive.batch([copy(old), copy(new), copy(new)])
    assert results == [(copy_name(old), None), (copy_name(new), None), (copy_name(new), None)]

    def bad():
        raise RuntimeError("disk full")

    results = archive.batch([copy(third), bad, copy(third), copy(new)])
    assert [type(e) for _, e in results] == [type(None), RuntimeError, type(None), type(None)]
    for data in (old, new, third):
        assert _copies(archive, copy_name(data)) == (1, 1)
        assert archive.record(copy_name(data)) == data
    assert archive.verify().ok


def test_a_batch_asks_once_which_of_its_copies_the_archive_has(archive):
    """Not once a copy: each question would first send the writes the batch has kept
    (`Database.write`) and split its multi-row statements."""
    connection = archive.index.db._connection
    if not hasattr(connection, "set_trace_callback"):
        connection = None  # PostgreSQL: the statements are counted on SQLite
    asked: list[str] = []
    if connection is not None:
        connection.set_trace_callback(asked.append)
    copies = [b"copy %d" % n for n in range(4)]
    results = archive.batch([_Copy(archive, "Q1", c, copy_name(c)) for c in copies])
    if connection is not None:
        connection.set_trace_callback(None)
        assert len([sql for sql in asked if "FROM copies WHERE" in sql]) == 1
        assert len([sql for sql in asked if sql.startswith("INSERT INTO copies")]) == 1
    assert [e for _, e in results] == [None] * 4
    assert all(_copies(archive, copy_name(c)) == (1, 1) for c in copies)


def test_a_message_whose_blob_was_lost_is_not_counted_as_journaled_and_can_be_again(archive):
    assert archive.has_content("Q1")
    archive.blobs.delete("msg-Q1")  # written without fsync, lost in a power cut
    assert archive.has("Q1") and not archive.has_content("Q1")
    archive.journal_message({**ENVELOPE, "queue_id": "Q1"}, DATA.replace(b"Biopsy", b"Biopsy 1"))
    assert archive.has_content("Q1")
    archive.make_durable(["Q1"])
    assert archive.verify().ok


@pytest.mark.parametrize("record_id", ["msg-18T4R6JMP737ZFP6", "evt-0", 'odd-"id"\\ü'])
def test_the_written_out_commitment_is_the_canonical_json(record_id):
    from gateway.archive.journal import canonical, commitment

    digest = "ab" * 32
    expected = canonical({"kind": "message", "id": record_id, "sha256": digest})
    assert commitment("message", record_id, digest) == expected


def test_search_by_sender_recipient_bcc_subject_and_decision(archive):
    archive.journal_attempt(
        "Q2",
        [
            {
                "idx": 1,
                "address": "bcc@dest.test",
                "state": "delivered",
                "status": "2.0.0",
                "evidence": {"decision": {"mode": "smime", "rule": "phi-smime"}},
            }
        ],
    )

    def found(**fields):
        return [m["queue_id"] for m in archive.search(Query(**fields))]

    assert found(sender="DR@clinic.test") == ["Q3", "Q2", "Q1"]  # newest first
    assert found(sender="@clinic.test", recipient="bcc@dest.test") == ["Q3", "Q2", "Q1"]
    assert found(recipient="bcc@dest.test", mode="smime") == ["Q2"]
    assert found(recipient="a@dest.test", mode="smime") == []  # the same recipient
    assert found(rule="phi-smime", status="delivered") == ["Q2"]
    assert found(subject="biopsy 3") == ["Q3"]  # words, case folded
    assert found(subject="3 biopsy") == []  # a phrase, in order
    assert found(queue_id="Q1", sender="someone@else.test") == []
    (q2,) = archive.search(Query(queue_id="Q2"))
    assert [(r["address"], r["mode"], r["attempts"]) for r in q2["recipients"]] == [
        ("a@dest.test", None, 0),
        ("bcc@dest.test", "smime", 1),
    ]
    assert archive.hold("case-7", "counsel@clinic.test", query=Query(subject="Biopsy 1")) == 1


def test_the_access_record_is_counted_by_action(archive):
    archive.access("auditor@clinic.test", "search", hits=3)
    archive.access("auditor@clinic.test", "view", "Q1")
    archive.access("counsel@clinic.test", "view", "Q2")
    assert archive.access_counts() == {"search": 1, "view": 2}
    assert [r["actor"] for r in archive.access_log()][0] == "counsel@clinic.test"


def test_nodes_appending_at_once_make_one_gapless_log_that_any_node_verifies(
    archive, connect_index
):
    import threading

    files = archive.blobs if connect_index.files else None  # else each node's own connection
    nodes = [archive, node(connect_index(), files), node(connect_index(), files)]
    errors: list[BaseException] = []

    def append(n: int, a: Archive) -> None:
        try:
            for i in range(25):
                q = f"N{n}-{i}"
                if i % 2:  # a group commit takes its log positions a block at a time
                    a.batch(
                        [
                            lambda q=q: a.journal_message(
                                {**ENVELOPE, "queue_id": q}, DATA, subject=True
                            ),
                            lambda q=q: a.journal_event(q, "attempt", {"node": n}),
                        ]
                    )
                    continue
                a.journal_message({**ENVELOPE, "queue_id": q}, DATA, subject=True)
                a.journal_event(q, "attempt", {"node": n})
                if i % 10 == 8:
                    a.checkpoint()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(n, a)) for n, a in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    positions = [i for (i,) in archive.index.db.execute("SELECT idx FROM leaves ORDER BY idx")]
    assert positions == list(range(1, 6 + 3 * 50 + 1))
    events = {r for (r,) in archive.index.db.execute("SELECT record_id FROM events")}
    assert len(events) == 3 + 3 * 25  # no two nodes named an event alike
    other = node(connect_index(), files)
    other.checkpoint()
    report = other.verify()
    assert report.ok, report.problems  # every node's checkpoints included
    assert report.leaves == 156 and report.checkpoints >= 2
    assert [m["queue_id"] for m in other.search(Query(queue_id="N2-24"))] == ["N2-24"]


@pytest.mark.parametrize("block", [0, 1, 2, 3])
def test_inclusion_proofs_by_blocks_are_the_whole_trees(archive, monkeypatch, block):
    """Proofs taken block by block (a kept root per complete block) are exactly the
    RFC 6962 paths over all the leaves, for trees that end inside a block, on a block
    boundary, and that grow between two proofs."""
    from gateway.archive import journal, merkle

    monkeypatch.setattr(journal, "PROOF_BLOCK", block)
    for n in range(13):
        archive.journal_event("", "note", {"n": n})
    for size in (1, 2, 3, 4, 5, 8, 9, 13):
        leaves = archive._leaf_range(0, size)
        ids = [r for (r,) in archive.index.db.execute(
            "SELECT record_id FROM leaves WHERE idx <= ? ORDER BY idx", (size,))]  # fmt: skip
        proofs = archive.proofs(ids, size)
        assert len(proofs) == size
        for i, record_id in enumerate(ids):
            path = [bytes.fromhex(h) for h in proofs[record_id]["path"]]
            assert path == merkle.inclusion_proof(i, leaves), (size, i)
            assert merkle.verify_inclusion(leaves[i], i, size, path, merkle.root(leaves))


def test_an_attempt_in_the_batch_that_journals_its_message_updates_its_recipient(
    connect_index,
):
    """Under load one batch holds an attempt of a message journaled before, then a
    new message and its own attempt: every recipient shows how it went (on
    PostgreSQL the batch's updates of recipients once went before the new rows)."""
    a = node(connect_index())
    a.journal_message({**ENVELOPE, "queue_id": "W"}, DATA)

    def delivered() -> list[dict[str, object]]:
        evidence = {"decision": {"mode": "tls", "rule": "tls-everywhere"}}
        return [{"idx": 0, "address": "a@dest.test", "state": "delivered", "evidence": evidence}]

    results = a.batch(
        [
            lambda: a.journal_attempt("W", delivered()),
            lambda: a.journal_message({**ENVELOPE, "queue_id": "X"}, DATA),
            lambda: a.journal_attempt("X", delivered()),
        ]
    )
    assert [error for _, error in results] == [None, None, None]
    rows = a.index.db.execute(
        "SELECT queue_id, idx, state, mode, rule FROM recipients ORDER BY queue_id, idx"
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        ("W", 0, "delivered", "tls", "tls-everywhere"),
        ("W", 1, "queued", None, None),
        ("X", 0, "delivered", "tls", "tls-everywhere"),
        ("X", 1, "queued", None, None),
    ]
    assert [m["queue_id"] for m in a.search(Query(mode="tls"))] == ["W", "X"]


def _journal_of(archive: Archive, spool: Spool, queue_id: str) -> _Journal:
    """The job that journals ``DATA`` to ``a@dest.test``, as spooled."""
    spooled = dataclasses.replace(
        envelope(queue_id, "a@dest.test"), size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()
    )
    return _Journal(archive, spool, spooled, DATA, subjects=False)


def _traced_batch(archive: Archive, jobs: list[Any]) -> tuple[list[Any], list[str] | None]:
    """``archive.batch(jobs)``'s outcomes, and the statements it sent - on SQLite
    (its trace); None on PostgreSQL, where they are counted on SQLite."""
    connection = archive.index.db._connection
    if not hasattr(connection, "set_trace_callback"):
        return archive.batch(jobs), None
    sent: list[str] = []
    connection.set_trace_callback(sent.append)
    try:
        return archive.batch(jobs), sent
    finally:
        connection.set_trace_callback(None)


def test_a_batch_journals_its_messages_first_and_writes_each_tables_rows_together(
    connect_index, tmp_path
):
    """Journals and attempts come turn about under load; the journals run first, so
    the recipients' rows go in as one statement and the attempts' updates as one
    (not a row at a time, each INSERT and the next UPDATE of the table in turn) -
    and an attempt issued before its message's journal (a journal written again
    after a failure) finds its rows.  The outcomes are in the jobs' order."""
    a = node(connect_index())
    spool = Spool(tmp_path / "spool")
    evidence = {"decision": {"mode": "tls", "rule": "tls-everywhere"}}

    def attempt(queue_id: str):
        delivered = {"idx": 0, "address": "a@dest.test", "state": "delivered"}
        return lambda: a.journal_attempt(queue_id, [{**delivered, "evidence": evidence}])

    jobs = [attempt("Q0"), _journal_of(a, spool, "Q0")]
    for n in range(1, 4):
        jobs += [_journal_of(a, spool, f"Q{n}"), attempt(f"Q{n}")]
    results, sent = _traced_batch(a, jobs)
    if sent is not None:
        to_recipients = [sql.split(" ", 1)[0] for sql in sent if " recipients" in sql]
        assert to_recipients == ["INSERT"] + ["UPDATE"] * 4  # (executemany: a line a row)
    assert [error for _, error in results] == [None] * 8
    for job, (value, _) in zip(jobs, results, strict=True):
        assert value == len(DATA) if isinstance(job, _Journal) else value.startswith("evt-")
    rows = a.index.db.execute("SELECT queue_id, state, mode FROM recipients ORDER BY queue_id")
    assert [tuple(r) for r in rows] == [(f"Q{n}", "delivered", "tls") for n in range(4)]
    assert a.verify().ok


def test_a_batch_takes_a_log_position_for_each_job_before_any_write(connect_index, tmp_path):
    """More records in a batch than `BLOCK`: the positions are still taken in one
    statement, at the start - one taken midway sends the writes kept so far and
    splits each table's multi-row statement in two.  None are left over (nothing
    given back), and the log has no gap."""
    a = node(connect_index())
    spool = Spool(tmp_path / "spool")
    jobs: list[Any] = []
    for n in range(BLOCK):
        delivered = {"idx": 0, "address": "a@dest.test", "state": "delivered", "evidence": {}}
        jobs += [
            _journal_of(a, spool, f"Q{n}"),
            functools.partial(a.journal_attempt, f"Q{n}", [delivered]),
        ]
    results, sent = _traced_batch(a, jobs)
    if sent is not None:
        assert [sql for sql in sent if "log_head" in sql] == [
            f"UPDATE log_head SET size = size + {2 * BLOCK} RETURNING size"
        ]
        assert len([sql for sql in sent if sql.startswith("INSERT INTO leaves")]) == 1
        assert len([sql for sql in sent if sql.startswith("INSERT INTO messages")]) == 1
    assert [error for _, error in results] == [None] * len(jobs)
    assert a.size() == 2 * BLOCK
    assert a.verify().ok


def test_a_messages_row_holds_the_digest_of_the_bytes_it_archived(archive, tmp_path):
    # from the spool, which checks the bytes against the envelope's digest: that digest
    # is taken as it is; a shared store's copy (another node's message) is hashed
    spool = Spool(tmp_path / "spool")
    data = b"Subject: x\r\n\r\nThe margins are clear.\r\n"
    digest = hashlib.sha256(data).hexdigest()
    ours = dataclasses.replace(envelope("Q7", "a@dest.test"), size=len(data), sha256=digest)
    theirs = dataclasses.replace(ours, queue_id="Q8", sha256="ab" * 32)  # not its bytes' digest
    _Journal(archive, spool, ours, data, subjects=False)()
    _Journal(archive, spool, theirs, data, subjects=False, checked=False)()
    rows = dict(archive.index.db.execute("SELECT queue_id, sha256 FROM messages").fetchall())
    assert rows["Q7"] == rows["Q8"] == digest
    assert archive.verify().ok


def test_a_nul_in_the_message_id_or_subject_is_not_written_to_the_index(archive):
    # PostgreSQL's text cannot hold NUL: the journal failed there at every retry
    data = b"Message-ID: <a\x00b@clinic.test>\r\nSubject: Biopsy\x00 9\r\n\r\nbody\r\n"
    archive.journal_message({**ENVELOPE, "queue_id": "Q9"}, data, subject=True)
    (found,) = archive.search(Query(queue_id="Q9"))
    assert found["message_id"] is None
    assert [m["queue_id"] for m in archive.search(Query(subject="9"))] == ["Q9"]
    assert archive.message("Q9")[1] == data  # the message itself as it came
    assert archive.verify().ok


def test_a_new_archive_index_has_small_pages_and_one_made_before_keeps_its_own(tmp_path):
    """Each commit writes the last page of each of the index's B-trees to the
    write-ahead log whole: a new index takes `ARCHIVE_PAGE_SIZE` pages (the daemon's,
    through the node's stores, and the command line's); an index made with SQLite's
    4 KB pages before stays as it was, and goes on working."""
    config = load_config_text(f"state_dir: {tmp_path / 'state'}\n")
    opened = Storage(config).open("archive")
    try:
        assert opened.execute("PRAGMA page_size").fetchone()[0] == ARCHIVE_PAGE_SIZE == 2048
    finally:
        opened.close()
    direct = ArchiveIndex(tmp_path / "direct.db")
    assert direct.db.execute("PRAGMA page_size").fetchone()[0] == ARCHIVE_PAGE_SIZE
    direct.close()

    before = tmp_path / "before.db"
    made = sqlite3.connect(before)
    made.execute("PRAGMA page_size=4096")
    made.execute("PRAGMA journal_mode=WAL")
    made.execute("CREATE TABLE made_before (x INTEGER)")
    made.close()
    a = node(ArchiveIndex(before))
    assert a.index.db.execute("PRAGMA page_size").fetchone()[0] == 4096
    a.journal_message(envelope("Q1", "a@dest.test").to_dict(), DATA)
    assert a.message("Q1")[1] == DATA
    assert a.verify().ok


def test_a_spooled_message_is_journaled_with_the_spools_json_of_its_envelope(
    connect_index, tmp_path
):
    """The record of a message read from the spool holds the spool's bytes of its
    envelope (written canonical: `Envelope.spooled_json`), which are what writing
    the envelope again gives; one with a portal passphrase's hash is written again,
    without it."""
    a = node(connect_index())
    spool = Spool(tmp_path / "spool")
    spool.open()

    async def spooled(queue_id: str, passphrase: str) -> Envelope:
        writer = spool.writer(queue_id)
        await writer.write(DATA)
        return await writer.commit(
            lambda size, sha: dataclasses.replace(
                envelope(queue_id, "a@dest.test", "b@dest.test"),
                size=size,
                sha256=sha,
                portal_passphrase=passphrase,
            )
        )

    for passphrase in ("", "$argon2id$v=19$m=65536,t=3,p=4$xyz"):
        queue_id = new_queue_id()
        asyncio.run(spooled(queue_id, passphrase))
        read, data = spool.read(queue_id)
        assert read.spooled_json is not None
        outcomes = a.batch([_Journal(a, spool, read, None, subjects=False), lambda: None])
        assert [error for _, error in outcomes] == [None, None]
        head, _, body = a.record(f"msg-{queue_id}").partition(b"\n")
        expected = read.to_dict()
        expected.pop("portal_passphrase", None)
        assert head == canonical(expected) and body == DATA
        assert (head == read.spooled_json) is (not passphrase)
        assert b"argon2id" not in head
    assert a.verify().ok
    spool.close()
