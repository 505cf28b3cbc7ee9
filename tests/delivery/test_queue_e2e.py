"""Through the daemon: accepted mail is routed, delivered over TLS, retried, bounced.

The gateway runs in-process with its resolver on the DNS fixture and its delivery
port on the recipient MTAs' port; the sender's own domain has a sink that receives
the delivery status notifications.
"""

from __future__ import annotations

import asyncio
import json

from gateway.delivery.dsn import original_message_id
from gateway.spool.store import SPILL_THRESHOLD
from tests.conftest import make_message, queued, run_sealgate, smtp_client
from tests.support.delivery import BODY, SUBJECT, depth, done, send, start, state
from tests.support.world import tls_only, wait_until


async def test_mixed_domains_each_get_their_copy_and_a_5xx_bounces_without_content(
    gateway_factory, world, pki
):
    dest = await world.mta(
        "mx.dest.test", "127.0.0.31", rcpt_replies={"gone@dest.test": "550 5.1.1 No such user"}
    )
    other = await world.mta("mx.other.test", "127.0.0.32")
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    for domain, mx in (
        ("dest.test", "mx.dest.test"),
        ("other.test", "mx.other.test"),
        ("clinic.test", "mx.clinic.test"),
    ):
        world.dns.add(domain, "MX", f"10 {mx}.")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["ok@dest.test", "gone@dest.test", "r@other.test"])

    await wait_until(lambda: sender_sink.received, what="DSN at the sender's server")
    assert [m.rcpt_tos for m in dest.received] == [["ok@dest.test"]]
    assert [m.rcpt_tos for m in other.received] == [["r@other.test"]]
    assert dest.received[0].tls_version in ("TLSv1.2", "TLSv1.3")
    delivered = dest.received[0].data
    assert delivered.startswith(b"Received: from client.test")
    assert delivered.endswith(make_message(SUBJECT, BODY))  # original bytes after our trace

    (dsn,) = sender_sink.received
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["doctor@clinic.test"]
    text = dsn.data.decode()
    assert "multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; gone@dest.test" in text and "Status: 5.1.1" in text
    assert "550 5.1.1 No such user" in text
    assert original_message_id(make_message()) in text
    assert SUBJECT not in text and "margins" not in text
    assert "ok@dest.test" not in text  # only failed recipients are reported

    assert state(gw, queue_id) == {
        "ok@dest.test": ("delivered", "2.0.0"),
        "gone@dest.test": ("bounced", "5.1.1"),
        "r@other.test": ("delivered", "2.0.0"),
    }
    await wait_until(
        lambda: not (gw.spool.queue_dir / queue_id).exists(), what="spool file removed when done"
    )


async def test_a_4xx_is_retried_on_schedule_and_then_delivered(gateway_factory, world, pki):
    dest = await world.mta("mx.dest.test", "127.0.0.31", data_replies=["451 4.3.0 Try again later"])
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: dest.received, what="delivery on retry")
    assert dest.attempts == 2
    # the server has the message a moment before the gateway has recorded its reply
    await wait_until(lambda: len(gw.queue.store.attempts(queue_id)) == 2, what="the record")
    attempts = gw.queue.store.attempts(queue_id)
    assert [(a["outcome"], a["status"]) for a in attempts] == [
        ("deferred", "4.3.0"),
        ("delivered", "2.0.0"),
    ]
    evidence = attempts[-1]["evidence"]
    assert evidence["mx_host"] == "mx.dest.test" and evidence["ip"] == "127.0.0.31"
    assert evidence["verification"] == "pkix" and len(evidence["peer_cert_sha256"]) == 64


