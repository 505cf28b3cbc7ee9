"""The console with every store in PostgreSQL (storage.database), as on the nodes of a
cluster: a session opened on one node is good on another, and search, a message's
evidence, the overview's counts, holds and the access record read the shared index."""

from __future__ import annotations

from gateway.config import HostPort


async def test_the_console_on_postgresql(console, postgres, gateway_factory, world, tmp_path):
    database = postgres.database()  # a new database each call: one for both nodes
    w = await console(
        **{
            "storage.database": database,
            "storage.password_file": str(postgres.password_file),
            "storage.auto_migrate": True,
        }
    )
    admin = await w.signed_in("admin")
    status, page, _ = await admin.get("/search?recipient=audit@tls.test")
    assert status == 200 and f"/messages/{w.queue_id}" in page
    status, page, _ = await admin.get(f"/messages/{w.queue_id}")
    assert "TLSv1.3" in page and "pkix" in page
    status, page, _ = await admin.get("/overview")
    assert '<span class="n">2</span> recipients delivered' in page
    status, _, _ = await admin.post("/holds", {"case": "PG case", "by_search": "1",
                                                "domain": "tls.test"})  # fmt: skip
    assert status == 303
    status, page, _ = await admin.get("/search?domain=tls.test")
    assert '<span class="tag">held</span>' in page
    status, page, _ = await admin.get("/access?actor=admin-1&action=hold")
    assert ">hold<" in page

    # a second node on the same database: the same session cookie is good there
    keys = w.gw.config.state_dir / "archive" / "keys"
    second = await gateway_factory(
        world.config(
            {
                "storage.database": database,
                "storage.password_file": str(postgres.password_file),
                "cluster.node_id": "node-b",
                "state_dir": str(tmp_path / "node-b"),
                # a cluster's nodes share the archive's keys
                "archive.master_keys": [
                    {"id": "local-1", "file": str(keys / "master-local-1.key")}
                ],
                "archive.signing_key_file": str(keys / "checkpoint-signing.pem"),
                "console.cert_file": str(w.gw.config.console.cert_file),
                "console.key_file": str(w.gw.config.console.key_file),
            }
        )
    )
    admin.base = f"https://{HostPort(*second.console.address)}"
    status, page, _ = await admin.get("/holds")
    assert status == 200 and "PG case" in page
