"""Moving a single node to the cluster: ``sealgate storage copy --to postgresql://...``
(and ``--blobs s3://...``) of a stopped node whose archive has checkpoints and a
purge record, a key and deferred mail: the archive verifies on the target, old
checkpoints included; the node started on PostgreSQL delivers what was waiting,
finds the key and searches the copied archive."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from tests.conftest import make_message, smtp_client, write_config
from tests.support.smime_pki import mailbox
from tests.support.stores import sealgate
from tests.support.world import wait_until


@pytest.mark.parametrize("blobs", ["database", "s3"])
async def test_a_single_nodes_state_moves_to_the_shared_stores_and_still_verifies(
    gateway_factory, world, pki, postgres, s3, tmp_path, blobs
):
    dest = await world.mta("mx.dest.test", "127.0.0.53")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    later = "127.0.0.54"  # nothing listens there yet: its mail waits
    settings = world.config(
        {
            "archive.index_subjects": True,
            "delivery.retry_schedule": ["1s"],
            "routes": {"later.test": later},
        }
    )
    gw = await gateway_factory(settings)
    async with smtp_client(gw) as client:
        for i in range(3):
            await client.sendmail("dr@clinic.test", [f"r{i}@dest.test"], make_message(f"Lab {i}"))
        await client.sendmail("dr@clinic.test", ["w@later.test"], make_message("Waiting"))
    await wait_until(lambda: len(dest.received) == 3, what="three delivered")
    await gw.stop()  # a final checkpoint
    (tmp_path / "r.pem").write_bytes(mailbox("r@later.test").pem)
    assert (
        await asyncio.to_thread(sealgate, tmp_path, "keys", "import", str(tmp_path / "r.pem"))
    ).returncode == 0
    db = sqlite3.connect(tmp_path / "state/archive/index.db")  # the first one is past retention
    first = db.execute("SELECT queue_id FROM messages ORDER BY received LIMIT 1").fetchone()[0]
    db.execute("UPDATE messages SET retain_until=? WHERE queue_id=?", (time.time() - 1, first))
    db.commit()
    db.close()
    purged = await asyncio.to_thread(sealgate, tmp_path, "archive", "purge", "--yes")
    assert "purged 1 message(s)" in purged.stdout, purged.stdout + purged.stderr
    await asyncio.to_thread(sealgate, tmp_path, "archive", "verify")  # another checkpoint

    url = postgres.database()
    extra = ["--blobs", s3.config(s3.bucket())["storage.blobs"]] if blobs == "s3" else []
    if blobs == "s3":  # the bucket's credentials come from the configuration
        s3_settings = {k: v for k, v in s3.config("x").items() if k != "storage.blobs"}
        write_config(tmp_path, {**settings, **s3_settings})
    copied = await asyncio.to_thread(
        sealgate, tmp_path, "storage", "copy", "--to", url,
        "--password-file", str(postgres.password_file), *extra,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert (
        "copied archive verifies" in copied.stdout and "1 purged under retention" in copied.stdout
    )
    assert "queue: 1 spooled messages shared" in copied.stdout, copied.stdout

    waiting = await world.mta("mx.later.test", later)  # now it answers
    shared = {
        **settings,
        "storage.database": url,
        "storage.password_file": str(postgres.password_file),
    }
    if blobs == "s3":
        shared.update({**s3_settings, "storage.blobs": extra[1]})
    gw = await gateway_factory(shared)
    await wait_until(lambda: waiting.received, timeout=30, what="the waiting message delivered")
    assert [k.addresses for k in gw.keydir.stored()] == [("r@later.test",)]
    await gw.stop()
    verified = await asyncio.to_thread(sealgate, tmp_path, "archive", "verify")
    assert verified.returncode == 0 and "archive OK" in verified.stdout, verified.stdout
    found = await asyncio.to_thread(
        sealgate, tmp_path, "archive", "search", "--subject", "lab 2", "--json"
    )
    assert len(found.stdout.splitlines()) == 1 and json.loads(found.stdout)["mail_from"]
    again = await asyncio.to_thread(
        sealgate, tmp_path, "storage", "copy", "--to", url,
        "--password-file", str(postgres.password_file),
    )  # fmt: skip
    assert again.returncode == 78  # the state is in PostgreSQL now (and that one is full)
