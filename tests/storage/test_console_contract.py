"""The console store's contract, on SQLite and on a real PostgreSQL server: local
accounts with sealed TOTP secrets, wrong sign-ins counted and locking even when tried
at once from several connections (another node), a TOTP step used only once,
disabled and reset accounts; sessions that end when idle, at their lifetime, at sign
out and when their account is disabled, good on another connection (node); sign-ins
with a provider single-use and bound to the browser; the overview's kept days."""

from __future__ import annotations

import os
import threading

import pytest

from gateway.archive.sealing import MasterKeys
from gateway.console.store import Check, ConsoleStore
from tests.support.clock import Clock

KEYS = MasterKeys("k1", {"k1": os.urandom(32)})


def store(connect, at: float = 1_800_000_000.0) -> tuple[ConsoleStore, Clock]:
    s = ConsoleStore(connect(), KEYS, clock=lambda: at)
    return s, Clock.install(s)


def right_at(step: int | None):
    return lambda user: step if user is not None else None


def test_accounts_keep_their_totp_secret_sealed_and_their_roles(connect):
    s, _ = store(connect)
    s.add_user("ana", "$argon2id$x", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", ("auditor", "admin"))
    with pytest.raises(ValueError, match="already"):
        s.add_user("ana", "$argon2id$y", "X" * 32, ("auditor",))
    user = s.user("ana")
    assert user is not None and user.roles == ("auditor", "admin") and not user.disabled
    assert s.totp_secret("ana") == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    raw = s.db.execute("SELECT totp FROM users WHERE name='ana'").fetchone()[0]
    assert b"JBSWY3DP" not in bytes(raw)  # sealed, not stored as it is
    assert [u.name for u in s.users()] == ["ana"] and s.user("bob") is None


def test_wrong_sign_ins_lock_even_when_tried_at_once_from_several_connections(connect):
    first, clock = store(connect)
    first.add_user("ana", "$argon2id$x", "S" * 32, ("auditor",))
    others = [ConsoleStore(connect(), KEYS, clock=clock) for _ in range(6)]
    results: list[Check] = []
    gate = threading.Barrier(len(others))

    def guess(s: ConsoleStore) -> None:
        gate.wait()
        results.append(s.check("ana", right_at(None), 5, 900))

    threads = [threading.Thread(target=guess, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # five failures counted exactly once each: the fifth locks, the sixth is refused
    assert sorted(r.value for r in results) == sorted(["wrong"] * 4 + ["locked"] + ["refused"]), (
        results
    )
    assert first.check("ana", right_at(100), 5, 900) is Check.REFUSED  # right, but locked
    clock.advance(901)
    assert first.check("ana", right_at(100), 5, 900) is Check.RIGHT


def test_a_totp_step_is_accepted_once_and_failures_reset_on_success(connect):
    s, _ = store(connect)
    s.add_user("ana", "$argon2id$x", "S" * 32, ("auditor",))
    assert s.check("ana", right_at(None), 5, 900) is Check.WRONG
    assert s.check("ana", right_at(1000), 5, 900) is Check.RIGHT
    assert s.check("ana", right_at(1000), 5, 900) is Check.WRONG  # the same code again
    assert s.check("ana", right_at(999), 5, 900) is Check.WRONG  # an older one
    assert s.check("ana", right_at(1001), 5, 900) is Check.RIGHT
    assert s.user("ana").failed == 0
    seen = []
    assert s.check("nobody", lambda user: seen.append(user), 5, 900) is Check.WRONG
    assert seen == [None]  # the same work done for a name without an account


def test_disabled_and_reset_accounts(connect):
    s, clock = store(connect)
    s.add_user("ana", "$argon2id$x", "S" * 32, ("auditor",))
    sid, _ = s.new_session("local:ana", "ana", frozenset({"auditor"}), 3600)
    s.disable_user("ana")
    assert s.session(sid, 900) is None  # its sessions ended
    assert s.check("ana", right_at(5), 5, 900) is Check.REFUSED
    s.reset_user("ana", "$argon2id$new", "T" * 32, ("investigator",))
    user = s.user("ana")
    assert not user.disabled and user.password == "$argon2id$new"
    assert user.roles == ("investigator",) and s.totp_secret("ana") == "T" * 32
    assert s.check("ana", right_at(5), 5, 900) is Check.RIGHT  # a new secret: steps anew
    with pytest.raises(KeyError):
        s.reset_user("bob", "$argon2id$x")
    with pytest.raises(KeyError):
        s.disable_user("bob")


def test_sessions_end_when_idle_at_their_lifetime_and_at_sign_out(connect):
    s, clock = store(connect)
    sid, csrf = s.new_session("entra:abc", "ana@clinic.test", frozenset({"auditor"}), 7200)
    other = ConsoleStore(connect(), KEYS, clock=clock)  # another node
    found = other.session(sid, 900)
    assert found is not None and found.csrf == csrf and found.roles == {"auditor"}
    assert found.identity == "entra:abc" and found.display == "ana@clinic.test"
    assert s.session("forged", 900) is None
    for _ in range(5):  # each request keeps it alive
        clock.advance(800)
        assert s.session(sid, 900) is not None
    clock.advance(901)
    assert s.session(sid, 900) is None  # idle too long, and gone for good
    clock.advance(-901)
    assert s.session(sid, 900) is None
    long_sid, _ = s.new_session("local:ana", "ana", frozenset({"auditor"}), 1000)
    clock.advance(600)
    assert s.session(long_sid, 900) is not None
    clock.advance(600)
    assert s.session(long_sid, 900) is None  # past its lifetime, however active
    third, _ = s.new_session("local:ana", "ana", frozenset({"auditor"}), 1000)
    s.end_session(third)
    assert s.session(third, 900) is None
    stored = s.db.execute("SELECT sid_sha256 FROM sessions").fetchall()
    assert all(sid not in row[0] for row in stored)  # only digests kept


def test_provider_sign_ins_are_single_use_and_bound_to_the_browser(connect):
    s, clock = store(connect)
    s.put_oidc_state("state-1", "entra", "nonce", "verifier", "browser-a")
    assert s.take_oidc_state("state-1", "browser-b") is None  # another browser: used up
    assert s.take_oidc_state("state-1", "browser-a") is None
    s.put_oidc_state("state-2", "entra", "nonce2", "verifier2", "browser-a")
    assert s.take_oidc_state("state-2", "browser-a") == ("entra", "nonce2", "verifier2")
    assert s.take_oidc_state("state-2", "browser-a") is None
    s.put_oidc_state("state-3", "entra", "n", "v", "browser-a")
    clock.advance(601)
    assert s.take_oidc_state("state-3", "browser-a") is None  # too late
    s.put_oidc_state("state-4", "entra", "n", "v", "browser-a")
    s.new_session("local:ana", "ana", frozenset({"auditor"}), 10)
    clock.advance(700)
    s.prune()
    assert s.db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    assert s.db.execute("SELECT count(*) FROM oidc_states").fetchone()[0] == 0


def test_the_overviews_kept_days(connect):
    s, _ = store(connect)
    assert s.days("2026-01-01", "2026-01-31") == {}
    s.put_days({"2026-01-02": {"messages": 3}, "2026-02-01": {"messages": 1}})
    s.put_days({"2026-01-02": {"messages": 4}})
    assert s.days("2026-01-01", "2026-01-31") == {"2026-01-02": {"messages": 4}}