async def test_no_starttls_means_no_plaintext_the_default_policy_holds_it_without_a_portal(
    gateway_factory, world, pki
):
    plain = await world.mta("mx.dest.test", "127.0.0.31", cert=None)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    # the embedded default policy decides the portal; with the portal off, it is held
    gw = await start(gateway_factory, world, pki, **{"portal.enabled": False})
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "held", what="held"
    )
    assert plain.received == [] and plain.attempts == 0
    (row,) = gw.queue.store.recipients(queue_id)
    assert row.status == "4.7.10"
    assert "decided portal, but the portal is not enabled (portal.enabled)" in row.diagnostic
    decision = gw.queue.store.decisions(queue_id)[0]
    assert (decision["mode"], decision["rule"]) == ("portal", "defaults")
    assert decision["reasons"][0].startswith("tls: level verify (defaults) not reached")
    assert decision["facts"]["mx"][0]["starttls"] is False
    assert (gw.spool.queue_dir / queue_id).exists()
    await wait_until(lambda: depth(gw, "held") == 1, what="queue depth gauge")
    listed = run_sealgate(
        "queue", "list", "--state", "held", "--state-dir", str(gw.config.state_dir)
    )
    assert (
        f"{queue_id}" in listed.stdout
        and "r@dest.test (held 4.7.10 portal by defaults)" in listed.stdout
    )
    shown = run_sealgate("queue", "show", queue_id, "--state-dir", str(gw.config.state_dir))
    assert (
        "  decision     portal (rule defaults), tls level may (opportunistic), fallback portal, "
        "policy default.yaml@"
    ) in shown.stdout
    assert "  why          smime: no S/MIME certificate known" in shown.stdout


async def test_a_tls_only_policy_holds_and_retries_and_never_sends_plaintext(
    gateway_factory, world, pki
):
    plain = await world.mta("mx.dest.test", "127.0.0.31", cert=None)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(
        gateway_factory, world, pki, tls_only("verify"), **{"probe.negative_ttl": "1s"}
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: len(gw.queue.store.attempts(queue_id)) >= 2, what="decided again at the retry"
    )
    assert plain.received == [] and plain.attempts == 0
    assert state(gw, queue_id) == {"r@dest.test": ("held", "4.7.10")}
    assert gw.queue.store.decisions(queue_id)[0]["mode"] == "hold"


async def test_a_policy_rule_lowers_the_level_for_one_domain(gateway_factory, world, pki):
    plain = await world.mta("mx.legacy.test", "127.0.0.31", cert=None)
    world.dns.add("legacy.test", "MX", "10 mx.legacy.test.")
    rule = (
        "  - name: legacy-lab\n    when: {recipient_domain: legacy.test}\n"
        "    then: {modes: [tls], tls_level: may}\n    stop: true\n"
    )
    gw = await start(gateway_factory, world, pki, tls_only("verify", rules=rule))
    queue_id = await send(gw, ["r@legacy.test"])
    await wait_until(lambda: plain.received, what="plaintext delivery allowed by the rule")
    await wait_until(lambda: done(gw, queue_id), what="done")
    (attempt,) = gw.queue.store.attempts(queue_id)
    assert attempt["evidence"]["decision"] == {
        "mode": "tls",
        "rule": "legacy-lab",
        "tls_level": "may",
        "level_source": "rule legacy-lab",
        "policy": attempt["evidence"]["decision"]["policy"],
    }


async def test_null_mx_bounces_at_once(gateway_factory, world, pki):
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    world.dns.add("nomail.test", "MX", "0 .")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["r@nomail.test"])
    await wait_until(lambda: sender_sink.received, what="DSN for the null MX")
    assert "Status: 5.1.10" in sender_sink.received[0].data.decode()
    assert state(gw, queue_id) == {"r@nomail.test": ("bounced", "5.1.10")}


async def test_a_bounce_is_never_bounced(gateway_factory, world, pki):
    world.dns.add("nomail.test", "MX", "0 .")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["r@nomail.test"], sender="")
    await wait_until(lambda: done(gw, queue_id), what="done")
    assert gw.queue.store.message(queue_id)["dsn_sent"] == 0
    assert queued(gw) == []  # no DSN was spooled


async def test_expired_recipients_fail_with_4_4_7_and_a_dsn(gateway_factory, world, pki):
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    world.dns.add("dest.test", "MX", "10 down.dest.test.")
    world.dns.add("down.dest.test", "A", "127.0.0.34")  # nothing listens
    gw = await start(gateway_factory, world, pki, **{"delivery.max_queue_lifetime": "2s"})
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: sender_sink.received, what="DSN after expiry")
    text = sender_sink.received[0].data.decode()
    assert "Status: 4.4.7" in text and "delivery time expired" in text
    assert state(gw, queue_id)["r@dest.test"][0] == "expired"


