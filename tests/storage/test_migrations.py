"""Schema versions: a store written by the previous release is brought up to date
when it opens (its rows kept), nodes starting at once against PostgreSQL migrate
once, and a version newer than this Sealgate knows is refused."""

from __future__ import annotations

import threading

import pytest

from gateway.queue.store import VERSIONED, QueueStore
from gateway.storage.migrations import SchemaTooNew, Versioned, migrate, stored_version
from tests.support.envelopes import envelope


def test_a_queue_from_the_previous_release_is_brought_up_to_date_with_its_rows(connect):
    db = connect()
    previous = Versioned("queue", VERSIONED.steps[:1])  # the release before clusters
    assert migrate(db, previous) == (0, 1)
    db.execute(
        "INSERT INTO messages(queue_id, received_at, mail_from, size, arrived) "
        "VALUES ('Q1', '2026-11-30T10:00:00+00:00', 'a@x.test', 10, 1.0)"
    )
    db.execute(
        "INSERT INTO recipients(queue_id, idx, address, domain, next_attempt, updated) "
        "VALUES ('Q1', 0, 'r@y.test', 'y.test', 1.0, 1.0)"
    )
    store = QueueStore(db)
    assert stored_version(db, "queue") == VERSIONED.version == 7
    assert [r.address for r in store.claim(2.0, 10)] == ["r@y.test"]
    node = QueueStore(connect(), node="node-a")
    node.add(envelope("Q2", "s@y.test"), now=3.0, data=b"bytes")
    assert node.content("Q2")[1] == b"bytes"


def test_a_queue_of_version_4_gains_the_tls_report_tables(connect):
    """Version 5: TLS-RPT's counts and reports, in the queue's database."""
    from gateway.tlsrpt.store import TlsRptStore

    db = connect()
    assert migrate(db, Versioned("queue", VERSIONED.steps[:4])) == (0, 4)
    assert not db.has_table("tlsrpt_sessions")
    store = TlsRptStore(connect())
    assert stored_version(db, "queue") == 7 and db.has_table("tlsrpt_reports")
    assert store.due("2026-12-01") == []


def test_shared_content_reads_back_the_same_and_postgresql_compresses_it_with_lz4(connect):
    """Version 3: the server compresses message content with lz4 (its pglz costs a
    50 KB message several times the CPU); what it stores reads back the same."""
    db = connect()
    store = QueueStore(db, node="node-a")
    text = b"Dear patient, your results are ready.\r\n" * 1500  # compressible, 57 KB
    store.add(envelope("Q3", "s@y.test"), now=1.0, data=text)
    assert store.content("Q3")[1] == text
    if db.dialect == "postgresql":
        method = db.execute("SELECT pg_column_compression(data) FROM contents").fetchone()[0]
        assert method == "lz4"


def test_nodes_starting_at_once_migrate_once(connect):
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            QueueStore(connect())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert stored_version(connect(), "queue") == VERSIONED.version


def test_a_schema_newer_than_this_sealgate_knows_is_refused(connect):
    db = connect()
    QueueStore(db)
    db.execute("UPDATE sealgate_schema SET version=? WHERE store='queue'", (VERSIONED.version + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this Sealgate knows"):
        QueueStore(connect())
