"""What compliance officers do in the console, against a gateway that really
delivered mail: search (a Bcc recipient found, CSV with a row per recipient), a hold
placed by search that covers a message arriving afterwards, an export that verifies
with its own verify.py, the retention page's purge preview, the overview's counts,
policy explain, and every one of those looks in the access record."""

from __future__ import annotations

import csv
import io
import subprocess
import zipfile

from tests.conftest import run_sealgate


async def test_search_finds_bcc_recipients_and_downloads_csv(console):
    w = await console()
    auditor = await w.signed_in("auditor")
    status, page, _ = await auditor.get("/search?recipient=audit@tls.test")
    assert status == 200 and f"/messages/{w.queue_id}" in page
    assert "audit@tls.test" in page and "doctor@clinic.test" in page
    status, page, _ = await auditor.get("/search?domain=tls.test&status=delivered&mode=tls")
    assert f"/messages/{w.queue_id}" in page
    status, page, _ = await auditor.get("/search?recipient=nobody@tls.test")
    assert "No archived message matches" in page
    status, page, _ = await auditor.get("/search?mode=carrier-pigeon")
    assert "is not one of" in page
    status, page, _ = await auditor.get("/search?since=yesterday")
    assert "is not a date" in page
    status, body, r = await auditor.fetch("/search.csv?domain=tls.test")
    assert status == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert {row["recipient"] for row in rows} == {"patient@tls.test", "audit@tls.test"}
    assert all(row["tls_version"] == "TLSv1.3" and row["verification"] == "pkix" for row in rows)
    status, page, _ = await auditor.get("/access?action=search")
    assert "auditor-1 (local:auditor-1" in page and "audit@tls.test" in page
    status, page, _ = await auditor.get("/access?action=search-csv")
    assert "search-csv" in page


async def test_search_pages(console):
    w = await console()
    for n in range(3):
        await w.send([f"p{n}@tls.test"])
    auditor = await w.signed_in("auditor")
    import gateway.console.web as web

    web_page_size = web.PAGE_SIZE
    web.PAGE_SIZE = 2
    try:
        status, first, _ = await auditor.get("/search?domain=tls.test")
        assert "Older" in first and "Newer" not in first
        status, third, _ = await auditor.get("/search?domain=tls.test&page=2")
        assert "Newer" in third and "Older" not in third
    finally:
        web.PAGE_SIZE = web_page_size
    ids = lambda page: {line for line in page.split('"') if line.startswith("/messages/")}  # noqa: E731
    assert len(ids(first)) == 2 and len(ids(third)) == 2 and not ids(first) & ids(third)


async def test_a_hold_by_search_covers_a_message_that_arrives_afterwards(console):
    w = await console()
    admin = await w.signed_in("admin")
    status, _, _ = await admin.post(
        "/holds", {"case": "Audit 2026", "by_search": "1", "domain": "tls.test"}
    )
    assert status == 303
    later = await w.send(["late@tls.test"], subject="Follow-up")
    status, page, _ = await admin.get("/holds")
    assert "Audit 2026" in page and "recipient=@tls.test" in page and "now and later" in page
    status, page, _ = await admin.get("/search?recipient=late@tls.test")
    assert f'/messages/{later}">' in page and '<span class="tag">held</span>' in page
    status, page, _ = await admin.get(f"/messages/{later}")
    assert "under legal hold" in page
    status, page, _ = await admin.get("/holds?case=Audit%202026")
    assert f'href="/messages/{later}"' in page and f'href="/messages/{w.queue_id}"' in page
    assert (await admin.get("/holds?case=No%20such%20case"))[0] == 404
    status, _, _ = await admin.post("/holds/release", {"case": "Audit 2026"})
    assert status == 303
    status, page, _ = await admin.get("/holds")
    assert "Audit 2026" not in page
    status, page, _ = await admin.get("/access?actor=admin-1")
    assert "view-evidence" in page
    status, body, _ = await admin.post("/holds", {"case": "", "selected": w.queue_id})
    assert status == 400 and b"name the case" in body