async def test_queue_show_reports_each_recipient_and_its_evidence(gateway_factory, world, pki):
    dest = await world.mta("mx.dest.test", "127.0.0.31")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: dest.received, what="delivery")
    await wait_until(lambda: done(gw, queue_id), what="done")
    shown = run_sealgate(
        "queue", "show", queue_id, "--json", "--state-dir", str(gw.config.state_dir)
    )
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    (rcpt,) = info["recipients"]
    assert (rcpt["address"], rcpt["state"], rcpt["status"]) == ("r@dest.test", "delivered", "2.0.0")
    (attempt,) = info["attempts"]
    assert attempt["evidence"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    # the spool gauges follow the removal of a finished message (done in the
    # background, just after the message is marked done)
    await wait_until(
        lambda: "sealgate_spool_messages 0.0" in gw.render_metrics().decode().splitlines(),
        what="spool gauge after the removal",
    )
    lines = gw.render_metrics().decode().splitlines()
    assert "sealgate_spool_messages 0.0" in lines and "sealgate_spool_bytes 0.0" in lines
    version = attempt["evidence"]["tls_version"]
    assert (
        "sealgate_delivery_attempts_total"
        f'{{outcome="delivered",tls_level="verify",tls_version="{version}"}} 1.0'
    ) in lines
    assert 'sealgate_queue_time_seconds_count{outcome="delivered"} 1.0' in lines
    assert 'sealgate_delivery_connections_total{kind="new"} 1.0' in lines


async def test_hold_release_retry_and_delete_are_obeyed_and_audited(gateway_factory, world, pki):
    dest = await world.mta("mx.dest.test", "127.0.0.31", data_replies=["451 4.3.0 Not now"])
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    gw = await start(gateway_factory, world, pki, **{"delivery.retry_schedule": ["1h"]})
    state_dir = str(gw.config.state_dir)
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: dest.attempts == 1, what="first attempt")
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "deferred", what="deferred"
    )
    await wait_until(lambda: depth(gw, "deferred") == 1, what="queue depth gauge")

    held = run_sealgate("queue", "hold", queue_id, "--state-dir", state_dir)
    assert held.returncode == 0, held.stderr
    await wait_until(lambda: (depth(gw, "hold"), depth(gw, "deferred")) == (1, 0), what="held")
    listed = run_sealgate("queue", "list", "--state", "hold", "--json", "--state-dir", state_dir)
    assert [json.loads(line)["queue_id"] for line in listed.stdout.splitlines()] == [queue_id]
    assert run_sealgate("queue", "retry", queue_id, "--state-dir", state_dir).returncode == 0
    import asyncio

    await asyncio.sleep(2.5)  # the scheduler polls every second: held means no attempt
    assert dest.attempts == 1
    assert run_sealgate("queue", "release", queue_id, "--state-dir", state_dir).returncode == 0
    await wait_until(lambda: dest.received, what="delivery after release and retry")

    actions = [a["action"] for a in gw.queue.store.audit(queue_id)]
    assert actions == ["hold", "retry", "release"]
    gone = run_sealgate("queue", "delete", "0000000000000000", "--state-dir", state_dir)
    assert gone.returncode == 1 and "no message 0000000000000000" in gone.stderr


async def test_delete_removes_a_deferred_message_without_a_dsn(gateway_factory, world, pki):
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    world.dns.add("dest.test", "MX", "10 down.dest.test.")
    world.dns.add("down.dest.test", "A", "127.0.0.34")
    gw = await start(gateway_factory, world, pki, **{"delivery.retry_schedule": ["1h"]})
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(
        lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "deferred", what="deferred"
    )
    deleted = run_sealgate("queue", "delete", queue_id, "--state-dir", str(gw.config.state_dir))
    assert deleted.returncode == 0, deleted.stderr
    assert queued(gw) == []
    assert state(gw, queue_id)["r@dest.test"][0] == "deleted"
    assert [a["action"] for a in gw.queue.store.audit(queue_id)] == ["delete"]
    assert sender_sink.received == []


