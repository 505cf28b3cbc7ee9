"""The queue state's contract, on SQLite and on a real PostgreSQL server: messages and
their recipients; due recipients claimed once (another connection - another process
or node - does not take them again), no more messages a domain than it has room for,
and released; results recorded with their
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


def test_a_claim_takes_no_more_messages_for_a_domain_than_its_room(connect):
    one, two = QueueStore(connect()), QueueStore(connect())
    one.add(envelope("Q1", "a@x.test", "b@x.test", "c@y.test"), now=NOW)
    one.add(envelope("Q2", "d@x.test"), now=NOW + 1)
    one.add(envelope("Q3", "e@y.test"), now=NOW + 2)
    room = {"x.test": 1, "y.test": 2}.__getitem__
    taken = one.claim(NOW + 10, 10, room=room)
    # Q1's two recipients at x.test are one attempt; Q2's would be a second
    assert [r.address for r in taken] == ["a@x.test", "b@x.test", "c@y.test", "e@y.test"]
    assert [r.address for r in two.claim(NOW + 10, 10)] == ["d@x.test"]  # left unleased


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


def test_nodes_hold_their_own_leases_and_a_silent_nodes_are_taken_over(connect):
    a, b = QueueStore(connect(), node="a"), QueueStore(connect(), node="b")
    a.joined(now=NOW)
    b.joined(now=NOW)
    a.add(envelope("Q1", "r@x.test", "s@x.test"), now=NOW, lease=True, data=b"one")
    a.add(envelope("Q2", "t@x.test"), now=NOW)  # its content only on a's disk
    assert b.claim(NOW + 1, 10) == []  # Q1 is a's lease, Q2 b cannot read
    assert [(n["node"], n["leases"]) for n in a.nodes()] == [("a", 2), ("b", 0)]
    b.release_leases()  # b restarting lets go of its own leases only
    assert b.claim(NOW + 1, 10) == []
    a.heartbeat({"version": "x"}, now=NOW + 30)
    b.heartbeat({"version": "x"}, now=NOW + 80)
    assert b.take_over(60, now=NOW + 85) == {}  # a was heard from 55 s ago
    assert b.take_over(60, now=NOW + 95) == {"a": 2}  # 65 s: a is taken for dead
    taken = b.claim(NOW + 95, 10)
    assert [(r.queue_id, r.address) for r in taken] == [("Q1", "r@x.test"), ("Q1", "s@x.test")]
    envelope_, data = b.content("Q1")
    assert envelope_.queue_id == "Q1" and data == b"one"
    assert b.content("Q2") is None and b.unshared() == 0 and a.unshared() == 1
    assert a.share(envelope("Q2", "t@x.test"), b"two") and not a.share(envelope("Q2"), b"")
    assert [r.queue_id for r in b.claim(NOW + 95, 10)] == ["Q2"]  # now b can read it
    assert b.nodes()[0]["version"] == "x"


def test_a_message_recorded_without_its_content_is_shared_once_and_only_while_open(connect):
    """cluster.ack: local records a message first and shares its content later:
    the node finds its own unshared ones (after a restart too); a finished one is
    not shared any more."""
    store = QueueStore(connect(), node="a")
    store.add(envelope("Q1", "r@x.test"), now=NOW)
    store.add(envelope("Q2", "t@x.test"), now=NOW)
    assert sorted(QueueStore(connect(), node="a").unshared_here()) == ["Q1", "Q2"]
    assert QueueStore(connect(), node="b").unshared_here() == []
    store.finish("Q2", dsn_sent=False, now=NOW + 1)
    shared = store.share_many([(envelope("Q1", "r@x.test"), b"one"), (envelope("Q2"), b"two")])
    assert shared == 1 and store.unshared_here() == []
    assert store.content("Q1")[1] == b"one" and store.content("Q2") is None
    assert store.share_many([(envelope("Q1", "r@x.test"), b"one")]) == 0  # there already


def test_done_messages_are_found_among_ids_and_their_shared_copy_dropped(connect):
    store = QueueStore(connect(), node="a")
    store.add(envelope("Q1", "r@x.test"), now=NOW, lease=True, data=b"one")
    store.add(envelope("Q2", "r@x.test"), now=NOW, data=b"two")
    store.record("Q1", [result(0, RecipientState.DELIVERED)], now=NOW)
    assert store.done_among(["Q1", "Q2", "Q9"]) == ["Q1"]
    store.drop_content("Q1")
    assert store.content("Q1") is None and store.content("Q2") is not None
    assert store.unfinished(settled=NOW - 10) == []


def test_what_a_silent_node_finished_but_had_not_archived_is_adopted_once(connect):
    """Its shared copy outlives it (dropped only once archived): another node takes
    the message over - one node, once - to archive it."""
    c, a, b = (QueueStore(connect(), node=n) for n in "cab")
    for store in (c, a, b):
        store.joined(now=NOW)
    c.add(envelope("Q1", "r@x.test"), now=NOW, lease=True, data=b"one")
    c.add(envelope("Q2", "r@x.test"), now=NOW, lease=True, data=b"two")
    c.add(envelope("Q3", "r@x.test"), now=NOW, lease=True, data=b"three")
    c.record("Q1", [result(0, RecipientState.DELIVERED)], now=NOW + 1)  # done, unarchived
    c.record("Q2", [result(0, RecipientState.DELIVERED)], now=NOW + 1)
    c.drop_content("Q2")  # done and archived
    # Q3 still open: a lease, taken over as usual
    c.heartbeat({}, now=NOW + 2)
    a.heartbeat({}, now=NOW + 50)
    assert a.adopt_unarchived(60, now=NOW + 50) == []  # c heard from 48 s ago
    adopted = a.adopt_unarchived(60, now=NOW + 70)
    assert [(e.queue_id, data, node) for e, data, node in adopted] == [("Q1", b"one", "c")]
    assert b.adopt_unarchived(60, now=NOW + 70) == []  # a has it: not twice
    assert a.adopt_unarchived(60, now=NOW + 200) == []  # its own now


def test_a_delayed_message_is_found_until_its_warning_is_taken_once(connect):
    one, two = QueueStore(connect()), QueueStore(connect())  # two nodes, one store
    one.add(envelope("Q1", "a@x.test", "b@x.test"), now=NOW)
    one.add(envelope("Q2", "c@x.test"), now=NOW + 100)
    one.add(envelope("Q3", "d@x.test"), now=NOW)
    one.record("Q3", [result(0, RecipientState.DELIVERED)], now=NOW + 1)  # nothing waits
    one.record("Q1", [result(0, RecipientState.DELIVERED)], now=NOW + 1)  # b still waits
    assert one.delayed(NOW + 50) == ["Q1"]  # Q2 is younger, Q3 done
    assert sorted(two.delayed(NOW + 200)) == ["Q1", "Q2"]
    assert [one.warn("Q1"), two.warn("Q1")] == [True, False]  # one of them sends it
    assert two.delayed(NOW + 200) == ["Q2"]


def test_a_suspended_destination_defers_what_waits_for_it_except_what_must_expire(connect):
    store = QueueStore(connect())
    store.add(envelope("Q1", "a@dead.test", "b@live.test"), now=NOW)
    store.add(envelope("Q2", "c@dead.test"), now=NOW + 5)
    store.add(envelope("Q0", "old@dead.test"), now=NOW - 1000)  # past its lifetime
    store.add(envelope("Q3", "d@dead.test"), now=NOW + 6, lease=True)  # being attempted
    until = NOW + 300
    assert store.suspend("dead.test", until, "4.4.1", "suspended: why", NOW - 500) == 2
    rows = {(r.queue_id, r.address): r for q in ("Q0", "Q1", "Q2") for r in store.recipients(q)}
    waiting = rows[("Q1", "a@dead.test")]
    assert (waiting.state, waiting.status, waiting.diagnostic, waiting.next_attempt) == (
        RecipientState.DEFERRED,
        "4.4.1",
        "suspended: why",
        until,
    )
    assert waiting.attempts == 0 and rows[("Q2", "c@dead.test")].next_attempt == until
    assert rows[("Q1", "b@live.test")].state is RecipientState.PENDING  # another domain
    assert rows[("Q0", "old@dead.test")].state is RecipientState.PENDING  # tried: it expires
    assert [r.address for r in store.due(NOW + 10)] == ["old@dead.test", "b@live.test"]
    # one already leased for an attempt is let go, deferred the same way
    assert store.postpone("Q3", [0], until, "4.4.1", "suspended: why", NOW - 500)
    (row,) = store.recipients("Q3")
    assert (row.state, row.next_attempt) == (RecipientState.DEFERRED, until)
    assert [r.address for r in store.due(until)][-1] == "d@dead.test"  # free again
    assert not store.postpone("Q0", [0], until, "4.4.1", "x", NOW - 500)  # must expire
    assert store.recipients("Q0")[0].state is RecipientState.PENDING
