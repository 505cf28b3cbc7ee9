"""The archive's commands on an archive the daemon wrote: verify names each record
altered, whose index row is gone, or that was removed; purge is a dry run unless
told, removes only expired unheld content and is not tampering; retention rules and
the floor from the configuration; master-key rotation keeps old records readable."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time

import yaml

from tests.conftest import make_message, run_sealgate, smtp_client
from tests.support.archive import archive_of
from tests.support.world import wait_until


def cli(tmp_path, *args: str):
    return run_sealgate("archive", *args, "--config", str(tmp_path / "config.yaml"))


def show(tmp_path, queue_id: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "gateway", "archive", "show", queue_id]
    return subprocess.run(
        [*command, "--config", str(tmp_path / "config.yaml")], capture_output=True
    )


async def accept(gw, rcpts, sender="doctor@clinic.test", body="Hello.\r\n") -> str:
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail(sender, rcpts, make_message("Results", body))
    return reply.rsplit(" ", 1)[1]


async def journaled(gw, n):
    name = "sealgate_archive_journaled_messages_total"
    await wait_until(lambda: gw.metrics.registry.get_sample_value(name) == n, what="journaled")


async def test_verify_names_a_flipped_byte_a_deleted_index_row_and_a_removed_record(
    gateway_factory, tmp_path
):
    gw = await gateway_factory({})
    ids = [await accept(gw, [f"p{n}@dest.test"]) for n in range(4)]
    await journaled(gw, 4)
    await gw.stop()  # the archive is closed, with a final checkpoint
    ok = await asyncio.to_thread(cli, tmp_path, "verify")
    assert ok.returncode == 0 and "archive OK" in ok.stdout, ok.stdout

    db = sqlite3.connect(tmp_path / "state/archive/index.db")
    blob = bytearray(
        db.execute("SELECT data FROM blobs WHERE name=?", (f"msg-{ids[0]}",)).fetchone()[0]
    )
    blob[-5] ^= 0x01  # one bit of one stored message
    db.execute("UPDATE blobs SET data=? WHERE name=?", (bytes(blob), f"msg-{ids[0]}"))
    db.execute("DELETE FROM messages WHERE queue_id=?", (ids[1],))  # an index row
    db.execute("DELETE FROM blobs WHERE name=?", (f"msg-{ids[2]}",))  # a whole record
    db.commit()
    db.close()
    bad = await asyncio.to_thread(cli, tmp_path, "verify", "--json")
    assert bad.returncode == 1
    problems = {(p["record_id"], p["what"]) for p in json.loads(bad.stdout)["problems"]}
    assert problems == {
        (
            f"msg-{ids[0]}",
            f"its stored content: record msg-{ids[0]}: altered, or not this record's",
        ),
        (f"msg-{ids[1]}", "its index row is gone"),
        (f"msg-{ids[2]}", "its stored content is gone"),
    }
    text = await asyncio.to_thread(cli, tmp_path, "verify")
    assert f"PROBLEM msg-{ids[2]} (leaf " in text.stdout and "3 problem(s) found" in text.stdout


async def test_purge_is_a_dry_run_unless_told_holds_win_and_a_purge_is_not_tampering(
    gateway_factory, tmp_path
):
    gw = await gateway_factory({})
    old = [await accept(gw, ["a@dest.test"]) for _ in range(3)]
    await journaled(gw, 3)
    await gw.stop()
    db = sqlite3.connect(tmp_path / "state/archive/index.db")  # as if six years passed
    db.execute("UPDATE messages SET retain_until=?", (time.time() - 1,))
    db.commit()
    db.close()
    held = await asyncio.to_thread(cli, tmp_path, "hold", "case-7 Roe", old[1])
    assert held.returncode == 0 and "holds 1 message" in held.stdout
    dry = await asyncio.to_thread(cli, tmp_path, "purge")
    assert dry.returncode == 0 and "dry run" in dry.stdout
    assert sorted(
        line.split()[-1] for line in dry.stdout.splitlines() if line.startswith("would")
    ) == sorted([old[0], old[2]])
    assert (await asyncio.to_thread(cli, tmp_path, "show", old[0])).returncode == 0  # still there
    done = await asyncio.to_thread(cli, tmp_path, "purge", "--yes")
    assert "purged 2 message(s)" in done.stdout, done.stdout + done.stderr
    assert (await asyncio.to_thread(cli, tmp_path, "show", old[0])).returncode == 1
    assert (await asyncio.to_thread(cli, tmp_path, "show", old[1])).returncode == 0  # held
    verified = await asyncio.to_thread(cli, tmp_path, "verify")
    assert verified.returncode == 0, verified.stdout  # a lawful purge, recorded
    assert "2 purged under retention" in verified.stdout
    proof = await asyncio.to_thread(cli, tmp_path, "proof", old[0])
    assert "content purged under retention" in proof.stdout  # the evidence stays
    holds = await asyncio.to_thread(cli, tmp_path, "holds")
    assert "case-7 Roe: 1 message(s)" in holds.stdout


async def test_retention_rules_and_a_floor_that_can_be_raised_but_not_lowered(
    gateway_factory, tmp_path
):
    gw = await gateway_factory(
        {
            "archive.retention_rules": [
                {"recipient_domain": "partner.test", "days": 3650},
                {"sender": "cfo@clinic.test", "days": 4000},
            ]
        }
    )
    plain = await accept(gw, ["a@dest.test"])
    partner = await accept(gw, ["a@dest.test", "b@partner.test"])
    cfo = await accept(gw, ["b@partner.test"], sender="cfo@clinic.test")
    await journaled(gw, 3)
    await gw.stop()
    db = sqlite3.connect(tmp_path / "state/archive/index.db")
    days = {
        q: round((until - received) / 86400)
        for q, received, until in db.execute(
            "SELECT queue_id, received, retain_until FROM messages"
        )
    }
    db.close()
    assert days == {plain: 2192, partner: 3650, cfo: 4000}  # the longest rule wins

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["archive"]["retention_floor_days"] = 2500  # raised: accepted and recorded
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert (await asyncio.to_thread(cli, tmp_path, "search")).returncode == 0
    config["archive"]["retention_floor_days"] = 2200  # lowered: refused
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = await asyncio.to_thread(cli, tmp_path, "search")
    assert refused.returncode == 78
    assert "floor is 2500 days: a floor can be raised, never lowered" in refused.stderr


async def test_master_key_rotation_keeps_old_records_readable(gateway_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("2025", "2026"):
        (keys / name).write_text(os.urandom(32).hex())
    first = await gateway_factory(
        {"archive.master_keys": [{"id": "k2025", "file": str(keys / "2025")}]}
    )
    old = await accept(first, ["a@dest.test"], body="Sealed under 2025.\r\n")
    await journaled(first, 1)
    await first.stop()
    rotated = [
        {"id": "k2026", "file": str(keys / "2026")},
        {"id": "k2025", "file": str(keys / "2025")},
    ]
    second = await gateway_factory({"archive.master_keys": rotated})
    new = await accept(second, ["a@dest.test"], body="Sealed under 2026.\r\n")
    await journaled(second, 1)
    with archive_of(second) as archive:
        assert archive.blobs.get(f"msg-{old}")[5:10] == b"k2025"
        assert archive.blobs.get(f"msg-{new}")[5:10] == b"k2026"
    await second.stop()
    for queue_id, text in ((old, b"Sealed under 2025."), (new, b"Sealed under 2026.")):
        shown = await asyncio.to_thread(show, tmp_path, queue_id)
        assert shown.returncode == 0 and text in shown.stdout
    assert (await asyncio.to_thread(cli, tmp_path, "verify")).returncode == 0
    # without the old key its records cannot be read, and verify says which
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["archive"]["master_keys"] = rotated[:1]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    missing = await asyncio.to_thread(cli, tmp_path, "verify")
    assert missing.returncode == 1 and "master key 'k2025' is not configured" in missing.stdout


async def test_subject_search_only_when_subjects_are_indexed(gateway_factory, tmp_path):
    gw = await gateway_factory({"archive.index_subjects": True})
    async with smtp_client(gw) as client:
        await client.sendmail(
            "doctor@clinic.test",
            ["a@dest.test"],
            make_message("=?utf-8?q?Biopsy_r=C3=A9sultat?= for J. Roe", "Hello.\r\n"),
        )
        await client.sendmail("doctor@clinic.test", ["a@dest.test"], make_message("Lunch"))
    await journaled(gw, 2)
    found = await asyncio.to_thread(cli, tmp_path, "search", "--subject", "résultat", "--json")
    assert found.returncode == 0, found.stderr
    assert len(found.stdout.splitlines()) == 1  # the encoded word decoded and indexed
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["archive"]["index_subjects"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = await asyncio.to_thread(cli, tmp_path, "search", "--subject", "Lunch")
    assert refused.returncode == 1 and "subjects are not indexed" in refused.stderr


async def test_a_hold_by_search_covers_messages_that_arrive_later(gateway_factory, tmp_path):
    gw = await gateway_factory({"archive.checkpoint_interval": "1s"})
    first = await accept(gw, ["r@partner.test"])
    await journaled(gw, 1)
    held = await asyncio.to_thread(
        cli, tmp_path, "hold", "audit-2026", "--recipient", "@partner.test"
    )
    assert held.returncode == 0 and "holds 1 message" in held.stdout, held.stdout + held.stderr
    later = await accept(gw, ["s@partner.test"])
    other = await accept(gw, ["t@elsewhere.test"])
    await journaled(gw, 3)
    # checkpoints are signed on their own while the gateway runs
    reader = sqlite3.connect(tmp_path / "state/archive/index.db")

    def checkpointed() -> bool:
        (leaves,) = reader.execute("SELECT max(idx) FROM leaves").fetchone()
        (size,) = reader.execute("SELECT coalesce(max(size), 0) FROM checkpoints").fetchone()
        return size >= leaves

    await wait_until(checkpointed, what="a checkpoint of every record")
    reader.close()
    await gw.stop()
    db = sqlite3.connect(tmp_path / "state/archive/index.db")
    db.execute("UPDATE messages SET retain_until=?", (time.time() - 1,))
    db.commit()
    db.close()
    dry = await asyncio.to_thread(cli, tmp_path, "purge")
    would = {line.split()[-1] for line in dry.stdout.splitlines() if line.startswith("would")}
    assert would == {other}  # first and later are held by the case's search
    holds = await asyncio.to_thread(cli, tmp_path, "holds", "--json")
    (case,) = json.loads(holds.stdout)
    assert case["query"] == {"recipient": "@partner.test"} and case["messages"] == 2
    assert first != later


async def test_a_message_deleted_from_the_queue_stays_in_the_archive(gateway_factory, tmp_path):
    gw = await gateway_factory({})
    queue_id = await accept(gw, ["r@nowhere.test"])  # deferred: nothing listens
    await journaled(gw, 1)
    spooled = gw.spool.path_of(queue_id)
    await gw.stop()
    assert spooled.exists()
    db = sqlite3.connect(tmp_path / "state/archive/index.db")  # as if not journaled yet
    db.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,))
    db.execute("DELETE FROM blobs WHERE name=?", (f"msg-{queue_id}",))
    db.commit()
    deleted = await asyncio.to_thread(
        run_sealgate, "queue", "delete", queue_id, "--config", str(tmp_path / "config.yaml")
    )
    assert deleted.returncode == 0, deleted.stderr
    assert not spooled.exists()
    shown = await asyncio.to_thread(show, tmp_path, queue_id)
    assert shown.returncode == 0 and shown.stdout == make_message("Results", "Hello.\r\n")
    kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE queue_id=?", (queue_id,))]
    assert kinds[-2:] == ["queue-delete", "access"]  # the deletion, then the view
    db.close()


async def test_the_access_record_names_the_operating_system_user_not_a_free_string(
    gateway_factory, tmp_path
):
    import pwd

    gw = await gateway_factory({})
    await accept(gw, ["p@dest.test"])
    await journaled(gw, 1)
    me = pwd.getpwuid(os.getuid()).pw_name
    # $USER and $LOGNAME are anyone's to set: they are not who ran the command
    env = {
        **os.environ,
        "USER": "mallory",
        "LOGNAME": "mallory",
        "SUDO_USER": "alice",
        "SUDO_UID": "1000",
    }
    command = [
        sys.executable,
        "-m",
        "gateway",
        "archive",
        "search",
        "--sender",
        "doctor@clinic.test",
    ]
    config = ["--config", str(tmp_path / "config.yaml")]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, *config, "--actor", "case 12\x1b[2J"],
        env=env,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    plain = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    await asyncio.to_thread(subprocess.run, [*command, *config], env=plain, capture_output=True)
    access = cli(tmp_path, "access")
    assert access.returncode == 0, access.stderr
    lines = [line for line in access.stdout.splitlines() if "search" in line]
    assert len(lines) == 2
    assert any(f"  {me}@cli (sudo: alice) (note: case 12?[2J)  search" in line for line in lines)
    assert any(f"  {me}@cli  search" in line for line in lines)
    assert "mallory" not in access.stdout
