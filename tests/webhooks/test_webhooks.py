"""Webhooks end to end: a receiver on loopback verifies every event's signature with
the Standard Webhooks library; while it is down the events wait in the outbox and are
retried; once it is up every event arrives, each message's in order; a tampered
payload fails verification; the events carry ids, recipients, status and mode, never
the subject or the body; an endpoint gets only the events it asked for, and one that
does not answer does not hold up the others; events survive a restart; one never
taken is dropped after webhooks.max_age, with a record."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from gateway.observability.metrics import Metrics
from gateway.probe.dns import Resolver
from gateway.storage.database import Database
from gateway.webhooks import dispatcher as module
from gateway.webhooks.events import new_secret
from gateway.webhooks.outbox import Outbox
from tests.conftest import free_port, leaf_files, load_test_config, run_sealgate, write_config
from tests.support.delivery import BODY, SUBJECT, send, state
from tests.support.https import SilentServer
from tests.support.webhooks import Receiver, read_request
from tests.support.world import wait_until


@pytest.fixture
async def receivers():
    started: list[Receiver] = []
    yield started
    for r in started:
        await r.stop()


def receiver(world, pki, tmp_path, receivers) -> Receiver:
    leaf = pki.ca.issue_cert("hooks.ehr.test")
    chain, key = leaf_files(leaf, tmp_path, "hooks")
    world.dns.add("hooks.ehr.test", "A", "127.0.0.91")
    r = Receiver("127.0.0.91", free_port(), (chain, key))
    receivers.append(r)
    return r


def endpoint(tmp_path, r: Receiver, name="ehr", events=None) -> tuple[dict, str]:
    secret = new_secret()
    path = tmp_path / f"{name}.secret"
    path.write_text(secret + "\n")
    found = {
        "name": name,
        "url": f"https://hooks.ehr.test:{r.port}/hooks",
        "secret_file": str(path),
    }
    if events is not None:
        found["events"] = events
    return found, secret


def posts(gw, outcome, name="ehr"):
    value = gw.metrics.registry.get_sample_value(
        "sealgate_webhook_posts_total", {"endpoint": name, "outcome": outcome}
    )
    return value or 0


async def start(gateway_factory, world, endpoints, **overrides):
    return await gateway_factory(
        world.config(
            {
                "delivery.retry_schedule": ["1h"],
                "webhooks.endpoints": endpoints,
                "webhooks.retry_schedule": ["1s"],
                **overrides,
            }
        )
    )


async def test_events_wait_while_the_receiver_is_down_then_arrive_signed_and_in_order(
    gateway_factory, world, pki, tmp_path, receivers
):
    await world.mta("mx.good.test", "127.0.0.31")
    await world.mta("mx.slow.test", "127.0.0.32", rcpt_replies={"b@slow.test": "451 4.3.0 later"})
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    world.dns.add("slow.test", "MX", "10 mx.slow.test.")
    r = receiver(world, pki, tmp_path, receivers)  # not started: down
    ep, secret = endpoint(tmp_path, r)
    gw = await start(gateway_factory, world, [ep])
    queue_id = await send(gw, ["a@good.test", "b@slow.test"])
    await wait_until(lambda: state(gw, queue_id).get("b@slow.test", ("",))[0] == "deferred")
    await wait_until(lambda: posts(gw, "failed") >= 2, what="posts failing while it is down")
    assert r.received == []
    await r.start()
    await wait_until(lambda: len(r.received) >= 3, what="every event once it is up")
    events = r.verified(secret)  # each signature checked by the reference library
    assert [e["type"] for e in events][0] == "accepted"
    assert sorted(e["type"] for e in events) == ["accepted", "deferred", "delivered"]
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    by_type = {e["type"]: e["data"] for e in events}
    assert by_type["accepted"] == {
        "queue_id": queue_id,
        "sender": "doctor@clinic.test",
        "recipients": ["a@good.test", "b@slow.test"],
        "size": by_type["accepted"]["size"],
        "received_at": by_type["accepted"]["received_at"],
    }
    delivered = by_type["delivered"]
    assert (delivered["recipient"], delivered["status"], delivered["mode"]) == (
        "a@good.test",
        "2.0.0",
        "tls",
    )
    assert delivered["tls"]["version"] == "TLSv1.3" and delivered["tls"]["mx"] == "mx.good.test"
    assert delivered["tls"]["verification"] == "pkix"
    deferred = by_type["deferred"]
    assert (deferred["recipient"], deferred["status"]) == ("b@slow.test", "4.3.0")
    assert "451" in deferred["reason"]
    ids = [headers["webhook-id"] for headers, _ in r.received]
    assert len(set(ids)) == 3
    for _, body in r.received:  # ids and states only: nothing of the message
        assert SUBJECT.encode() not in body and BODY.strip().encode() not in body
    await wait_until(lambda: posts(gw, "posted") == 3, what="settled")
    shown = run_sealgate("webhooks", "status", "--json", "--config", gw.source)
    (listed,) = json.loads(shown.stdout)["endpoints"]
    assert (listed["endpoint"], listed["configured"], listed["pending"]) == ("ehr", True, 0)


async def test_a_tampered_payload_or_another_secret_fails_verification(
    gateway_factory, world, pki, tmp_path, receivers
):
    await world.mta("mx.good.test", "127.0.0.31")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    r = await receiver(world, pki, tmp_path, receivers).start()
    ep, secret = endpoint(tmp_path, r, events=["accepted"])
    gw = await start(gateway_factory, world, [ep])
    await send(gw, ["a@good.test"])
    await wait_until(lambda: r.received, what="the accepted event")
    (headers, body), *_ = r.received
    assert r.verified(secret)[0]["type"] == "accepted"
    tampered = body.replace(b"a@good.test", b"x@good.test")
    with pytest.raises(WebhookVerificationError):
        Receiver("", 0, r.cert, received=[(headers, tampered)]).verified(secret)
    with pytest.raises(WebhookVerificationError):
        r.verified(new_secret())


async def test_an_endpoint_gets_only_its_events_and_a_bounce_says_why(
    gateway_factory, world, pki, tmp_path, receivers
):
    await world.mta("mx.gone.test", "127.0.0.33", rcpt_replies={"c@gone.test": "550 5.1.1 no"})
    world.dns.add("gone.test", "MX", "10 mx.gone.test.")
    r = await receiver(world, pki, tmp_path, receivers).start()
    ep, secret = endpoint(tmp_path, r, events=["bounced"])
    gw = await start(gateway_factory, world, [ep])
    await send(gw, ["c@gone.test"])
    await wait_until(lambda: r.received, what="the bounce event")
    await wait_until(lambda: posts(gw, "posted") >= 1, what="settled")
    (event,) = r.verified(secret)
    assert event["type"] == "bounced"
    assert (event["data"]["recipient"], event["data"]["status"]) == ("c@gone.test", "5.1.1")
    assert "550" in event["data"]["reason"]


async def test_events_survive_a_restart_and_are_dropped_after_max_age_with_a_record(
    gateway_factory, world, pki, tmp_path, receivers
):
    await world.mta("mx.good.test", "127.0.0.31")
    world.dns.add("good.test", "MX", "10 mx.good.test.")
    r = receiver(world, pki, tmp_path, receivers)  # down
    ep, secret = endpoint(tmp_path, r)
    gw = await start(gateway_factory, world, [ep])
    queue_id = await send(gw, ["a@good.test"])
    await wait_until(lambda: state(gw, queue_id).get("a@good.test", ("",))[0] == "delivered")
    await wait_until(lambda: posts(gw, "failed") >= 1, what="a failed post")
    await gw.stop(grace=1.0)
    await r.start()
    again = await start(gateway_factory, world, [ep])  # the same state directory
    await wait_until(lambda: len(r.received) == 2, what="both events after the restart")
    assert [e["type"] for e in r.verified(secret)] == ["accepted", "delivered"]
    await again.stop(grace=1.0)

    await r.stop()
    r.received.clear()
    late = await start(gateway_factory, world, [ep], **{"webhooks.max_age": "2s"})
    await send(late, ["a@good.test"])
    await wait_until(lambda: posts(late, "dropped") >= 2, what="dropped", timeout=20)
    status = run_sealgate("webhooks", "status", "--json", "--config", late.source)
    dropped = json.loads(status.stdout)["dropped"]
    assert sorted(d["type"] for d in dropped) == ["accepted", "delivered"]
    assert all(d["endpoint"] == "ehr" and d["last_error"] for d in dropped)
    assert r.received == []


@pytest.mark.parametrize(
    ("refusal", "error", "pause"),
    [("silence", "no answer within", 1), ("503", "HTTP 503", 1), ("429", "HTTP 429", 120)],
)
async def test_an_endpoint_not_taking_events_does_not_hold_up_the_others(
    world, pki, tmp_path, receivers, monkeypatch, refusal, error, pause
):
    """One round of the dispatcher with twenty events due at each of two endpoints,
    one of which takes connections and never says a word (or answers 503, or 429
    with ``Retry-After: 120``): the other gets all of its events; the refusing one
    is tried with as many posts as run at once (each waiting out the timeout), its
    other events wait for the next try without counting as tries - not twenty
    timeouts one after another, nor twenty posts to an endpoint that said it is
    unavailable - and the next try is when the endpoint asked, if later than the
    retry schedule's."""
    monkeypatch.setattr(module, "POST_TIMEOUT", 1.0)
    good = await receiver(world, pki, tmp_path, receivers).start()
    refusing_port = free_port()
    silent = SilentServer("127.0.0.92", refusing_port)
    if refusal == "silence":
        await silent.start()
    else:
        leaf = pki.ca.issue_cert("hooks.refusing.test")
        chain, key = leaf_files(leaf, tmp_path, "refusing")
        asks = {"Retry-After": str(pause)} if refusal == "429" else {}
        busy = Receiver("127.0.0.92", refusing_port, (chain, key), int(refusal), asks)
        receivers.append(busy)
        await busy.start()
    world.dns.add("hooks.refusing.test", "A", "127.0.0.92")
    ep, secret = endpoint(tmp_path, good)
    refusing, _ = endpoint(tmp_path, good, name="refusing")
    refusing["url"] = f"https://hooks.refusing.test:{refusing_port}/hooks"
    config = load_test_config(
        write_config(
            tmp_path,
            world.config({"webhooks.endpoints": [ep, refusing], "webhooks.retry_schedule": ["1s"]}),
        )
    )
    outbox = Outbox(Database.sqlite(tmp_path / "outbox.db"))
    events = 20
    now = time.time()
    for n in range(events):
        payload = json.dumps({"type": "accepted", "timestamp": now, "data": {"n": n}})
        outbox.add(
            [
                (name, f"evt-{name}-{n}", f"Q{n}", "accepted", payload)
                for name in ("ehr", "refusing")
            ],
            now,
        )
    metrics = Metrics()
    d = module.Dispatcher(
        config, outbox, "node-1", metrics, lambda: Resolver(config.dns.nameservers)
    )
    try:
        assert await d.round() is True
    finally:
        await d.close()
        await silent.stop()

    def outcome(name: str, what: str) -> float:
        labels = {"endpoint": name, "outcome": what}
        return metrics.registry.get_sample_value("sealgate_webhook_posts_total", labels) or 0

    assert sorted(e["data"]["n"] for e in good.verified(secret)) == list(range(events))
    assert outcome("ehr", "posted") == events
    assert outcome("refusing", "failed") == module.CONCURRENCY
    assert outcome("refusing", "not-tried") == events - module.CONCURRENCY
    db = Database.sqlite(tmp_path / "outbox.db")
    try:
        tries = db.execute(
            "SELECT tries, count(*), min(last_error), min(next_try), max(next_try) "
            "FROM webhook_outbox WHERE endpoint='refusing' GROUP BY tries ORDER BY tries"
        ).fetchall()
    finally:
        db.close()
    assert [(t, n) for t, n, *_ in tries] == [
        (0, events - module.CONCURRENCY),
        (1, module.CONCURRENCY),
    ]
    assert tries[0][2].startswith(f"not tried: {error}")
    settled = time.time()
    for *_, first, last in tries:  # tried or not, the endpoint's events wait alike
        assert now + pause <= first <= last <= settled + pause


