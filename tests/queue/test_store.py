"""The queue state store: leases, per-recipient records, audited admin actions."""

from __future__ import annotations

import gateway.queue.store as store_module
from gateway.model import RecipientState
from gateway.queue.store import AttemptRecord, QueueStore
from tests.support.envelopes import envelope as _envelope


def test_claimed_recipients_are_not_claimed_twice_until_their_result_or_a_restart(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    assert store.add(_envelope("Q1", "a@x.test", "b@y.test"), now=100)
    assert not store.add(_envelope("Q1", "a@x.test"), now=100)  # known already
    first = store.claim(now=200, limit=10)
    assert sorted(r.address for r in first) == ["a@x.test", "b@y.test"]
    assert store.claim(now=200, limit=10) == []  # leased
    store.record(
        "Q1",
        [AttemptRecord(0, RecipientState.DEFERRED, "4.4.1", "down", None, 300, "deferred")],
        now=200,
    )
    assert store.claim(now=250, limit=10) == []  # not due before 300
    assert [r.address for r in store.claim(now=300, limit=10)] == ["a@x.test"]
    store.close()
    reopened = QueueStore(tmp_path / "queue.db")  # a crash left b@ and a@ leased
    reopened.release_leases()
    assert sorted(r.address for r in reopened.claim(now=400, limit=10)) == ["a@x.test", "b@y.test"]


def test_held_messages_are_not_claimed_and_actions_are_audited(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    store.add(_envelope("Q2", "a@x.test"), now=100)
    assert store.admin("Q2", "hold", "alice")
    assert store.claim(now=200, limit=10) == []
    assert store.admin("Q2", "release", "alice")
    assert len(store.claim(now=200, limit=10)) == 1
    assert not store.admin("NOPE", "retry", "alice")
    assert [(a["action"], a["actor"]) for a in store.audit("Q2")] == [
        ("hold", "alice"),
        ("release", "alice"),
    ]


def _final(idx: int, state: str = "delivered") -> AttemptRecord:
    return AttemptRecord(idx, RecipientState(state), "2.0.0", "250 ok", None, 0, state)


def test_the_result_that_makes_the_last_recipient_final_returns_the_message_once(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    store.add(_envelope("Q3", "a@x.test", "b@y.test"), now=100)
    assert store.record("Q3", [_final(0)], now=110) is None  # b@ is still pending
    rows = store.record("Q3", [_final(1, "bounced")], now=120)
    assert rows is not None and [r.state for r in rows] == ["delivered", "bounced"]
    # a crash before finish(): the message is found again at start
    assert store.unfinished() == ["Q3"]
    store.finish("Q3", dsn_sent=True, now=130)
    assert store.unfinished() == []


def test_depth_counts_recipients_not_yet_final_by_state(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    store.add(_envelope("Q4", "a@x.test", "b@x.test", "c@x.test"), now=100)
    store.add(_envelope("Q5", "d@x.test"), now=100)
    store.admin("Q5", "hold", "alice")
    store.claim(now=100, limit=1)  # one of Q4's recipients is now under way
    assert store.depth() == {"pending": 2, "deferred": 0, "active": 1, "hold": 1, "held": 0}
    store.record(
        "Q4", [AttemptRecord(0, RecipientState.DEFERRED, "4.4.1", "down", None, 500, "deferred")]
    )
    store.record("Q4", [_final(1), _final(2)])
    assert store.depth() == {"pending": 0, "deferred": 1, "active": 0, "hold": 1, "held": 0}


def test_prune_forgets_only_messages_finished_before_the_cutoff(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    for queue_id in ("Q6", "Q7", "Q8"):
        store.add(_envelope(queue_id, "a@x.test"), now=100)
        store.admin(queue_id, "retry", "alice")
    store.record("Q6", [_final(0)], now=200)
    store.finish("Q6", dsn_sent=False, now=200)
    store.record("Q7", [_final(0)], now=900)
    store.finish("Q7", dsn_sent=False, now=900)
    assert store.prune(before=500) == 1
    assert store.message("Q6") is None and store.attempts("Q6") == []
    assert store.audit("Q6") == [] and store.recipients("Q6") == []
    assert store.message("Q7") is not None and len(store.attempts("Q7")) == 1
    assert store.message("Q8") is not None  # not finished: never pruned


def test_prune_keeps_what_it_is_told_to_and_finds_the_rest_past_them(tmp_path, monkeypatch):
    """Messages whose spool file is still here keep their history; the pages of
    candidates (here of 3) go past them, ties of finishing time included."""
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 3)
    store = QueueStore(tmp_path / "queue.db")
    ids = [f"Q{n:02}" for n in range(10)]
    for queue_id in ids:
        store.add(_envelope(queue_id, "a@x.test"), now=100)
        store.record(queue_id, [_final(0)], now=200)
        store.finish(queue_id, dsn_sent=False, now=200)  # all at the same time
    held = set(ids[:7])
    asked: list[list[str]] = []

    def keep(page: list[str]) -> set[str]:
        asked.append(page)
        return held & set(page)

    assert store.prune(before=500, keep=keep) == 3
    assert [q for page in asked for q in page] == ids  # each looked at once, in order
    assert [q for q in ids if store.message(q) is not None] == ids[:7]
    held.clear()
    assert store.prune(before=500, keep=keep) == 3  # at most a batch per call
    assert store.prune(before=500, keep=keep) == 3
    assert store.prune(before=500, keep=keep) == 1
    assert store.prune(before=500, keep=keep) == 0