async def test_a_destination_no_host_of_which_answers_waits_without_an_attempt_per_message(
    gateway_factory, world, pki
):
    """As Postfix's queue manager treats a dead site: after an attempt that reached
    no host, the destination's other recipients wait for the next try instead of
    each trying (and holding delivery places others need); when it answers again,
    they all go."""
    connections = 0

    def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()  # no greeting: a connection that fails

    dead = await asyncio.start_server(hang_up, "127.0.0.31", world.port)
    world.dns.add("mx.dest.test", "A", "127.0.0.31")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    await world.mta("mx.other.test", "127.0.0.32")
    world.dns.add("other.test", "MX", "10 mx.other.test.")
    gw = await start(gateway_factory, world, pki, **{"delivery.retry_schedule": ["4s"]})

    async def submit(rcpt: str) -> str:
        async with smtp_client(gw) as client:
            _, reply = await client.sendmail("doctor@clinic.test", [rcpt], make_message())
        return reply.rsplit(" ", 1)[1]

    first = await submit("r0@dest.test")
    await wait_until(
        lambda: state(gw, first).get("r0@dest.test", ("",))[0] == "deferred", what="deferred"
    )
    tried = connections  # the probe's and the attempt's
    later = [await submit(f"r{i}@dest.test") for i in range(1, 6)]
    other = await submit("r@other.test")
    await wait_until(lambda: done(gw, other), what="the other destination's mail")
    await wait_until(
        lambda: all(
            state(gw, q).get(f"r{i}@dest.test", ("",))[0] == "deferred"
            for i, q in enumerate(later, 1)
        ),
        what="the later ones deferred",
    )
    assert connections == tried  # not one connection each
    row = gw.queue.store.recipients(later[0])[0]
    assert (row.status, row.attempts) == ("4.4.1", 0)
    assert row.diagnostic.startswith("delivery temporarily suspended: connect to mx.dest.test")
    assert gw.queue.store.attempts(later[0]) == []  # no attempt recorded
    assert "sealgate_delivery_destinations_suspended 1.0" in gw.metrics.render().decode()
    listed = run_sealgate("queue", "list", "--json", "--state-dir", str(gw.config.state_dir))
    states = [json.loads(line)["recipients"][0]["state"] for line in listed.stdout.splitlines()]
    assert states == ["deferred"] * 6

    dead.close()
    await dead.wait_closed()
    back = await world.mta("mx.dest.test", "127.0.0.31")
    await wait_until(lambda: len(back.received) == 6, timeout=30, what="every one delivered")
    await wait_until(lambda: all(done(gw, q) for q in [first, *later]), what="all done")
    assert connections <= tried + 1  # at most a try that found it still dead
    assert "sealgate_delivery_destinations_suspended 0.0" in gw.metrics.render().decode()


async def test_a_sender_is_told_once_when_delivery_is_delayed(gateway_factory, world, pki):
    """delivery.delay_warning: after it, the sender gets one report (RFC 3464 Action:
    delayed, Will-Retry-Until) naming only the recipients still waiting, without the
    message's subject or body - and no second one, however long it keeps waiting."""
    slow = await world.mta("mx.slow.test", "127.0.0.34", data_reply="451 4.4.1 Come back later")
    fine = await world.mta("mx.fine.test", "127.0.0.35")
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    for domain in ("slow.test", "fine.test", "clinic.test"):
        world.dns.add(domain, "MX", f"10 mx.{domain}.")
    gw = await start(gateway_factory, world, pki, **{"delivery.delay_warning": "2s"})
    queue_id = await send(gw, ["a@slow.test", "b@fine.test"])
    await wait_until(lambda: sender_sink.received, timeout=20, what="the delay warning")
    (dsn,) = sender_sink.received
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["doctor@clinic.test"]
    text = dsn.data.decode()
    assert "Subject: Delayed Mail (still being retried)" in text
    assert "multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; a@slow.test" in text and "Action: delayed" in text
    assert "Status: 4.4.1" in text and "451 4.4.1 Come back later" in text
    assert "Will-Retry-Until: " in text and "b@fine.test" not in text
    assert SUBJECT not in text and "margins" not in text
    assert fine.received and slow.attempts >= 1
    assert (
        gw.metrics.registry.get_sample_value("sealgate_dsn_sent_total", {"action": "delayed"}) == 1
    )
    attempts = slow.attempts
    await wait_until(lambda: slow.attempts >= attempts + 3, timeout=30, what="more retries")
    assert len(sender_sink.received) == 1  # once
    assert state(gw, queue_id)["a@slow.test"][0] == "deferred"


