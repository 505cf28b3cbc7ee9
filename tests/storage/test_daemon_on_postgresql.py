"""The daemon and its commands with every store in PostgreSQL (storage.database) and
the archive's content in the database or in S3 (moto): mail accepted, delivered,
archived and verified; keys imported by the command used by the daemon; the
schema's version kept, migrations explicit unless storage.auto_migrate, a schema
newer than the node refused; check-config and a start that cannot reach or use the
database say precisely what is wrong."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psycopg
import pytest

from gateway.queue.store import VERSIONED as QUEUE
from gateway.storage.stores import STORES, schemas
from tests.conftest import load_test_config, run_sealgate, write_config
from tests.support.delivery import send, start, state
from tests.support.stores import sealgate
from tests.support.world import wait_until


def pg(postgres, **more):
    return {
        "storage.database": postgres.database(),
        "storage.password_file": str(postgres.password_file),
        **more,
    }


@pytest.mark.parametrize("blobs", ["database", "s3"])
async def test_mail_is_delivered_archived_and_verified_with_the_stores_in_postgresql(
    gateway_factory, world, pki, postgres, s3, tmp_path, blobs
):
    dest = await world.mta("mx.dest.test", "127.0.0.31")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    overrides = pg(postgres, **{"storage.auto_migrate": True, "archive.index_subjects": True})
    if blobs == "s3":
        overrides.update(s3.config(s3.bucket(object_lock=True)))
    gw = await start(gateway_factory, world, pki, **overrides)
    # a server's stores keep a thread each (a round trip a statement: not in turn)
    queue_thread = await gw.queue._db(threading.current_thread)
    assert await gw.archive._run(threading.current_thread) is not queue_thread
    queue_id = await send(gw, ["r@dest.test", "bcc@dest.test"])
    await wait_until(lambda: dest.received, what="delivery")
    await wait_until(lambda: state(gw, queue_id)["r@dest.test"][0] == "delivered", what="recorded")
    assert not (tmp_path / "state" / "queue.db").exists()  # nothing in SQLite
    assert not (tmp_path / "state" / "archive" / "index.db").exists()
    await gw.stop()

    found = await asyncio.to_thread(sealgate, tmp_path, "archive", "search", "--recipient",
                                    "bcc@dest.test", "--json")  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["queue_id"] for line in found.stdout.splitlines()] == [queue_id]
    subject = await asyncio.to_thread(sealgate, tmp_path, "archive", "search", "--subject",
                                      "biopsy result", "--json")  # fmt: skip
    assert queue_id in subject.stdout
    verified = await asyncio.to_thread(sealgate, tmp_path, "archive", "verify")
    assert verified.returncode == 0 and "archive OK" in verified.stdout, verified.stdout
    if blobs == "s3":
        bucket = overrides["storage.blobs"].split("/")[2]
        names = s3.client().list_objects_v2(Bucket=bucket, Prefix="records/")
        assert f"records/msg-{queue_id}" in [o["Key"] for o in names["Contents"]]
    status = await asyncio.to_thread(sealgate, tmp_path, "storage", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


async def test_a_key_imported_by_the_command_is_in_the_shared_directory(
    gateway_factory, postgres, tmp_path
):
    from tests.support.smime_pki import mailbox

    overrides = pg(postgres, **{"storage.auto_migrate": True})
    gw = await gateway_factory(overrides)
    (tmp_path / "r.pem").write_bytes(mailbox("r@dest.test").pem)
    done = await asyncio.to_thread(sealgate, tmp_path, "keys", "import", str(tmp_path / "r.pem"))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    assert [k.addresses for k in gw.keydir.stored()] == [("r@dest.test",)]


def test_migrations_are_explicit_and_a_newer_schema_is_refused(postgres, tmp_path):
    settings = pg(postgres)
    write_config(tmp_path, settings)
    empty = sealgate(tmp_path, "storage", "status")
    assert empty.returncode == 1 and "empty: needs 'sealgate storage migrate'" in empty.stdout
    refused = sealgate(tmp_path, "check-config")
    assert refused.returncode == 78
    assert "queue tables: empty: needs 'sealgate storage migrate'" in refused.stderr
    run = sealgate(tmp_path, "run")
    assert run.returncode == 78 and "run 'sealgate storage migrate'" in run.stderr, run.stderr

    migrated = sealgate(tmp_path, "storage", "migrate")
    latest = QUEUE.version
    assert migrated.returncode == 0, migrated.stderr
    assert f"queue          0 -> {latest}" in migrated.stdout, migrated.stdout
    config = load_test_config(tmp_path / "config.yaml")
    every = sum(len(schemas(store, config)) for store in STORES)  # each store's tables
    assert sealgate(tmp_path, "storage", "migrate").stdout.count("up to date") == every
    assert sealgate(tmp_path, "check-config").returncode == 0

    url = settings["storage.database"]  # a node upgraded first moved the schema on
    with psycopg.connect(url, password=postgres.password_file.read_text().strip()) as c:
        c.execute(f"UPDATE sealgate_queue.sealgate_schema SET version = {latest + 1}")
    newer = sealgate(tmp_path, "check-config")
    assert newer.returncode == 78
    assert "queue tables: newer than this Sealgate knows: upgrade it" in newer.stderr
    run = sealgate(tmp_path, "run")
    assert run.returncode == 78, run.stderr
    assert (
        f"the queue tables are at version {latest + 1}, newer than this Sealgate knows ({latest})"
        in run.stderr
    )


def test_an_unreachable_server_a_wrong_password_and_a_missing_bucket_are_named(
    postgres, s3, tmp_path
):
    from tests.conftest import free_port

    write_config(tmp_path, {"storage.database": f"postgresql://sealgate@127.0.0.1:{free_port()}/x"})
    down = sealgate(tmp_path, "check-config")
    assert down.returncode == 78 and "unreachable" in down.stderr, down.stderr
    run = sealgate(tmp_path, "run")  # systemd tries again later: 75, not 78
    assert run.returncode == 75 and "storage: " in run.stderr and "unreachable" in run.stderr

    (tmp_path / "wrong").write_text("not-the-password\n")
    write_config(tmp_path, {**pg(postgres), "storage.password_file": str(tmp_path / "wrong")})
    wrong = sealgate(tmp_path, "check-config")
    assert "refused: " in wrong.stderr and "password authentication failed" in wrong.stderr
    assert "not-the-password" not in wrong.stderr

    write_config(tmp_path, s3.config("no-such-bucket"))
    missing = sealgate(tmp_path, "check-config")
    assert missing.returncode == 78
    assert "storage.blobs: s3://no-such-bucket: the bucket does not exist" in missing.stderr
    write_config(tmp_path, s3.config(s3.bucket(object_lock=False), lock="compliance"))
    unlocked = sealgate(tmp_path, "check-config")
    assert "Object Lock is not enabled on the bucket" in unlocked.stderr


async def test_a_node_with_archive_keys_of_its_own_is_refused_with_what_to_do(
    gateway_factory, postgres, tmp_path
):
    from gateway.errors import ConfigError
    from tests.cluster.support import shared_keys

    settings = pg(postgres, **{"storage.auto_migrate": True})
    keys = shared_keys(tmp_path / "keys")
    await gateway_factory({**settings, **keys, "state_dir": str(tmp_path / "a")})
    own_master = {**keys, "archive.master_keys": []}  # made on first start: not the archive's
    with pytest.raises(ConfigError, match="master keys this node does not have: give every"):
        await gateway_factory({**settings, **own_master, "state_dir": str(tmp_path / "b")})
    own_signing = {**keys, "archive.signing_key_file": None}
    with pytest.raises(ConfigError, match="checkpoints are signed with another key"):
        await gateway_factory({**settings, **own_signing, "state_dir": str(tmp_path / "c")})


async def test_cluster_status_shows_each_node_and_one_configured_differently(
    gateway_factory, postgres, tmp_path
):
    from tests.cluster.support import shared_keys

    settings = pg(postgres, **{"storage.auto_migrate": True, "cluster.lease_timeout": "6s"})
    settings.update(shared_keys(tmp_path / "keys"))
    await gateway_factory({**settings, "cluster.node_id": "n1", "state_dir": str(tmp_path / "1")})
    await gateway_factory(
        {
            **settings,
            "cluster.node_id": "n2",
            "state_dir": str(tmp_path / "2"),
            "delivery.max_queue_lifetime": "1d",  # not as the other node
        }
    )
    shown = await asyncio.to_thread(sealgate, tmp_path, "cluster", "status")
    assert shown.returncode == 1, shown.stdout
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("n1") and "alive" in lines[0] and "DIFFERS: config" in lines[0]
    assert lines[1].startswith("n2") and "DIFFERS: config" in lines[1]
    assert lines[2].startswith("backlog: pending 0")
    one = await asyncio.to_thread(run_sealgate, "cluster", "status", "--state-dir", "/nonexistent")
    assert one.returncode == 78 and "one node" in one.stderr


async def test_a_key_imported_on_one_node_is_used_by_another_within_a_second(
    gateway_factory, postgres, tmp_path
):
    from tests.cluster.support import shared_keys
    from tests.support.smime_pki import mailbox

    settings = pg(postgres, **{"storage.auto_migrate": True})
    settings.update(shared_keys(tmp_path / "keys"))
    await gateway_factory({**settings, "cluster.node_id": "a", "state_dir": str(tmp_path / "a")})
    config_a = (tmp_path / "config.yaml").read_text()
    b = await gateway_factory(
        {**settings, "cluster.node_id": "b", "state_dir": str(tmp_path / "b")}
    )
    assert (await b.delivery.keys.lookup("r@dest.test")).smime is None  # B has looked once
    (tmp_path / "a.yaml").write_text(config_a)
    (tmp_path / "r.pem").write_bytes(mailbox("r@dest.test").pem)
    imported = await asyncio.to_thread(
        run_sealgate,
        "keys",
        "import",
        str(tmp_path / "r.pem"),
        "--config",
        str(tmp_path / "a.yaml"),
    )  # on node A's configuration
    assert imported.returncode == 0, imported.stderr
    started = time.monotonic()
    while (await b.delivery.keys.lookup("r@dest.test")).smime is None:
        assert time.monotonic() - started < 1.5, "B did not see the key within a second"
        await asyncio.sleep(0.05)


async def test_queue_list_and_show_on_one_node_see_what_another_accepted(
    gateway_factory, postgres, tmp_path
):
    from tests.cluster.support import shared_keys
    from tests.conftest import make_message, smtp_client

    settings = pg(postgres, **{"storage.auto_migrate": True})
    settings.update(shared_keys(tmp_path / "keys"))
    one = await gateway_factory(
        {**settings, "cluster.node_id": "n1", "state_dir": str(tmp_path / "1")}
    )
    async with smtp_client(one) as client:  # its next hop does not answer: it waits
        _, reply = await client.sendmail("dr@clinic.test", ["r@dest.test"], make_message())
    queue_id = reply.rsplit(" ", 1)[1]
    await gateway_factory({**settings, "cluster.node_id": "n2", "state_dir": str(tmp_path / "2")})
    listed = await asyncio.to_thread(sealgate, tmp_path, "queue", "list", "--json")  # as n2
    assert [json.loads(line)["queue_id"] for line in listed.stdout.splitlines()] == [queue_id]
    shown = await asyncio.to_thread(sealgate, tmp_path, "queue", "show", queue_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["mail_from"] == "dr@clinic.test"