async def test_an_endpoint_taking_its_events_is_sent_them_back_to_back(
    world, pki, tmp_path, monkeypatch
):
    """Rounds of 200 events to an endpoint that takes them: at first one request at
    a time on each connection; once it has taken a few, several sent back to back
    on one connection (the server finds the next request there before it answers),
    on no more connections than before - every event arriving once, signed.  An
    endpoint whose server answers only the first of requests sent so is sent one at
    a time from then on, and the log says so."""
    leaf = pki.ca.issue_cert("hooks.ehr.test")
    chain, key = leaf_files(leaf, tmp_path, "hooks")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(chain, key)
    world.dns.add("hooks.ehr.test", "A", "127.0.0.91")
    seen = {"connections": 0, "behind": 0, "bodies": [], "drop_behind": False}

    async def handle(reader, writer):
        seen["connections"] += 1
        try:
            while True:
                seen["bodies"].append(await read_request(reader))
                seen["behind"] += bool(reader._buffer)  # the next one came with it
                if seen["drop_behind"]:
                    reader._buffer.clear()
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.91", port, ssl=ctx)
    secret_path = tmp_path / "ehr.secret"
    secret = new_secret()
    secret_path.write_text(secret)
    ep = {
        "name": "ehr",
        "url": f"https://hooks.ehr.test:{port}/hooks",
        "secret_file": str(secret_path),
    }
    config = load_test_config(
        write_config(
            tmp_path,
            world.config({"webhooks.endpoints": [ep], "webhooks.retry_schedule": ["1s"]}),
        )
    )
    outbox = Outbox(Database.sqlite(tmp_path / "outbox.db"))
    d = module.Dispatcher(
        config, outbox, "node-1", Metrics(), lambda: Resolver(config.dns.nameservers)
    )

    def add(first: int) -> None:
        now = time.time()
        outbox.add(
            [
                ("ehr", f"evt-{n}", f"Q{n}", "accepted", json.dumps({"data": {"n": n}}))
                for n in range(first, first + 200)
            ],
            now,
        )

    try:
        add(0)
        assert await d.round() is True
        assert seen["behind"] == 0  # one at a time: nothing known of the endpoint yet
        first_connections = seen["connections"]
        assert first_connections <= module.CONCURRENCY
        add(200)
        assert await d.round() is True
        assert seen["behind"] >= 100  # most went behind another on its connection
        assert seen["connections"] == first_connections  # the same connections
        hook = Webhook(secret)
        bodies = [
            hook.verify(body, {k.lower(): v for k, v in _fields(head).items()})
            for head, body in seen["bodies"]
        ]
        assert sorted(b["data"]["n"] for b in bodies) == list(range(400))
        # a server that drops what came behind the request it read
        seen["drop_behind"] = True
        monkeypatch.setattr(module, "POST_TIMEOUT", 0.5)
        add(400)
        with capture_logs() as logs:
            assert await d.round() is True
        assert [e["endpoint"] for e in logs if e["event"] == "webhook.pipelining-off"] == ["ehr"]
        seen["behind"] = 0
        for _ in range(10):  # the rest, at their next try (1 s), one at a time
            await asyncio.sleep(1.1)
            await d.round()
            if len(seen["bodies"]) >= 600:
                break
        assert seen["behind"] == 0
        assert {b["data"]["n"] for b in (json.loads(body) for _, body in seen["bodies"])} == set(
            range(600)
        )
    finally:
        await d.close()
        server.close()


