"""Any node serves any portal link: a message accepted by node A is signed in to and
read on node C (items, codes, sessions in the shared store), and the requests of
one address are counted across the nodes (portal.requests_per_minute)."""

from __future__ import annotations

import re

from tests.cluster.support import shared_keys
from tests.support.portal import request_code


async def test_a_link_from_node_a_signs_in_and_reads_on_node_c(
    portal, gateway_factory, world, postgres, tmp_path
):
    settings = {
        "storage.database": postgres.database(),
        "storage.password_file": str(postgres.password_file),
        "storage.auto_migrate": True,
        "portal.requests_per_minute": 10,
        **shared_keys(tmp_path / "keys"),
    }
    gw_a, plain, link, http, _ = await portal(**settings, **{"cluster.node_id": "a"})
    gw_c = await gateway_factory(
        world.config(
            {
                **settings,
                "cluster.node_id": "c",
                "state_dir": str(tmp_path / "c"),
                "portal.cert_file": str(tmp_path / "portal.pem"),
                "portal.key_file": str(tmp_path / "portal.key"),
            }
        )
    )
    on_c = re.sub(r":\d+/", f":{gw_c.portal.address[1]}/", link, count=1)
    assert on_c != link
    csrf, code = await request_code(http, on_c, plain)  # the code sent by node C
    async with http.post(on_c + "/login", data={"csrf": csrf, "code": code}) as r:
        assert r.status == 200 and "Biopsy" in await r.text()  # signed in on C
    async with http.get(link + "/read") as r:  # the session holds on A too
        assert r.status == 200 and "Biopsy" in await r.text()
    # 10 a minute: C is made to reach the limit; A, counting apart, would still answer
    on_c_statuses = []
    for _ in range(8):
        async with http.get(on_c) as r:
            on_c_statuses.append(r.status)
    assert 429 in on_c_statuses
    async with http.get(link + "/read") as r:
        assert r.status == 429  # A counted C's requests too
