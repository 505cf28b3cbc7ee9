"""The queue state's contract, on SQLite and on a real PostgreSQL server: messages and
their recipients; due recipients claimed once (another connection - another process
or node - does not take them again) and released; results recorded with their
evidence, the message done when every recipient is delivered; depth by state;
administrative actions audited; unfinished messages found; old ones pruned; a batch
whose one operation fails keeps the others."""

from __future__ import annotations

from gateway.model import RecipientState
from gateway.queue.store import AttemptRecord, QueueStore
from tests.support.envelopes import envelope

NOW = 1_800_000_000.0


def result(idx: int, state: RecipientState, at: float = NOW) -> AttemptRecord:
    return AttemptRecord(
        idx, state, "2.0.0" if state.final else "4.4.1", "why", None, at + 60, state.value
    )


def test_messages_and_their_recipients(connect):
    store = QueueStore(connect())
    assert store.add(envelope("Q1", "a@x.test", "B@Y.test"), now=NOW)
    assert not store.add(envelope("Q1", "a@x.test"), now=NOW)  # known already (recovery)
    assert store.known() == {"Q1": False}
    assert store.message("Q1")["arrived"] == NOW and store.message("nope") is None
    rows = store.recipients("Q1")
    assert [(r.idx, r.address, r.domain, r.state) for r in rows] == [
        (0, "a@x.test", "x.test", RecipientState.PENDING),
        (1, "B@Y.test", "y.test", RecipientState.PENDING),
    ]
    assert store.oldest_open() == NOW


def test_due_recipients_are_claimed_once_and_released(connect):
    one, two = QueueStore(connect()), QueueStore(connect())
    one.add(envelope("Q1", "a@x.test", "b@x.test"), now=NOW)
    one.add(envelope("Q2", "c@x.test"), now=NOW + 5)
    assert [r.address for r in one.claim(NOW, 10)] == ["a@x.test", "b@x.test"]
    assert two.claim(NOW + 10, 10)[0].address == "c@x.test"  # the leased ones are taken
    assert two.claim(NOW + 10, 10) == []
    assert one.depth()["active"] == 3
    one.release_leases()
    assert len(two.due(NOW + 10)) == 3


def test_results_with_evidence_and_a_message_done_when_all_are_delivered(connect):
    store = QueueStore(connect())
    store.add(envelope("Q1", "a@x.test", "b@x.test"), now=NOW, lease=True)
    assert store.record("Q1", [result(0, RecipientState.DEFERRED)], now=NOW) is None
    assert store.depth()["deferred"] == 1
    rows = store.record(
        "Q1",
        [result(0, RecipientState.DELIVERED), result(1, RecipientState.DELIVERED)],
        now=NOW + 1,
    )
    assert rows is not None and {r.state for r in rows} == {RecipientState.DELIVERED}
    assert store.message("Q1")["done"] == 1 and store.oldest_open() is None
    attempts = store.attempts("Q1")
    assert [(a["recipient_index"], a["outcome"]) for a in attempts] == [
        (0, "deferred"),
        (0, "delivered"),
        (1, "delivered"),
    ]
    assert attempts[1]["at"] == NOW + 1 and attempts[0]["evidence"] == {}
    history = store.attempt_history("Q1")
    assert [(h["idx"], h["attempt"], h["state"]) for h in history] == [
        (0, 1, "deferred"),
        (0, 2, "delivered"),
        (1, 1, "delivered"),
    ]


def test_a_bounce_leaves_the_message_to_be_finished_and_it_is_found_unfinished(connect):
    store = QueueStore(connect())
    store.add(envelope("Q1", "a@x.test"), now=NOW, lease=True)
    rows = store.record("Q1", [result(0, RecipientState.BOUNCED)], now=NOW)
    assert rows is not None and store.message("Q1")["done"] == 0
    assert store.unfinished() == ["Q1"]
    store.finish("Q1", dsn_sent=True, now=NOW + 2)
    assert store.message("Q1")["dsn_sent"] == 1 and store.unfinished() == []
    assert store.prune(NOW + 1) == 0  # finished after that
    assert store.prune(NOW + 3) == 1
    assert store.known() == {} and store.attempts("Q1") == []


def test_administrative_actions_are_audited(connect):
    store = QueueStore(connect())
    store.add(envelope("Q1", "a@x.test"), now=NOW)
    assert store.admin("Q1", "hold", "alice")
    assert store.depth()["hold"] == 1 and store.due(NOW + 10) == []
    assert store.admin("Q1", "release", "alice") and store.admin("Q1", "retry", "bob")
    assert store.admin("Q1", "delete", "carol")
    assert store.recipients("Q1")[0].state is RecipientState.DELETED
    assert not store.admin("nope", "hold", "alice")
    assert [(a["action"], a["actor"]) for a in store.audit("Q1")] == [
        ("hold", "alice"),
        ("release", "alice"),
        ("retry", "bob"),
        ("delete", "carol"),
    ]


def test_a_batch_whose_one_operation_fails_keeps_the_others(connect):
    store = QueueStore(connect())

    def failing() -> None:
        store.add(envelope("BAD", "a@x.test"), now=NOW)
        store._db.execute("INSERT INTO no_such_table VALUES (1)")

    outcomes = store.batch(
        [lambda: store.add(envelope("Q1", "a@x.test"), now=NOW), failing, lambda: 7]
    )
    assert outcomes[0] == (True, None) and outcomes[2] == (7, None)
    assert outcomes[1][1] is not None
    assert QueueStore(connect()).known() == {"Q1": False}  # BAD was undone alone


def test_claims_made_at_the_same_time_from_several_connections_never_take_a_recipient_twice(
    connect,
):
    import threading

    setup = QueueStore(connect())
    for i in range(40):
        setup.add(envelope(f"Q{i:02d}", "a@x.test", "b@x.test"), now=NOW)
    stores = [QueueStore(connect()) for _ in range(4)]
    taken: list[tuple[str, int]] = []
    gate = threading.Barrier(len(stores))
    lock = threading.Lock()

    def claim(store: QueueStore) -> None:
        gate.wait()
        for _ in range(10):
            rows = store.claim(NOW + 1, 7)
            with lock:
                taken.extend((r.queue_id, r.idx) for r in rows)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(taken) == 80 and len(set(taken)) == 80  # every recipient once
