"""The portal's webhook events, through the portal as a recipient uses it: the
message placed in the portal (portal.notified), opened with a code (portal.opened,
the first time only), answered (portal.replied); withdrawn from the command line
(revoked: written into the outbox the running gateway posts); one never opened
expires (portal.expired) - each signed, with the recipient and the portal item."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import free_port, leaf_files, run_sealgate
from tests.support.portal import csrf_of, request_code
from tests.support.webhooks import Receiver
from tests.support.world import wait_until
from tests.webhooks.test_webhooks import endpoint


@pytest.fixture
async def hooks(world, pki, tmp_path):
    leaf = pki.ca.issue_cert("hooks.ehr.test")
    chain, key = leaf_files(leaf, tmp_path, "hooks")
    world.dns.add("hooks.ehr.test", "A", "127.0.0.91")
    r = await Receiver("127.0.0.91", free_port(), (chain, key)).start()
    yield r
    await r.stop()


def types(r: Receiver, secret: str) -> list[str]:
    return [e["type"] for e in r.verified(secret)]


async def test_a_portal_message_is_notified_opened_replied_and_revoked(portal, hooks, tmp_path):
    ep, secret = endpoint(tmp_path, hooks)
    overrides = {"webhooks.endpoints": [ep], "webhooks.retry_schedule": ["1s"]}
    gw, plain, link, http, queue_id = await portal(**overrides)
    await wait_until(lambda: "portal.notified" in types(hooks, secret), what="notified")
    csrf, code = await request_code(http, link, plain)
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        page = await r.text()
    async with http.get(link + "/read") as r:  # a second look: no second event
        assert r.status == 200
    async with http.post(link + "/reply", data={"csrf": csrf_of(page), "text": "x"}) as r:
        assert r.status == 400  # not the form's multipart: refused, not a server error
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("csrf", csrf_of(page))
    form.add_field("text", "Thank you")
    async with http.post(link + "/reply", data=form) as r:
        assert r.status == 200, await r.text()
    await wait_until(lambda: "portal.replied" in types(hooks, secret), what="replied")
    (item,) = gw.portal.store.items_of(queue_id)
    run_sealgate("portal", "revoke", item.id, "--config", gw.source)
    await wait_until(lambda: "revoked" in types(hooks, secret), what="revoked")
    events = hooks.verified(secret)
    assert [e["type"] for e in events] == [
        "accepted",
        "portal.notified",
        "portal.opened",
        "portal.replied",
        "revoked",
    ]
    for event in events[1:]:
        assert event["data"]["queue_id"] == queue_id
        assert event["data"]["recipient"] == "patient@plain.test"
    assert events[1]["data"]["mode"] == "portal"
    assert {e["data"]["portal_item"] for e in events[2:]} == {item.id}


async def test_a_portal_message_never_opened_expires_with_an_event(portal, hooks, tmp_path):
    from tests.support.clock import Clock

    ep, secret = endpoint(tmp_path, hooks, events=["portal.expired"])
    overrides = {"webhooks.endpoints": [ep], "portal.expiry": "1s"}
    gw, _, _, _, queue_id = await portal(**overrides)
    Clock.install(gw.portal.store).advance(1.2)
    await gw.portal.sweep()
    await wait_until(lambda: hooks.received, what="the expiry event")
    (event,) = hooks.verified(secret)
    assert event["type"] == "portal.expired" and event["data"]["queue_id"] == queue_id