def _fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


async def test_a_round_leases_its_events_only_where_nodes_share_the_outbox(
    world, tmp_path, connect, monkeypatch
):
    """While a round posts (to an endpoint that takes the connection and never
    answers), its events are leased to the node where nodes share the outbox
    (PostgreSQL) - another node finds none due - and only read where one dispatcher
    runs a round at a time (SQLite): no write transaction beside the queue's writer,
    and another reader still finds them due.  After the round they wait for their
    next try alike."""
    monkeypatch.setattr(module, "POST_TIMEOUT", 1.0)
    port = free_port()
    silent = await SilentServer("127.0.0.93", port).start()
    world.dns.add("hooks.silent.test", "A", "127.0.0.93")
    secret = tmp_path / "silent.secret"
    secret.write_text(new_secret() + "\n")
    ep = {"name": "silent", "url": f"https://hooks.silent.test:{port}/hooks"}
    config = load_test_config(
        write_config(
            tmp_path,
            world.config(
                {
                    "webhooks.endpoints": [{**ep, "secret_file": str(secret)}],
                    "webhooks.retry_schedule": ["1h"],
                }
            ),
        )
    )
    outbox, other = Outbox(connect()), Outbox(connect())
    now = time.time()
    outbox.add([("silent", f"evt-{n}", f"Q{n}", "accepted", "{}") for n in range(3)], now)
    d = module.Dispatcher(
        config, outbox, "node-1", Metrics(), lambda: Resolver(config.dns.nameservers)
    )
    try:
        posting = asyncio.create_task(d.round())
        await wait_until(lambda: silent.held, timeout=5, what="the round's connection")
        seen = await asyncio.to_thread(other.due, time.time())
        leases = await asyncio.to_thread(
            other.db.execute, "SELECT owner, lease_until FROM webhook_outbox ORDER BY id"
        )
        leases = leases.fetchall()
        assert await posting is True
    finally:
        await d.close()
        await silent.stop()
    if outbox.shared:
        assert seen == []  # another node does not post them meanwhile
        assert {owner for owner, _ in leases} == {"node-1"}
    else:
        assert [e.event_id for e in seen] == ["evt-0", "evt-1", "evt-2"]
        assert leases == [(None, None)] * 3
    after = other.db.execute("SELECT tries, next_try FROM webhook_outbox").fetchall()
    assert len(after) == 3 and all(next_try >= now + 3000 for _, next_try in after)
    other.close()


async def test_events_written_while_an_idle_round_reads_the_outbox_wake_the_next_round(
    tmp_path, world, monkeypatch
):
    """A wake-up that comes while a round is reading the outbox (events written just
    after it looked) is not lost: the next round follows at once instead of
    `IDLE_WAIT` later."""
    monkeypatch.setattr(module, "IDLE_WAIT", 60.0)
    config = load_test_config(write_config(tmp_path, world.config()))
    outbox = Outbox(Database.sqlite(tmp_path / "outbox.db"))
    d = module.Dispatcher(
        config, outbox, "node-1", Metrics(), lambda: Resolver(config.dns.nameservers)
    )
    rounds: list[float] = []
    second = asyncio.Event()

    async def a_round() -> bool:
        rounds.append(time.monotonic())
        if len(rounds) == 1:
            await asyncio.sleep(0.05)  # reading the outbox: nothing yet
            d.wake()  # the queue wrote events meanwhile
        else:
            second.set()
        return False  # nothing was due

    monkeypatch.setattr(d, "round", a_round)
    d.start()
    try:
        await asyncio.wait_for(second.wait(), 10)  # not IDLE_WAIT later
        assert len(rounds) >= 2
    finally:
        await d.close()