async def sender_and_dest_routes(world):
    """The sender's own server (it receives the reports) and MX records for it and
    for dest.test (whose server the test makes)."""
    sink = await world.mta("mx.clinic.test", "127.0.0.33")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    return sink


async def dsn_send(gw, sender, rcpts: dict[str, list[str]], mail_options=()):
    """A message with DSN parameters: each recipient with its own options."""
    async with smtp_client(gw) as client:
        await client.mail(sender, options=list(mail_options))
        for rcpt, options in rcpts.items():
            await client.rcpt(rcpt, options=options)
        await client.data(make_message(SUBJECT, BODY))
    (path,) = queued(gw)
    return path.name


async def test_notify_never_silences_a_failure_and_envid_and_orcpt_come_back(
    gateway_factory, world, pki
):
    """RFC 3461 honoured: a bounced recipient with NOTIFY=NEVER is not reported; the
    other bounced one is, with the sender's ENVID (as given) and its ORCPT."""
    dest = await world.mta(
        "mx.dest.test",
        "127.0.0.31",
        rcpt_replies={
            "quiet@dest.test": "550 5.1.1 No such user",
            "loud@dest.test": "550 5.1.1 No such user",
        },
    )
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(gateway_factory, world, pki)
    queue_id = await dsn_send(
        gw,
        "doctor@clinic.test",
        {
            "quiet@dest.test": ["NOTIFY=NEVER"],
            "loud@dest.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;Loud+2BAlias@Dest.test"],
            "ok@dest.test": ["NOTIFY=FAILURE,DELAY"],
        },
        mail_options=["RET=HDRS", "ENVID=Batch-42+2Bx"],
    )
    await wait_until(lambda: sender_sink.received, what="the DSN")
    await wait_until(lambda: done(gw, queue_id), what="the message finished")
    (dsn,) = sender_sink.received
    text = dsn.data.decode()
    assert "Final-Recipient: rfc822; loud@dest.test" in text
    assert "Original-Recipient: rfc822; Loud+Alias@Dest.test" in text
    assert "Original-Envelope-Id: Batch-42+2Bx" in text
    assert "quiet@dest.test" not in text and "ok@dest.test" not in text
    assert [m.rcpt_tos for m in dest.received] == [["ok@dest.test"]]


async def test_notify_success_gets_a_relayed_report_and_never_a_second(gateway_factory, world, pki):
    dest = await world.mta("mx.dest.test", "127.0.0.31")
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(gateway_factory, world, pki)
    await dsn_send(
        gw,
        "doctor@clinic.test",
        {"told@dest.test": ["NOTIFY=SUCCESS"], "untold@dest.test": []},
        mail_options=["ENVID=run-7"],
    )
    await wait_until(lambda: sender_sink.received, what="the success report")
    (report,) = sender_sink.received
    assert report.mail_from == "" and report.rcpt_tos == ["doctor@clinic.test"]
    text = report.data.decode()
    assert "Subject: Successful Mail Delivery Report" in text
    assert "Final-Recipient: rfc822; told@dest.test" in text and "Action: relayed" in text
    assert "Status: 2.0.0" in text and "Remote-MTA: dns; mx.dest.test" in text
    assert "Original-Envelope-Id: run-7" in text
    assert "untold@dest.test" not in text and SUBJECT not in text
    assert (
        gw.metrics.registry.get_sample_value("sealgate_dsn_sent_total", {"action": "success"}) == 1
    )
    assert sorted(r for m in dest.received for r in m.rcpt_tos) == [
        "told@dest.test",
        "untold@dest.test",
    ]


