"""The webhook outbox's contract on SQLite and on a real PostgreSQL server: only a
message's oldest pending event per endpoint is due (its events go in order; the next
one is due when it is posted or dropped, also when a concurrent transaction wrote
it); an event claimed by one node is not claimed by another until its lease ends;
posted events are gone, failed ones come back at their time, dropped ones are kept
with their error and left out of the backlog; finding the due events reads only
those."""

from __future__ import annotations

from gateway.storage.database import Database
from gateway.webhooks.outbox import (
    _DUE,
    _TAKE,
    INSERT,
    INSERT_FIRST,
    Outbox,
    first_rows,
    insert_rows,
)
from tests.support.stores import opener


def row(endpoint, queue_id, kind):
    return (endpoint, f"evt-{endpoint}-{queue_id}-{kind}", queue_id, kind, "{}")


def test_only_the_oldest_pending_event_of_a_message_and_endpoint_is_due(connect):
    outbox = Outbox(connect())
    outbox.add([row("ehr", "Q1", "accepted"), row("crm", "Q1", "accepted")], 10.0)
    outbox.add([row("ehr", "Q1", "delivered"), row("ehr", "Q2", "accepted")], 11.0)
    due = outbox.due(20.0)
    assert [(e.endpoint, e.queue_id, e.type) for e in due] == [
        ("ehr", "Q1", "accepted"),
        ("crm", "Q1", "accepted"),
        ("ehr", "Q2", "accepted"),
    ]
    assert outbox.due(5.0) == []  # none due before it was written
    first = due[0]
    outbox.settle([first.id], [], [])
    assert [(e.endpoint, e.queue_id, e.type) for e in outbox.due(20.0)] == [
        ("crm", "Q1", "accepted"),
        ("ehr", "Q1", "delivered"),  # its turn now
        ("ehr", "Q2", "accepted"),
    ]


def test_a_message_s_first_event_is_due_and_the_next_waits_for_it(connect):
    """The event of a message just recorded goes in without looking for earlier ones
    (`INSERT_FIRST`); what follows it still waits its turn."""
    db = connect()
    outbox = Outbox(db)
    with db.transaction():
        db.executemany(INSERT_FIRST, first_rows([row("ehr", "Q1", "accepted")], 10.0))
    outbox.add([row("ehr", "Q1", "delivered")], 11.0)
    (first,) = outbox.due(20.0)
    assert (first.type, first.tries) == ("accepted", 0)
    outbox.settle([first.id], [], [])
    assert [e.type for e in outbox.due(20.0)] == ["delivered"]


def test_a_claimed_event_is_one_nodes_until_its_lease_ends(connect):
    one, two = Outbox(connect()), Outbox(connect())
    one.add([row("ehr", "Q1", "accepted")], 10.0)
    (event,) = one.due(20.0)
    assert [e.id for e in one.take("node-a", 20.0, 140.0)] == [event.id]
    assert two.take("node-b", 21.0, 141.0) == []
    assert two.due(21.0) == []  # leased
    assert [e.id for e in two.due(150.0)] == [event.id]  # node-a went silent
    assert [e.id for e in two.take("node-b", 150.0, 270.0)] == [event.id]


def test_failed_events_return_at_their_time_and_dropped_ones_are_kept_aside(connect):
    outbox = Outbox(connect())
    outbox.add([row("ehr", "Q1", "accepted"), row("ehr", "Q2", "accepted")], 10.0)
    outbox.add([row("ehr", "Q3", "accepted")], 10.0)
    first, second, third = outbox.take("node-a", 20.0, 140.0)
    outbox.settle(
        [],
        [(first.id, 60.0, "HTTP 503", True), (third.id, 60.0, "not tried: HTTP 503", False)],
        [(second.id, "HTTP 410")],
    )
    assert outbox.due(30.0) == []
    again, untried = Outbox(connect()).due(61.0)
    assert (again.id, again.tries) == (first.id, 1)
    assert (untried.id, untried.tries) == (third.id, 0)  # not tried: not counted
    assert outbox.backlog() == {"ehr": (2, 10.0)}
    (dropped,) = outbox.dropped()
    assert (dropped["queue_id"], dropped["last_error"], dropped["tries"]) == ("Q2", "HTTP 410", 1)
    outbox.prune(10.0 + 31 * 86400)
    assert outbox.dropped() == []


def test_take_is_due_and_claim_in_one(connect):
    one, two = Outbox(connect()), Outbox(connect())
    one.add([row("ehr", "Q1", "accepted"), row("ehr", "Q1", "delivered")], 10.0)
    one.add([row("ehr", "Q2", "accepted")], 11.0)
    taken = one.take("node-a", 20.0, 140.0)
    assert [(e.queue_id, e.type) for e in taken] == [("Q1", "accepted"), ("Q2", "accepted")]
    assert two.take("node-b", 21.0, 141.0) == []  # leased, and Q1's next waits its turn
    one.settle([taken[0].id], [], [])
    (following,) = two.take("node-b", 22.0, 142.0)
    assert (following.queue_id, following.type) == ("Q1", "delivered")
    two.settle([following.id], [], [])
    assert [e.queue_id for e in two.take("node-b", 150.0, 270.0)] == ["Q2"]  # node-a silent


def test_an_event_after_a_dropped_one_is_due_and_a_taken_one_is_not(connect):
    outbox = Outbox(connect())
    outbox.add([row("ehr", "Q1", "accepted"), row("ehr", "Q1", "delivered")], 10.0)
    (head,) = outbox.take("node-a", 20.0, 140.0)
    assert outbox.due(20.0) == []  # leased; the delivered event waits behind it
    assert outbox.backlog() == {"ehr": (2, 10.0)}
    outbox.settle([], [], [(head.id, "HTTP 410")])
    (after,) = outbox.due(20.0)
    assert after.type == "delivered"


def test_finding_the_due_events_reads_only_those_in_time_order(tmp_path):
    """SQLite's plan for the due events walks the index on state and time - no sort
    of every pending event, none of the events waiting behind an endpoint that is
    down (they are not pending) - and takes them by their ids."""
    db = Database.sqlite(tmp_path / "store.db")
    Outbox(db)
    plan = " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + _DUE, (1.0, 1.0, 10)))
    assert "USING INDEX webhook_outbox_due (state=? AND next_try<?)" in plan
    assert "TEMP B-TREE" not in plan
    # taking them: the rows found by their ids, not every due one read again
    plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + _TAKE, ("n", 2, 2, 1, 1, 10, 1, 1))]
    assert plan[0] == "SEARCH webhook_outbox USING INTEGER PRIMARY KEY (rowid=?)"
    db.close()


def test_a_waiting_event_left_by_a_concurrent_post_is_released(request, tmp_path):
    """PostgreSQL: an event written (as waiting) while the one before it is posted by
    another transaction that cannot see it is left without one before it;
    release_stranded makes it due."""
    opened: list[Database] = []
    connect = opener("postgresql", request, tmp_path, opened)
    writer, dispatcher = Outbox(connect()), Outbox(connect())
    writer.add([row("ehr", "Q1", "accepted")], 10.0)
    (head,) = dispatcher.take("node-a", 20.0, 140.0)
    with writer.db.transaction():
        writer.db.executemany(INSERT, insert_rows([row("ehr", "Q1", "delivered")], 21.0))
        dispatcher.settle([head.id], [], [])  # posted meanwhile, committed first
    assert dispatcher.due(30.0) == []  # stranded
    dispatcher.release_stranded()
    (after,) = dispatcher.due(30.0)
    assert after.type == "delivered"
    for db in opened:
        db.close()
