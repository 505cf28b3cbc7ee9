"""The sealgate command: queue inspection and the helper commands."""

from __future__ import annotations

import json

from gateway.smtp.auth import verify_password
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


def test_queue_show_of_an_unknown_id_fails_clearly(tmp_path):
    result = run_sealgate("queue", "show", "0000000000000000", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no message 0000000000000000 in the spool" in result.stderr
    bad = run_sealgate("queue", "show", "../../etc/passwd", "--state-dir", str(tmp_path))
    assert bad.returncode == 1 and "is not a queue id" in bad.stderr


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
