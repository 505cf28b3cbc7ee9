"""The queue state store: leases, per-recipient records, audited admin actions."""

from __future__ import annotations

from gateway.model import ClientInfo, Envelope, Recipient
from gateway.queue.store import QueueStore


def _envelope(queue_id: str, *rcpts: str) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        received_at="2026-11-22T07:00:00+00:00",
        mail_from="s@clinic.test",
        mail_options=(),
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
        size=1,
        sha256="0",
    )


def test_claimed_recipients_are_not_claimed_twice_until_their_result_or_a_restart(tmp_path):
    store = QueueStore(tmp_path / "queue.db")
    assert store.add(_envelope("Q1", "a@x.test", "b@y.test"), now=100)
    assert not store.add(_envelope("Q1", "a@x.test"), now=100)  # known already
    first = store.claim(now=200, limit=10)
    assert sorted(r.address for r in first) == ["a@x.test", "b@y.test"]
    assert store.claim(now=200, limit=10) == []  # leased
    store.record("Q1", 0, "deferred", "4.4.1", "down", None, 300, "deferred", now=200)
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