async def test_the_sender_is_told_once_when_a_recipient_is_held(gateway_factory, world, pki):
    """notify.sender_on: [held] - a short notice, without the subject or body, saying
    which recipient waits and why; not again while it stays held."""
    await world.mta("mx.dest.test", "127.0.0.31", cert=None)  # no STARTTLS
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(
        gateway_factory, world, pki, **{"portal.enabled": False, "notify.sender_on": ["held"]}
    )
    queue_id = await send(gw, ["r@dest.test"])
    await wait_until(lambda: sender_sink.received, what="the notice")
    (notice,) = sender_sink.received
    assert notice.mail_from == "" and notice.rcpt_tos == ["doctor@clinic.test"]
    text = notice.data.decode()
    assert "Subject: Held: your message is not sent yet" in text
    assert "Your message to <r@dest.test> is held" in text
    assert "Why: tls: level verify (defaults) not reached" in text
    assert f"sealgate queue show {queue_id}" in text
    assert SUBJECT not in text and "margins" not in text
    rounds = len(gw.queue.store.attempts(queue_id))
    await wait_until(
        lambda: len(gw.queue.store.attempts(queue_id)) > rounds, timeout=20, what="decided again"
    )
    assert len(sender_sink.received) == 1 and state(gw, queue_id)["r@dest.test"][0] == "held"


async def test_the_sender_is_told_when_a_recipient_gets_the_portal(gateway_factory, world, pki):
    plain = await world.mta("mx.dest.test", "127.0.0.31", cert=None)
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(gateway_factory, world, pki, **{"notify.sender_on": ["portal"]})
    await send(gw, ["r@dest.test"])
    await wait_until(lambda: sender_sink.received, what="the notice")
    await wait_until(lambda: plain.received, what="the portal notification")
    (notice,) = sender_sink.received
    text = notice.data.decode()
    assert "Subject: Sent via the secure portal" in text
    assert "Your message to <r@dest.test> was placed in the secure portal" in text
    assert SUBJECT not in text and "margins" not in text
    assert SUBJECT not in plain.received[0].data.decode()  # the notification neither


async def test_dsn_parameters_are_passed_on_to_a_server_that_offers_dsn(
    gateway_factory, world, pki
):
    """RFC 3461 6.2.1: relaying to a DSN-capable server, RET and ENVID go on MAIL and
    each recipient's NOTIFY and ORCPT on its RCPT - and that server, not Sealgate,
    reports the success it was asked for."""
    dest = await world.mta("mx.dest.test", "127.0.0.31", dsn=True)
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(gateway_factory, world, pki)
    queue_id = await dsn_send(
        gw,
        "doctor@clinic.test",
        {"told@dest.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;Told@Dest.test"]},
        mail_options=["RET=HDRS", "ENVID=run-8"],
    )
    await wait_until(lambda: done(gw, queue_id), what="delivered")
    (received,) = dest.received
    assert received.dsn == [
        "RET=HDRS",
        "ENVID=run-8",
        "NOTIFY=SUCCESS",
        "ORCPT=rfc822;Told@Dest.test",
    ]
    (attempt,) = gw.queue.store.attempts(queue_id)
    assert attempt["evidence"]["dsn_passed_on"] is True
    await asyncio.sleep(1)
    assert sender_sink.received == []  # dest reports it


async def test_notify_success_into_the_portal_is_reported_delivered(gateway_factory, world, pki):
    await world.mta("mx.dest.test", "127.0.0.31", cert=None)  # no STARTTLS: the portal
    sender_sink = await sender_and_dest_routes(world)
    gw = await start(gateway_factory, world, pki)
    await dsn_send(gw, "doctor@clinic.test", {"r@dest.test": ["NOTIFY=SUCCESS"]})
    await wait_until(lambda: sender_sink.received, what="the success report")
    (report,) = sender_sink.received
    text = report.data.decode()
    assert "Final-Recipient: rfc822; r@dest.test" in text and "Action: delivered" in text
    assert "Remote-MTA" not in text and SUBJECT not in text