async def test_an_export_verifies_with_its_own_verify_py(console, tmp_path):
    w = await console()
    investigator = await w.signed_in("investigator")
    status, body, r = await investigator.post(
        "/exports", {"by_search": "1", "recipient": "audit@tls.test"}
    )
    assert status == 200 and r.headers["Content-Type"] == "application/zip", body[:500]
    assert "attachment" in r.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        z.extractall(tmp_path)
    root = tmp_path / "sealgate-export"
    assert (root / f"messages/{w.queue_id}.eml").exists()
    checked = subprocess.run(
        ["/usr/bin/python3", "-I", "verify.py"], cwd=root, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "FAILED" not in checked.stdout and ": OK" in checked.stdout
    status, body, _ = await investigator.post("/exports", {"selected": "NOSUCHID"})
    assert status == 400
    import gateway.console.service as service

    limit, service.MAX_EXPORT_BYTES = service.MAX_EXPORT_BYTES, 100
    try:  # built in memory: the console refuses what would not fit, and says where to go
        status, body, _ = await investigator.post("/exports", {"selected": w.queue_id})
    finally:
        service.MAX_EXPORT_BYTES = limit
    assert status == 400 and b"sealgate archive export" in body
    status, page, _ = await investigator.get("/access?action=export")
    assert "investigator-1 (local:investigator-1" in page


async def test_retention_preview_and_rules(console):
    w = await console(
        **{"archive.retention_rules": [{"days": 3650, "sender_domain": "clinic.test"}]}
    )
    admin = await w.signed_in("admin")
    status, page, _ = await admin.get("/retention")
    assert status == 200 and "3650 days" in page and "sender domain clinic.test" in page
    assert "No message is past retention" in page
    status, page, _ = await admin.get("/access?action=purge-preview")
    assert "purge-preview" in page


async def test_the_overview_counts_what_the_archive_holds(console):
    w = await console()
    auditor = await w.signed_in("auditor")
    status, page, _ = await auditor.get("/overview")
    assert status == 200
    assert '<span class="n">1</span> messages received' in page
    assert '<span class="n">2</span> recipients delivered' in page
    assert "Verified (PKIX): 2" in page or "Verified (PKIX)</text>" in page
    assert "TLSv1.3" in page and "<svg" in page and "<script" not in page
    status, page, _ = await auditor.get("/overview?days=365")
    assert status == 200 and "last year" in page


async def test_policy_explain_sends_nothing(console):
    w = await console()
    auditor = await w.signed_in("auditor")
    received = len(w.mta.received)
    status, body, _ = await auditor.post(
        "/explain",
        {"sender": "doctor@clinic.test", "recipients": "patient@tls.test", "content": "hello"},
    )
    page = body.decode()
    assert status == 200 and "patient@tls.test: tls" in page and "defaults" in page
    assert len(w.mta.received) == received
    status, body, _ = await auditor.post("/explain", {"sender": "", "recipients": ""})
    assert status == 400


def test_console_user_commands(tmp_path):
    from tests.conftest import write_config

    config = write_config(tmp_path, {})
    added = run_sealgate("console", "user", "add", "ana", "--role", "auditor", "--role",
                         "admin", "--config", str(config))  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "password:" in added.stdout and "otpauth://totp/" in added.stdout
    again = run_sealgate("console", "user", "add", "ana", "--role", "auditor",
                         "--config", str(config))  # fmt: skip
    assert again.returncode == 1 and "already" in again.stderr
    listed = run_sealgate("console", "user", "list", "--json", "--config", str(config))
    assert '"roles": [\n        "auditor",\n        "admin"\n      ]' in listed.stdout
    short = run_sealgate("console", "user", "reset", "ana", "--password-stdin",
                         "--config", str(config), stdin="short\n")  # fmt: skip
    assert short.returncode == 78 and "at least 12" in short.stderr
    reset = run_sealgate("console", "user", "reset", "ana", "--password-stdin", "--new-totp",
                         "--config", str(config), stdin="a much longer password\n")  # fmt: skip
    assert (
        reset.returncode == 0 and "password:" not in reset.stdout and "TOTP secret" in reset.stdout
    )
    off = run_sealgate("console", "user", "disable", "ana", "--config", str(config))
    assert off.returncode == 0
    listed = run_sealgate("console", "user", "list", "--config", str(config))
    assert "ana" in listed.stdout and "disabled" in listed.stdout
    missing = run_sealgate("console", "user", "disable", "bob", "--config", str(config))
    assert missing.returncode == 1 and "no console account" in missing.stderr
    bad = run_sealgate(
        "console", "user", "add", "a b", "--role", "auditor", "--config", str(config)
    )
    assert bad.returncode == 78


async def test_a_case_is_exported_and_subjects_are_searched_when_indexed(console, tmp_path):
    w = await console(**{"archive.index_subjects": True})
    admin = await w.signed_in("admin")
    status, _, _ = await admin.post("/holds", {"case": "Case A", "selected": w.queue_id})
    assert status == 303
    investigator = await w.signed_in("investigator")
    status, page, _ = await investigator.get("/exports")
    assert '<option value="Case A">Case A (1 messages)</option>' in page
    status, body, r = await investigator.post("/exports", {"export_case": "Case A"})
    assert status == 200 and r.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        names = z.namelist()
    assert f"sealgate-export/messages/{w.queue_id}.eml" in names
    status, page, _ = await investigator.get("/search?subject=lab%20results")
    assert f"/messages/{w.queue_id}" in page
    status, page, _ = await investigator.get("/search?subject=biopsy")
    assert "No archived message matches" in page


async def test_a_csv_is_streamed_page_by_page_with_one_header(console, monkeypatch):
    import gateway.console.service as service
    import gateway.console.web as web

    w = await console()
    others = [await w.send([f"p{n}@tls.test"]) for n in range(2)]
    monkeypatch.setattr(service, "CSV_PAGE", 1)
    monkeypatch.setattr(web, "CSV_PAGE", 1)
    auditor = await w.signed_in("auditor")
    status, body, r = await auditor.fetch("/search.csv?domain=tls.test")
    assert status == 200 and r.headers["Content-Security-Policy"].startswith("default-src")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert body.decode().count("queue_id,received") == 1
    assert sorted(row["recipient"] for row in rows) == sorted(
        ["patient@tls.test", "audit@tls.test", "p0@tls.test", "p1@tls.test"]
    )
    assert {row["queue_id"] for row in rows} == {w.queue_id, *others}
    status, page, _ = await auditor.get("/access?action=search-csv")
    assert "results: 3" in page
