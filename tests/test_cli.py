"""The sealgate command: queue inspection and the helper commands."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.layout import StateLayout
from gateway.model import ClientInfo, Envelope, Recipient, RecipientState
from gateway.queue.store import AttemptRecord, QueueStore
from gateway.smtp.auth import verify_password
from gateway.spool import Spool, new_queue_id
from tests.conftest import make_message, queued, run_sealgate, smtp_client


async def test_queue_list_and_show_read_the_spool(gateway_factory):
    gw = await gateway_factory()
    async with smtp_client(gw) as client:
        await client.sendmail(
            "s@clinic.test",
            ["a@example.test", "b@example.test"],
            make_message(subject="Lab results for J. Doe"),
        )
        await client.sendmail("", ["c@example.test"], make_message())
    state = str(gw.config.state_dir)
    listed = run_sealgate("queue", "list", "--json", "--state-dir", state)
    assert listed.returncode == 0, listed.stderr
    items = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [i["queue_id"] for i in items] == [p.name for p in queued(gw)]
    assert [r["address"] for r in items[0]["recipients"]] == ["a@example.test", "b@example.test"]
    assert items[1]["mail_from"] == ""  # the null sender of a bounce

    human = run_sealgate("queue", "list", "--state-dir", state)
    assert "-- 2 messages in the queue" in human.stdout

    shown = run_sealgate("queue", "show", items[0]["queue_id"], "--json", "--state-dir", state)
    env = json.loads(shown.stdout)
    assert env["client"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert [r["address"] for r in env["recipients"]] == ["a@example.test", "b@example.test"]
    text = run_sealgate("queue", "show", items[0]["queue_id"], "--state-dir", state).stdout
    assert "integrity      sha256 verified" in text
    # queue inspection shows the envelope, never the content
    assert "Lab results" not in text and "Lab results" not in shown.stdout


async def test_queue_list_adds_what_is_only_spooled_and_leaves_out_what_is_done(tmp_path):
    """Beside the store's open messages (their recipients in order, with their
    states), `queue list` shows a message that is only spooled - accepted a moment
    ago, or before a crash: recorded at the next start - with every recipient
    pending, and not one whose file outlived its finish (on its way out)."""
    state = tmp_path / "state"
    spool = Spool(StateLayout(state).spool)
    spool.open()
    envelopes = []
    for addresses in (["a@x.test", "b@y.test"], ["c@x.test"], ["d@z.test"]):
        writer = spool.writer(new_queue_id())
        await writer.write(make_message())
        envelopes.append(
            await writer.commit(
                lambda size, sha, w=writer, a=addresses: Envelope(
                    queue_id=w.queue_id,
                    received_at="2026-11-01T07:00:00+00:00",
                    mail_from="s@clinic.test",
                    mail_options=(),
                    recipients=tuple(Recipient(r) for r in a),
                    client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
                    size=size,
                    sha256=sha,
                )
            )
        )
    spool.close()
    opened, done, spooled = envelopes
    store = QueueStore(state / "queue.db")
    assert store.add(opened, now=100) and store.add(done, now=100)
    deferred = RecipientState.DEFERRED
    store.record(
        opened.queue_id, [AttemptRecord(1, deferred, "4.4.1", "down", None, 300, "deferred")]
    )
    store.finish(done.queue_id, dsn_sent=False)
    store.close()

    listed = run_sealgate("queue", "list", "--json", "--state-dir", str(state))
    assert listed.returncode == 0, listed.stderr
    items = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [i["queue_id"] for i in items] == [opened.queue_id, spooled.queue_id]
    assert [(r["address"], r["state"], r["status"]) for r in items[0]["recipients"]] == [
        ("a@x.test", "pending", ""),
        ("b@y.test", "deferred", "4.4.1"),
    ]
    assert [(r["address"], r["state"]) for r in items[1]["recipients"]] == [("d@z.test", "pending")]
    assert [i["age_seconds"] >= 0 and i["size"] == opened.size for i in items] == [True, True]
    human = run_sealgate("queue", "list", "--state-dir", str(state)).stdout
    assert "b@y.test (deferred 4.4.1)" in human and "-- 2 messages in the queue" in human


def test_queue_show_of_an_unknown_id_fails_clearly(tmp_path):
    result = run_sealgate("queue", "show", "0000000000000000", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no message 0000000000000000 in the spool" in result.stderr
    bad = run_sealgate("queue", "show", "../../etc/passwd", "--state-dir", str(tmp_path))
    assert bad.returncode == 1 and "is not a queue id" in bad.stderr


def test_help_says_what_sealgate_is_and_lists_every_command():
    result = run_sealgate("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps to the terminal's width
    assert "Sealgate, an encrypting SMTP relay gateway" in text
    assert "'sealgate COMMAND --help' describes each command" in text
    assert "``" not in text  # no docstring markup
    commands = (
        "run check-config explain keys queue archive portal storage cluster tlsrpt webhooks "
        "api console hash-password hash-address"
    )
    for command in commands.split():
        assert f" {command} " in text, command


def test_hash_password_output_verifies():
    result = run_sealgate("hash-password", stdin="s3cret pass\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("$scrypt$")
    assert verify_password(b"s3cret pass", encoded)
    assert not verify_password(b"s3cret", encoded)


async def test_hash_address_matches_what_the_logs_show(gateway_factory):
    from structlog.testing import capture_logs

    gw = await gateway_factory({"logging.addresses": "hash"})
    with capture_logs() as logs:
        async with smtp_client(gw) as client:
            await client.sendmail("s@clinic.test", ["Patient@Example.test"], make_message())
    (accepted,) = [e for e in logs if e["event"] == "smtp.message-accepted"]
    result = run_sealgate(
        "hash-address", "patient@example.test", "--state-dir", str(gw.config.state_dir)
    )
    assert result.returncode == 0, result.stderr
    assert accepted["rcpt"] == [result.stdout.strip()]
    assert "example.test" not in json.dumps(accepted)


def test_commands_find_the_configuration_as_postfix_tools_find_main_cf(
    tmp_path, monkeypatch, capsys
):
    import os

    from gateway import cli

    config = tmp_path / "gw.yaml"
    config.write_text(f"state_dir: {tmp_path}/from-env\n")
    env = {**os.environ, "SEALGATE_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"sealgate: configuration: {config}" in done.stderr
    assert f"{config}: configuration OK" in done.stdout
    # --config wins, and then nothing is said about where it came from
    other = tmp_path / "other.yaml"
    other.write_text(f"state_dir: {tmp_path}/other\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(other)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert f"{other}: configuration OK" in done.stdout and "configuration:" not in done.stderr
    # no variable: the system file when it exists, else the embedded defaults
    monkeypatch.delenv("SEALGATE_CONFIG", raising=False)
    system = tmp_path / "etc-sealgate.yaml"
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", system)
    assert cli.main(["check-config"]) == 0
    assert "sealgate: configuration: the embedded defaults" in capsys.readouterr().err
    system.write_text(f"state_dir: {tmp_path}/system\n")
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr()
    assert (
        f"sealgate: configuration: {system}" in out.err and f"{system}: configuration OK" in out.out
    )
