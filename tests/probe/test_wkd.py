"""WKD: the draft's hash, the advanced and the direct method against an HTTPS server
with the test CA behind the DNS fixture, caching, and keys that go away."""

from __future__ import annotations

import time

import pytest

from gateway.crypto.keydir import DirectoryKeyStore, KeyDirectory
from gateway.observability.metrics import Metrics
from gateway.probe.wkd import WkdKeyStore, fetch_key, local_hash, locations
from tests.conftest import free_port, leaf_files
from tests.support.https import PolicyServer


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        ("eschwartz", "ycx3iaqih9tzkfk7dp8jo9xrdepu5m8u"),  # Sequoia / Arch Linux test vector
        ("Joe.Doe", "iy9q119eutrkn8s1mk4r39qejnbu3n5q"),  # the draft's example (lower-cased)
    ],
)
def test_the_local_part_hash(local, expected):
    assert local_hash(local) == expected


def test_the_two_locations():
    advanced, direct = locations("Joe.Doe@Example.ORG")
    assert advanced == (
        "openpgpkey.example.org",
        "/.well-known/openpgpkey/example.org/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe",
    )
    assert direct == (
        "example.org",
        "/.well-known/openpgpkey/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe",
    )


@pytest.fixture
async def wkd_server(world, pki, tmp_path):
    servers = []

    async def start(host: str, ip: str, body: bytes, status: int = 200) -> PolicyServer:
        leaf = pki.ca.issue_cert(host)
        chain, key = leaf_files(leaf, tmp_path, host)
        world.dns.add(host, "A", ip)
        server = PolicyServer(ip, world.wkd_port, (chain, key), body=body, status=status)
        server.content_type = "application/octet-stream"
        servers.append(await server.start())
        return server

    world.wkd_port = free_port()
    yield start
    for s in servers:
        await s.stop()


async def test_the_advanced_method_first(world, pki, wkd_server, pgp_keys):
    server = await wkd_server("openpgpkey.dest.test", "127.0.0.86", pgp_keys["dave"].public)
    direct = await wkd_server("dest.test", "127.0.0.87", b"wrong")
    data = await fetch_key(
        "dave@dest.test", world.resolver, port=world.wkd_port, ca_file=pki.ca_file
    )
    assert data == pgp_keys["dave"].public
    assert server.paths == [f"/.well-known/openpgpkey/dest.test/hu/{local_hash('dave')}?l=dave"]
    assert direct.requests == 0


async def test_the_direct_method_only_without_the_subdomain(world, pki, wkd_server, pgp_keys):
    server = await wkd_server("dest.test", "127.0.0.87", pgp_keys["dave"].public)
    data = await fetch_key(
        "dave@dest.test", world.resolver, port=world.wkd_port, ca_file=pki.ca_file
    )
    assert data == pgp_keys["dave"].public
    assert server.paths == [f"/.well-known/openpgpkey/hu/{local_hash('dave')}?l=dave"]


async def test_404_is_no_key(world, pki, wkd_server):
    await wkd_server("openpgpkey.dest.test", "127.0.0.86", b"", status=404)
    assert (
        await fetch_key("x@dest.test", world.resolver, port=world.wkd_port, ca_file=pki.ca_file)
        is None
    )


async def test_the_store_asks_once_keeps_the_key_and_forgets_it_when_gone(
    world, pki, wkd_server, pgp_keys, tmp_path
):
    server = await wkd_server("openpgpkey.dest.test", "127.0.0.86", pgp_keys["dave"].public)
    directory = KeyDirectory(tmp_path / "keydir.db")
    now = [time.time()]
    metrics = Metrics()
    store = WkdKeyStore(
        DirectoryKeyStore(directory, clock=lambda: now[0]),
        directory,
        world.resolver,
        port=world.wkd_port,
        ca_file=pki.ca_file,
        cache_ttl=100,
        negative_ttl=10,
        metrics=metrics,
        clock=lambda: now[0],
    )
    assert (await store.lookup("dave@dest.test")).pgp is None  # lookup never asks WKD
    assert server.requests == 0
    keys = await store.discover("Dave@dest.test")
    assert keys.pgp.source == "wkd" and keys.pgp.fingerprint == pgp_keys["dave"].fingerprint.lower()
    assert await store.material(keys.pgp) == pgp_keys["dave"].public
    assert (await store.discover("dave@dest.test")).pgp is not None
    assert (await store.lookup("dave@dest.test")).pgp is not None  # kept in the directory
    assert server.requests == 1  # cached
    server.status = 404
    now[0] += 101
    assert (await store.discover("dave@dest.test")).pgp is None  # WKD serves none now
    assert server.requests == 2 and directory.stored() == []
    sample = metrics.registry.get_sample_value
    assert sample("sealgate_wkd_lookups_total", {"outcome": "found"}) == 1
    assert sample("sealgate_wkd_lookups_total", {"outcome": "none"}) == 1
    directory.close()


async def test_an_imported_key_is_never_replaced_by_wkd(world, pki, wkd_server, pgp_keys, tmp_path):
    server = await wkd_server("openpgpkey.dest.test", "127.0.0.86", pgp_keys["erin"].public)
    directory = KeyDirectory(tmp_path / "keydir.db")
    directory.import_any(pgp_keys["dave"].public)
    store = WkdKeyStore(
        DirectoryKeyStore(directory), directory, world.resolver, port=world.wkd_port
    )
    assert (await store.discover("dave@dest.test")).pgp.source == "import"
    assert server.requests == 0
    directory.close()
