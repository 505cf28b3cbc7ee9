"""The portal store's contract, on SQLite and on a real PostgreSQL server: items by
their link's digest, sealed content, revocation and expiry; codes, wrong ones
counted and locking even when tried at once from several connections (another
process, another node); sessions and their stages; passwords per address with their
own lockout; resets counted; OIDC sign-ins under way single-use and bound to the
browser."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from gateway.archive.sealing import MasterKeys
from gateway.model import PortalAuth
from gateway.portal.store import OPEN, SET_PASSWORD, CodeCheck, Deposit, PortalStore
from tests.support.clock import Clock

KEYS = MasterKeys("k1", {"k1": os.urandom(32)})


def store(connect, at: float = 1_800_000_000.0) -> tuple[PortalStore, Clock]:
    s = PortalStore(connect(), KEYS, clock=lambda: at)
    return s, Clock.install(s)


def test_items_by_link_sealed_revoked_and_expired(connect):
    s, clock = store(connect)
    item, token = s.deposit(
        "Q1", "p@plain.test", "d@clinic.test", b"secret body", clock() + 100,
        PortalAuth.PASSPHRASE, "$argon2id$hash",
    )  # fmt: skip
    found = s.item(token)
    assert found == item and found.auth is PortalAuth.PASSPHRASE
    assert s.item("not-" + token) is None
    assert s.content(found) == b"secret body"
    assert s.passphrase_of(found) == "$argon2id$hash"
    assert found.created == clock() and found.expires == clock() + 100  # full precision
    assert s.ids() == [item.id] and s.items_of("Q1") == [item]
    assert s.picked_up(found, clock()) and not s.picked_up(s.item(token), clock())
    other, _ = s.deposit("Q2", "p@plain.test", "d@clinic.test", b"x", clock() + 10)
    assert s.revoke(other.id, "admin") and not s.revoke(other.id, "admin")
    assert s.item_by_id(other.id).state(clock()) == "revoked"
    clock.advance(101)
    assert s.sweep(clock()) == []  # picked up: not counted as unread
    assert s.item(token).state(clock()) == "expired"


def test_a_message_for_several_recipients_is_kept_once_until_its_last_item_ends(connect):
    s, clock = store(connect)
    body = b"lab results " * 1000
    items = [
        s.deposit("Q1", f"{n}@plain.test", "d@clinic.test", body, clock() + 100 + n)[0]
        for n in range(3)
    ]
    changed, _ = s.deposit("Q1", "x@other.test", "d@clinic.test", b"re-signed", clock() + 50)
    contents = lambda: s.db.execute("SELECT count(*) FROM contents").fetchone()[0]  # noqa: E731
    assert contents() == 2  # three recipients, one content; another copy, another
    (content_id,) = {
        r[0] for r in s.db.execute("SELECT content FROM items WHERE queue_id='Q1'")
    } - {s.db.execute("SELECT content FROM items WHERE id=?", (changed.id,)).fetchone()[0]}
    assert hashlib.sha256(body).hexdigest()[:32] not in content_id  # a keyed digest
    assert [s.content(i) for i in items] == [body] * 3 and s.content(changed) == b"re-signed"
    assert s.revoke(items[0].id, "admin") and contents() == 2  # the others still read it
    assert s.content(items[1]) == body
    clock.advance(51)
    s.sweep(clock())  # the changed copy's only item expired: its content goes
    assert contents() == 1
    clock.advance(50)
    s.sweep(clock())  # items[1] expired, items[2] (expires a second later) still open
    assert contents() == 1 and s.content(s.item_by_id(items[2].id)) == body
    assert s.revoke(items[2].id, "admin") and contents() == 0  # the last one: gone at once
    # an item's pointer is sealed to it: pointing it at another message's content fails
    a, _ = s.deposit("Q2", "a@plain.test", "d@clinic.test", b"for a", clock() + 100)
    b, _ = s.deposit("Q3", "b@plain.test", "d@clinic.test", b"for b", clock() + 100)
    target = s.db.execute("SELECT content FROM items WHERE id=?", (b.id,)).fetchone()[0]
    s.db.execute("UPDATE items SET content=? WHERE id=?", (target, a.id))
    try:
        s.content(a)
        raise AssertionError("opened another message's content")
    except KeyError:
        pass


def test_an_item_stored_before_contents_were_shared_still_opens(connect):
    from gateway.archive.sealing import seal

    s, clock = store(connect)
    s.db.execute(
        "INSERT INTO items(id, token_sha256, queue_id, recipient, sender, created, expires, "
        "sealed, auth) VALUES (?,?,?,?,?,?,?,?,?)",
        ("p-old", "0" * 64, "Q0", "o@plain.test", "d@clinic.test", clock(), clock() + 10,
         seal(b"old body", "p-old", KEYS), "code"),
    )  # fmt: skip
    old = s.item_by_id("p-old")
    assert s.content(old) == b"old body"
    assert s.revoke("p-old", "admin") and s.item_by_id("p-old").gone


def test_a_deposit_and_the_revocation_of_the_other_item_at_once_lose_nothing(connect):
    """Two connections (nodes): one revokes the message's only item while the other
    deposits it for another recipient - whichever goes first, the new item opens."""
    s, clock = store(connect)
    other, _ = store(connect)
    body = b"discharge summary " * 500
    for n in range(20):
        first, _ = s.deposit(f"R{n}", "a@plain.test", "d@clinic.test", body, clock() + 100)
        made: list = []
        t = threading.Thread(
            target=lambda n=n, made=made: made.append(
                other.deposit(f"R{n}", "b@plain.test", "d@clinic.test", body, clock() + 100)[0]
            )
        )
        t.start()
        s.revoke(first.id, "admin")
        t.join(10)
        assert other.content(made[0]) == body


def test_codes_lock_the_link_even_when_tried_at_once_from_several_connections(connect):
    first, clock = store(connect)
    item, _ = first.deposit("Q1", "p@plain.test", "d@clinic.test", b"x", clock() + 1000)
    code = first.new_code(item, ttl=600)
    others = [PortalStore(connect(), KEYS, clock=clock) for _ in range(6)]
    results: list[CodeCheck] = []
    gate = threading.Barrier(len(others))

    def guess(s: PortalStore) -> None:
        gate.wait()
        results.append(s.check_code(item, "00000000" if code != "00000000" else "1", 5, 900))

    threads = [threading.Thread(target=guess, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.value for r in results) == sorted(["wrong"] * 4 + ["locked"] + ["refused"])
    assert first.check_code(item, code, 5, 900) is CodeCheck.REFUSED  # locked: not compared
    clock.advance(901)
    assert first.check_code(item, code, 5, 900) is CodeCheck.WRONG  # the lock voided it
    fresh = first.new_code(item, ttl=600)
    assert first.check_code(item, fresh, 5, 900) is CodeCheck.RIGHT
    assert first.check_code(item, fresh, 5, 900) is CodeCheck.WRONG  # used up


def test_sessions_and_their_stages(connect):
    s, clock = store(connect)
    item, _ = s.deposit("Q1", "p@plain.test", "d@clinic.test", b"x", clock() + 1000)
    sid, csrf = s.new_session(item, 60, SET_PASSWORD)
    assert s.session(sid, item) is None and s.session(sid, item, SET_PASSWORD) == csrf
    s.promote(sid)
    assert s.session(sid, item, OPEN) == csrf
    other, _ = s.deposit("Q2", "p@plain.test", "d@clinic.test", b"x", clock() + 1000)
    assert s.session(sid, other) is None  # one message's session opens no other
    clock.advance(61)
    assert s.session(sid, item) is None
    sid, _ = s.new_session(item, 60)
    s.end_session(sid)
    assert s.session(sid, item) is None


def test_passwords_per_address_with_their_own_lockout_and_resets(connect):
    s, clock = store(connect)
    assert s.password_of("P@Plain.test") is None
    assert not s.set_password("P@Plain.test", "$argon2id$one")
    assert s.password_of("p@plain.test") == "$argon2id$one"  # addresses fold case
    for _ in range(2):
        assert s.count_password("p@plain.test", False, 3, 600) is CodeCheck.WRONG
    assert s.count_password("p@plain.test", False, 3, 600) is CodeCheck.LOCKED
    assert s.account_locked("p@plain.test") == clock() + 600
    assert s.count_password("p@plain.test", True, 3, 600) is CodeCheck.REFUSED
    assert s.set_password("p@plain.test", "$argon2id$two")  # a reset replaces and unlocks
    assert s.account_locked("p@plain.test") == 0.0
    assert s.count_password("p@plain.test", True, 3, 600) is CodeCheck.RIGHT
    s.note_reset("p@plain.test")
    s.note_reset("p@plain.test")
    assert s.resets_today("P@plain.test") == 2
    clock.advance(86401)
    assert s.resets_today("p@plain.test") == 0


def test_oidc_sign_ins_under_way_are_single_use_and_bound_to_the_browser(connect):
    s, clock = store(connect)
    item, _ = s.deposit("Q1", "p@plain.test", "d@clinic.test", b"x", clock() + 1000)
    s.save_oidc("state-1", item, "idp", "nonce-1", "verifier-1", "browser-1")
    assert s.take_oidc("state-1", "another-browser") is None  # and it is used up by that
    s.save_oidc("state-2", item, "idp", "nonce-2", "verifier-2", "browser-2")
    assert s.take_oidc("state-2", "browser-2") == (item.id, "idp", "nonce-2", "verifier-2")
    assert s.take_oidc("state-2", "browser-2") is None
    s.save_oidc("state-3", item, "idp", "n", "v", "b")
    clock.advance(601)
    assert s.take_oidc("state-3", "b") is None  # ten minutes at most


def test_request_rates_are_counted_together_by_every_connection(connect):
    one, two = PortalStore(connect(), KEYS), PortalStore(connect(), KEYS)
    at = 1_800_000_040.0  # 40 s into a minute
    assert [one.hit("ip:192.0.2.7", 3, 60, at), two.hit("ip:192.0.2.7", 3, 60, at + 1)] == [
        True,
        True,
    ]
    assert one.hit("ip:192.0.2.7", 3, 60, at + 2) is True
    assert two.hit("ip:192.0.2.7", 3, 60, at + 3) is False  # the fourth, from either
    assert one.hit("ip:198.51.100.1", 3, 60, at + 3) is True  # another address
    assert two.hit("ip:192.0.2.7", 3, 60, at + 21) is True  # the next minute


class _Lingering(Deposit):
    """A deposit that keeps its batch open a while after it (its row locks held)."""

    def __call__(self):
        made = super().__call__()
        time.sleep(0.4)
        return made


def test_two_nodes_depositing_the_same_contents_at_once_in_opposite_orders_do_not_deadlock(
    connect,
):
    """Each batch holds its contents' rows until it commits.  Node one is given message
    A then B, node two B then A: made in that order, each would wait for the row the
    other holds (PostgreSQL ends one batch as a deadlock).  Made in the order of the
    rows, one waits for the other and both are kept."""
    one, two = PortalStore(connect(), KEYS), PortalStore(connect(), KEYS)
    a, b = ("QA", b"message A"), ("QB", b"message B")
    later = time.time() + 1000

    def jobs(store, first, second):
        return [
            _Lingering(store, q, f"{store is one}-{q}@plain.test", "d@clinic.test", data, later)
            for q, data in (first, second)
        ]

    outcomes = {}
    batches = {"one": (one, jobs(one, a, b)), "two": (two, jobs(two, b, a))}

    def node(name, store, given):
        outcomes[name] = store.deposit_all(given)

    threads = [threading.Thread(target=node, args=(n, *b)) for n, b in batches.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, (_, given) in batches.items():
        errors = [e for _, e in outcomes[name]]
        assert errors == [None, None], f"node {name}: {errors}"
        # the outcomes come back in the order the jobs were given
        assert [item.queue_id for (item, _), _ in outcomes[name]] == [j.queue_id for j in given]
    assert {i.recipient for i in one.items_of("QA")} == {
        "True-QA@plain.test",
        "False-QA@plain.test",
    }
    assert len(two.items_of("QB")) == 2
