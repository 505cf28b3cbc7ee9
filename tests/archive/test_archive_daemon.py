"""The archive through the daemon: a relayed message is in it byte for byte with
its envelope (Bcc included) and every recipient's evidence; the compliance officer's
commands (search, proof, show, verify, export) work on it while the daemon runs, each
recorded in the access record; the export verifies with standard tools alone; a
message the archive lacks is journaled from the spool at start."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import subprocess
import sys
import threading
import time
import zipfile

from gateway.archive.journal import copy_name
from gateway.archive.query import Query
from gateway.archive.service import LINGER
from tests.conftest import make_message, queued, run_sealgate, smtp_client
from tests.support.archive import archive_of, refusing
from tests.support.delivery import BODY, SUBJECT, done, send, start
from tests.support.smime_pki import mailbox
from tests.support.world import wait_until


async def send_one(gw, rcpts) -> str:
    async with smtp_client(gw) as client:
        _, reply = await client.sendmail("doctor@clinic.test", rcpts, make_message(SUBJECT, BODY))
    return reply.rsplit(" ", 1)[1]


def openssl_verify(root) -> subprocess.CompletedProcess[str]:
    """Step 2 of the export's README: the checkpoint's signature, by openssl alone."""
    return subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "checkpoint-key.pem", "-rawin"]
        + ["-in", "checkpoint.body", "-sigfile", "checkpoint.sig"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )


def cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_sealgate(
        "archive", *args, "--config", str(tmp_path / "config.yaml"), "--actor", "auditor@clinic"
    )


async def test_a_relayed_message_is_archived_with_envelope_bcc_evidence_and_the_copy_sent(
    gateway_factory, world, pki, tmp_path
):
    good = await world.mta("mx.good.test", "127.0.0.81")  # verified TLS
    keyed = await world.mta("mx.keyed.test", "127.0.0.82", cert="self-signed")  # S/MIME
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    world.dns.add("keyed.test", "MX", "10 mx.keyed.test.")
    gw = await start(gateway_factory, world, pki)
    bob = mailbox("bob@keyed.test", n=8)
    cert, _ = bob.write(tmp_path, "bob")
    imported = await asyncio.to_thread(
        run_sealgate, "keys", "import", str(cert), "--state-dir", str(gw.config.state_dir)
    )
    assert imported.returncode == 0, imported.stderr
    # the message's To: names one recipient; the other two are envelope-only (Bcc)
    rcpts = ["a@good.test", "bcc@good.test", "bob@keyed.test"]
    queue_id = await send(gw, rcpts)
    await wait_until(lambda: done(gw, queue_id) and not queued(gw), what="delivered, spool empty")
    original = make_message(SUBJECT, BODY)

    found = await asyncio.to_thread(
        cli, tmp_path, "search", "--sender", "doctor@clinic.test", "--json"
    )
    assert found.returncode == 0, found.stderr
    (row,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert row["queue_id"] == queue_id and row["message_id"] == "<m1@clinic.test>"
    assert [(r["address"], r["state"], r["mode"]) for r in row["recipients"]] == [
        ("a@good.test", "delivered", "tls"),
        ("bcc@good.test", "delivered", "tls"),
        ("bob@keyed.test", "delivered", "smime"),
    ]
    shown = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "gateway",
            "archive",
            "show",
            queue_id,
            "--config",
            str(tmp_path / "config.yaml"),
        ],
        capture_output=True,
    )
    assert shown.returncode == 0 and shown.stdout == original  # byte for byte

    proof = await asyncio.to_thread(cli, tmp_path, "proof", queue_id, "--json")
    assert proof.returncode == 0, proof.stderr
    p = json.loads(proof.stdout)
    assert p["client"]["ip"] == "127.0.0.1" and p["client"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    by = {r["address"]: r for r in p["recipients"]}
    (attempt,) = by["bcc@good.test"]["history"]
    assert attempt["mx"] == "mx.good.test" and attempt["ip"] == "127.0.0.81"
    assert attempt["verification"] == "pkix" and attempt["reply"].startswith("250")
    assert attempt["mode"] == "tls" and attempt["reasons"]  # why the policy chose it
    assert attempt["peer_cert_sha256"] == hashlib.sha256(good.cert_der).hexdigest()
    assert attempt["tls_version"] == good.received[0].tls_version
    (sealed,) = by["bob@keyed.test"]["history"]
    assert sealed["mode"] == "smime" and sealed["key_fingerprint"]
    # the S/MIME copy is archived as sent, under the digest of what bob's server got
    (copy,) = keyed.received
    assert sealed["copy_sha256"] == hashlib.sha256(copy.data).hexdigest()
    assert [c["sha256"] for c in p["copies"]] == [sealed["copy_sha256"]]

    text = await asyncio.to_thread(cli, tmp_path, "proof", queue_id)
    assert "bcc@good.test: delivered 2.0.0 - mode tls" in text.stdout
    verified = await asyncio.to_thread(cli, tmp_path, "verify")
    assert verified.returncode == 0 and "archive OK" in verified.stdout, verified.stdout
    # the envelope as journaled: every recipient, the Bcc ones included
    with archive_of(gw) as archive:
        envelope, data = archive.message(queue_id)
        assert data == original and [r["address"] for r in envelope["recipients"]] == rcpts
        assert b"Biopsy" not in archive.blobs.get(f"msg-{queue_id}")  # sealed at rest

    access = await asyncio.to_thread(cli, tmp_path, "access", "--json")
    actions = [(e["actor"], e["action"]) for e in map(json.loads, access.stdout.splitlines())]
    me = f"{pwd.getpwuid(os.getuid()).pw_name}@cli"  # who ran it; --actor is a note beside it
    noted = f"{me} (note: auditor@clinic)"
    assert {(noted, a) for a in ("search", "proof", "verify")} <= set(actions)
    assert (me, "view") in actions  # 'show' without --actor
    metric = gw.metrics.registry.get_sample_value("sealgate_archive_journaled_messages_total")
    assert metric == 1


async def test_the_export_verifies_with_sha256sum_openssl_and_a_stdlib_script(
    gateway_factory, world, pki, tmp_path
):
    mta = await world.mta("mx.good.test", "127.0.0.83")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    gw = await start(gateway_factory, world, pki)
    ids = [await send_one(gw, [f"p{n}@good.test", "bcc@good.test"]) for n in range(3)]
    await wait_until(lambda: all(done(gw, q) for q in ids), what="delivered")
    await wait_until(lambda: not queued(gw), what="spool empty")
    out = tmp_path / "case.zip"
    made = await asyncio.to_thread(cli, tmp_path, "export", ids[0], ids[2], "--out", str(out))
    assert made.returncode == 0, made.stderr
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(out) as z:
        z.extractall(unpacked)
    root = unpacked / "sealgate-export"
    assert (root / f"messages/{ids[0]}.eml").read_bytes() == make_message(SUBJECT, BODY)
    assert not (root / f"messages/{ids[1]}.eml").exists()
    load = (root / "loadfile.csv").read_text().splitlines()
    assert len(load) == 1 + 4  # two recipients each, Bcc included
    assert (
        f"{ids[0]},".split(",")[0] in load[1]
        and "bcc@good.test" in (root / "loadfile.csv").read_text()
    )
    assert "pkix" in load[1] and mta.received[0].tls_version in load[1]

    def run(*cmd):
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=30)

    sums = run("sha256sum", "-c", "SHA256SUMS")
    assert sums.returncode == 0, sums.stdout + sums.stderr
    signed = openssl_verify(root)
    assert signed.returncode == 0 and "Signature Verified Successfully" in signed.stdout, signed
    checked = run("/usr/bin/python3", "-I", "verify.py")  # the system's Python, no Sealgate
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") >= 4  # two messages and their attempts
    assert "FAILED" not in checked.stdout

    # someone alters a message in the export and fixes the manifest: the proof fails
    eml = root / f"messages/{ids[2]}.eml"
    eml.write_bytes(eml.read_bytes().replace(b"margins", b"Margins"))
    manifest = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    )
    (root / "SHA256SUMS").write_text(manifest)
    assert run("sha256sum", "-c", "SHA256SUMS").returncode == 0
    checked = run("/usr/bin/python3", "-I", "verify.py")
    assert checked.returncode == 1 and f"msg-{ids[2]}: FAILED" in checked.stdout
    # a forged checkpoint: openssl refuses its signature
    body = root / "checkpoint.body"
    body.write_text(body.read_text() + "x")
    assert openssl_verify(root).returncode != 0


async def test_a_message_the_archive_lacks_is_journaled_from_the_spool_at_start(
    gateway_factory, tmp_path
):
    # A gateway that did not archive (as if it crashed before the journal committed)
    first = await gateway_factory({"archive.enabled": False})
    async with smtp_client(first) as client:
        await client.sendmail(
            "doctor@clinic.test", ["r@nowhere.test", "bcc@nowhere.test"], make_message()
        )
    (path,) = queued(first)
    await first.stop()
    second = await gateway_factory({})  # the same state directory, archive on
    with archive_of(second) as archive:
        assert archive.has(path.name)
        envelope, data = archive.message(path.name)
        assert data == make_message()
        addresses = [r["address"] for r in envelope["recipients"]]
        assert addresses == ["r@nowhere.test", "bcc@nowhere.test"]
        found = archive.search(Query(recipient="bcc@nowhere.test"))
        assert [m["queue_id"] for m in found] == [path.name]


async def test_a_failed_journal_keeps_the_spool_file_until_it_is_journaled(
    gateway_factory, world, pki
):
    mta = await world.mta("mx.good.test", "127.0.0.84")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    gw = await start(gateway_factory, world, pki)
    with refusing(gw, "messages"):
        queue_id = await send(gw, ["a@good.test"])
        await wait_until(lambda: done(gw, queue_id) and mta.received, what="delivered")
        await wait_until(lambda: gw.archive.has_failed(queue_id), what="the journal failed")
        await asyncio.sleep(0.3)
        assert [p.name for p in queued(gw)] == [queue_id]  # kept: not archived yet
        with archive_of(gw) as reader:
            assert not reader.has(queue_id)
        assert gw.metrics.registry.get_sample_value("sealgate_archive_errors_total") == 1
    await gw.archive.retry_failed()
    await wait_until(lambda: not queued(gw), what="the spool file removed once journaled")
    with archive_of(gw) as reader:
        assert reader.message(queue_id)[1] == make_message(SUBJECT, BODY)


async def test_a_message_whose_file_waits_for_the_archive_keeps_its_queue_history(
    gateway_factory, world, pki, monkeypatch
):
    """Its queue history outlives ``delivery.history_retention`` while its spool file
    does: forgotten, the next start would take the file for a new message and deliver
    it again."""
    import gateway.queue.manager as manager_module

    monkeypatch.setattr(manager_module, "PRUNE_INTERVAL", 0.2)
    mta = await world.mta("mx.good.test", "127.0.0.86")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    settings = {"delivery.history_retention": "1s"}
    gw = await start(gateway_factory, world, pki, **settings)
    first = await send(gw, ["a@good.test"])
    await wait_until(lambda: done(gw, first) and not queued(gw), what="the first one done")

    with refusing(gw, "messages"):
        second = await send(gw, ["b@good.test"])
        await wait_until(lambda: done(gw, second) and len(mta.received) == 2, what="delivered")
        finished = time.time()
        store, prunes = gw.queue.store, []
        real_prune = store.prune

        def prune(before, *args):
            pruned = real_prune(before, *args)
            prunes.append(before)
            return pruned

        monkeypatch.setattr(store, "prune", prune)
        await wait_until(lambda: prunes and prunes[-1] > finished + 1, what="a prune after")
        assert store.message(first) is None  # the prune works: a message done and gone
        assert store.message(second) is not None  # kept: its file waits for the archive
        assert [p.name for p in queued(gw)] == [second]
        await gw.stop()

    again = await start(gateway_factory, world, pki, **settings)  # the archive works
    await wait_until(lambda: not queued(again), what="the file removed once archived")
    with archive_of(again) as reader:
        assert reader.has(second)
    await asyncio.sleep(1.5)  # a retry round: nothing goes out
    assert sorted(m.rcpt_tos[0] for m in mta.received) == ["a@good.test", "b@good.test"]


async def test_content_a_node_stored_before_it_died_without_its_record_goes_at_restart(
    gateway_factory, tmp_path, monkeypatch
):
    """With content in files (or a bucket), a copy is stored before its record
    commits: a node killed in between left content the log never knew, which would
    have been 'a stored blob the log does not know' to every verification after."""
    settings = {"storage.blobs": "files", "cluster.node_id": "gw-1"}
    first = await gateway_factory(settings)
    archive = first.archive.archive
    copy = b"-----BEGIN PGP MESSAGE-----\r\nfor a@dest.test\r\n"

    def killed(*args):
        raise RuntimeError("kill -9")  # the content is stored, its record not committed

    def journal_and_die() -> None:
        monkeypatch.setattr(archive, "_append", killed)
        with contextlib.suppress(RuntimeError):
            archive.journal_copy("Q1", copy)
        monkeypatch.undo()

    await first.archive._run(journal_and_die)
    await first.stop()
    blob = first.config.state_dir / "archive" / "blobs" / copy_name(copy)
    assert blob.exists()
    with archive_of(first) as reader:
        report = reader.verify()
        assert report.ok and report.unfinished == 1, report.problems
    verified = await asyncio.to_thread(cli, tmp_path, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "1 stored content(s) whose record was not committed" in verified.stdout
    assert verified.stdout.rstrip().endswith("archive OK")

    second = await gateway_factory(settings)  # the node again, on the same state
    assert not blob.exists()
    with archive_of(second) as reader:
        report = reader.verify()
        assert report.ok and report.unfinished == 0, report.problems


async def test_the_queue_state_and_the_archive_index_are_written_on_one_thread(
    gateway_factory, world, pki
):
    """On SQLite one thread writes both (two threads beside the event loop, each
    waiting for the interpreter lock at every statement, cost more); the archive's
    last records are written at stop, after the queue stopped, and the thread ends
    with the daemon."""
    mta = await world.mta("mx.good.test", "127.0.0.85")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    gw = await start(gateway_factory, world, pki)
    stores = await gw.queue._db(threading.current_thread)
    assert await gw.archive._run(threading.current_thread) is stores
    assert stores is not threading.current_thread()
    queue_id = await send(gw, ["a@good.test"])
    await wait_until(lambda: done(gw, queue_id) and mta.received, what="delivered")
    await gw.stop()
    assert not stores.is_alive()
    with archive_of(gw) as reader:
        assert reader.has(queue_id)
        assert [
            e["body"]["recipients"][0]["state"] for e in reader.events(queue_id, ("attempt",))
        ] == ["delivered"]


async def test_under_load_the_archives_records_share_a_commit_for_longer_than_the_queues(
    gateway_factory, world, pki
):
    """Nothing on the mail path waits for a record (the spool keeps the message
    until its records are written), so under load the archive's batches gather the
    records of more turns of the event loop than the queue state's 5 ms: records
    issued 3 ms apart after a batch of two go in one commit (in the queue state's
    5 ms they would take two)."""
    gw = await start(gateway_factory, world, pki)
    archive = gw.archive
    await archive.settle()
    quick = 0.020  # within the archive's linger, well beyond the queue state's 5 ms
    assert quick < LINGER
    timely = 0  # rounds whose records were issued that quickly
    for _ in range(8):  # a machine too busy to keep 3 ms sleeps short: another round
        archive.access("q-load", "auditor@clinic", "view")
        archive.access("q-load", "auditor@clinic", "view")  # a batch of two: under load
        assert await archive.written("q-load")
        for _ in range(1000):  # its thread notes when it ended as it lets go
            if not archive._batcher.busy:
                break
            await asyncio.sleep(0.0005)
        ended, before = archive._batcher._ended, archive._batcher.batches
        for _ in range(3):
            archive.access("q-load", "auditor@clinic", "view")
            await asyncio.sleep(0.003)
        archive.access("q-load", "auditor@clinic", "view")
        issued_within = time.monotonic() - ended  # (the linger counts from there)
        assert await archive.written("q-load")
        if issued_within < quick:
            assert archive._batcher.batches - before == 1, f"issued within {issued_within:.3f} s"
            timely += 1
        if timely == 2:
            break
    assert timely, "the event loop never issued four records within the linger"
    with archive_of(gw) as reader:
        assert len(reader.events("q-load", ("access",))) % 6 == 0
