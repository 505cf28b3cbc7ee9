"""The MTA-STS policy store's contract - the JSON file of a single node, and the table
on SQLite and on a real PostgreSQL server: a policy saved is loaded again (by another
connection: a restarted process, another node) until it expires; saving a domain again
replaces its policy; an expired one is not loaded."""

from __future__ import annotations

import pytest

from gateway.probe.mta_sts import JsonStsStore, SqlStsStore, StsMode, StsPolicy, _Cached
from tests.support.stores import ENGINES, opener

NOW = 1_800_000_000.0


@pytest.fixture(params=["json", *ENGINES])
def stores(request, tmp_path):
    """Makes stores that see the same saved policies (as a restart or another node)."""
    if request.param == "json":
        yield lambda: JsonStsStore(tmp_path / "mta-sts.json")
        return
    opened: list = []
    connect = opener(request.param, request, tmp_path, opened)
    yield lambda: SqlStsStore(connect())
    for db in opened:
        db.close()


def cached(policy_id: str, expires: float, mode: StsMode = StsMode.ENFORCE) -> _Cached:
    return _Cached(policy_id, StsPolicy(mode, 86400, ("mx1.good.test", "*.good.test")), expires)


def test_a_saved_policy_is_loaded_again_until_it_expires(stores):
    first = stores()
    first.save("good.test", cached("one", NOW + 100))
    first.save("old.test", cached("x", NOW + 10, StsMode.TESTING))
    again = stores().load(NOW)
    assert again == {
        "good.test": cached("one", NOW + 100),
        "old.test": cached("x", NOW + 10, StsMode.TESTING),
    }
    assert again["good.test"].expires == NOW + 100  # full precision
    assert stores().load(NOW + 50) == {"good.test": cached("one", NOW + 100)}


def test_saving_a_domain_again_replaces_its_policy(stores):
    store = stores()
    store.save("good.test", cached("one", NOW + 100))
    store.save("good.test", cached("two", NOW + 200, StsMode.TESTING))
    assert stores().load(NOW) == {"good.test": cached("two", NOW + 200, StsMode.TESTING)}