async def test_attempts_under_way_for_one_large_message_share_one_reading_of_it(
    gateway_factory, world, pki, monkeypatch
):
    servers = []
    for n in range(4):
        servers.append(await world.mta(f"mx.d{n}.test", f"127.0.0.{40 + n}", data_delay=0.5))
        world.dns.add(f"d{n}.test", "MX", f"10 mx.d{n}.test.")
    gw = await start(gateway_factory, world, pki)
    reads: list[str] = []
    read = gw.spool.read

    def counted(queue_id, verify=True):
        reads.append(queue_id)
        return read(queue_id, verify)

    monkeypatch.setattr(gw.spool, "read", counted)
    # larger than a message kept in memory from its arrival: read from the spool
    body = ("x" * 76 + "\r\n") * (SPILL_THRESHOLD // 78 + 100)
    async with smtp_client(gw) as client:
        await client.sendmail(
            "doctor@clinic.test", [f"r@d{n}.test" for n in range(4)], make_message(SUBJECT, body)
        )
    (path,) = queued(gw)
    await wait_until(lambda: all(s.received for s in servers), what="four deliveries")
    # the archive's journal reads it once; the four attempts at once, once between them
    assert reads == [path.name] * 2
    assert all(s.received[0].data.endswith(make_message(SUBJECT, body)) for s in servers)


async def test_replies_that_are_not_utf8_are_recorded_escaped_and_sent_once(
    gateway_factory, world, pki
):
    # Latin-1 in a reply (an old server's own language) or any bytes that are not
    # UTF-8: the record keeps them escaped - once they made the record fail, and the
    # delivered message went out again at every retry
    dest = await world.mta(
        "mx.dest.test",
        "127.0.0.31",
        rcpt_replies={"gone@dest.test": b"550 5.1.1 Benutzer unbekannt: gel\xf6scht"},
        data_reply=b"250 2.0.0 Ok: re\xe7u \xff \x00",  # and NUL: PostgreSQL's text has none
    )
    sender_sink = await world.mta("mx.clinic.test", "127.0.0.33")
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    gw = await start(gateway_factory, world, pki)
    queue_id = await send(gw, ["r@dest.test", "gone@dest.test"])
    await wait_until(
        lambda: not (gw.spool.queue_dir / queue_id).exists(),
        what="the message done, its archive records written",
    )
    await wait_until(lambda: sender_sink.received, what="the DSN")
    await asyncio.sleep(1.5)  # the retry schedule's step: nothing goes out again
    assert dest.attempts == 1 and [m.rcpt_tos for m in dest.received] == [["r@dest.test"]]
    assert state(gw, queue_id) == {
        "r@dest.test": ("delivered", "2.0.0"),
        "gone@dest.test": ("bounced", "5.1.1"),
    }
    said = {r.address: r.diagnostic for r in gw.queue.store.recipients(queue_id)}
    assert said == {
        "r@dest.test": "250 2.0.0 Ok: re\\xe7u \\xff \\x00",
        "gone@dest.test": "550 5.1.1 Benutzer unbekannt: gel\\xf6scht",
    }
    (attempt,) = [e for e in gw.archive.archive.events(queue_id) if e["kind"] == "attempt"]
    recorded = {r["address"]: r["diagnostic"] for r in attempt["body"]["recipients"]}
    assert recorded == said
    (dsn,) = sender_sink.received
    assert "550 5.1.1 Benutzer unbekannt: gel\\xf6scht" in dsn.data.decode()


async def test_a_greeting_that_is_not_utf8_is_a_failure_recorded_like_any_other(
    gateway_factory, world, pki
):
    # the reply reaches the record through aiosmtplib's exception, not a reply
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 Zugang verweigert f\xfcr Sie\r\n")
        await writer.drain()
        await reader.read(1000)  # QUIT, or the end
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.31", world.port)
    world.dns.add("dest.test", "MX", "10 mx.dest.test.")
    world.dns.add("mx.dest.test", "A", "127.0.0.31")
    try:
        gw = await start(gateway_factory, world, pki)
        queue_id = await send(gw, ["r@dest.test"])
        await wait_until(
            lambda: state(gw, queue_id).get("r@dest.test", ("",))[0] == "deferred",
            what="the failure recorded",
        )
        (row,) = gw.queue.store.recipients(queue_id)
        assert row.diagnostic == (
            f"connect to mx.dest.test[127.0.0.31]:{world.port} failed: "
            "554 5.7.1 Zugang verweigert f\\xfcr Sie"
        )
    finally:
        server.close()
        await server.wait_closed()
