"""What the archive tells a compliance officer about one message: the delivery proof
(how each recipient's copy was secured and delivered, and the log entries that prove
it), and search results as a CSV load file.  No message content: the envelope comes
from the sealed record, the body never leaves it here."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from gateway.archive import merkle
from gateway.archive.checkpoint import CheckpointError, verify
from gateway.archive.journal import Archive
from gateway.archive.query import Query

CSV_FIELDS = (
    "queue_id",
    "received",
    "mail_from",
    "message_id",
    "size",
    "sha256",
    "client_ip",
    "recipient",
    "mode",
    "rule",
    "state",
    "status",
    "attempts",
    "mx",
    "ip",
    "tls_version",
    "tls_cipher",
    "peer_cert_sha256",
    "verification",
    "key_fingerprint",
    "copy_sha256",
    "retain_until",
    "held",
    "disposed",
)


def transport(ev: dict[str, Any]) -> dict[str, Any]:
    """How one attempt's copy travelled, from its evidence: server, TLS, the key it
    was encrypted to, the digest of a changed copy."""
    encryption = ev.get("encryption") or {}
    return {
        "mx": ev.get("mx_host"),
        "ip": ev.get("ip"),
        "tls_version": ev.get("tls_version"),
        "tls_cipher": ev.get("tls_cipher"),
        "peer_cert_sha256": ev.get("peer_cert_sha256"),
        "verification": ev.get("verification"),
        "mta_sts": ev.get("mta_sts"),
        "requiretls": bool(ev.get("requiretls")),
        "tls_required_no": bool(ev.get("tls_required_no")),
        "key_fingerprint": encryption.get("key_fingerprint"),
        "key_source": encryption.get("key_source"),
        "signed": encryption.get("signed"),
        "copy_sha256": ev.get("copy_sha256"),
    }


def _envelope_head(archive: Archive, queue_id: str) -> dict[str, Any] | None:
    try:
        return archive.message(queue_id)[0]
    except KeyError:
        return None  # purged under retention: the index still tells the rest


def delivery_proof(archive: Archive, queue_id: str) -> dict[str, Any]:
    """Everything the archive holds about how ``queue_id`` was handled (KeyError if
    it never was archived)."""
    found = archive.search(Query(queue_id=queue_id), limit=1)
    if not found:
        raise KeyError(queue_id)
    summary = found[0]
    envelope = _envelope_head(archive, queue_id)
    attempts: dict[int, list[dict[str, Any]]] = {}
    for event in archive.events(queue_id, ("attempt",)):
        for r in event["body"]["recipients"]:
            ev = r.get("evidence") or {}
            decision = ev.get("decision") or {}
            attempts.setdefault(r["idx"], []).append(
                {
                    "at": event["body"]["at"],
                    "record_id": event["record_id"],
                    "leaf": event["leaf"],
                    "attempt": r.get("attempt"),
                    "state": r["state"],
                    "status": r.get("status", ""),
                    "reply": r.get("diagnostic", ""),
                    "mode": decision.get("mode"),
                    "rule": decision.get("rule"),
                    "tls_level": decision.get("tls_level"),
                    "reasons": (r.get("decision") or {}).get("reasons", []),
                    "level_source": decision.get("level_source"),
                    **transport(ev),
                }
            )
    recipients = [{**r, "history": attempts.get(r["idx"], [])} for r in summary.pop("recipients")]
    proof: dict[str, Any] = {
        **summary,
        "client": (envelope or {}).get("client"),
        "mail_options": (envelope or {}).get("mail_options"),
        "recipients": recipients,
        "copies": archive.copies(queue_id),
        "log": _log_proof(archive, queue_id),
    }
    return proof


def _log_proof(archive: Archive, queue_id: str) -> dict[str, Any]:
    """The message's leaf and events' leaves proven against the latest checkpoint."""
    latest = archive.latest_checkpoint()
    records = [f"msg-{queue_id}"] + [e["record_id"] for e in archive.events(queue_id)]
    if latest is None:
        return {"checkpoint": None, "records": {r: "not yet in a checkpoint" for r in records}}
    size, note = latest
    try:
        cp = verify(note, archive.key_name, archive.signing_key.public_key())
    except CheckpointError as e:
        return {"checkpoint": note, "error": str(e)}
    leaf_of = archive.leaf_hashes(records)
    proofs = archive.proofs(records, size)
    status = {}
    for record_id in records:
        p = proofs.get(record_id)
        if p is None:
            status[record_id] = "not yet in a checkpoint"
            continue
        ok = merkle.verify_inclusion(
            leaf_of[record_id],
            p["leaf_index"],
            size,
            [bytes.fromhex(h) for h in p["path"]],
            cp.root,
        )
        status[record_id] = f"leaf {p['leaf_index']}: " + (
            "included in the signed checkpoint" if ok else "NOT included: the log was altered"
        )
    return {"checkpoint": note, "tree_size": size, "records": status}


def _attempt_lines(a: dict[str, Any]) -> list[str]:
    """One attempt of a recipient in the proof's text."""
    out: list[str] = []
    where = f"{a['mx']} [{a['ip']}]" if a.get("mx") else "no connection"
    tls = (
        f"{a['tls_version']} {a['tls_cipher']}, certificate {a['verification']}"
        if a.get("tls_version")
        else "no TLS"
    )
    out.append(f"    attempt {a['attempt']}: {a['state']} via {where}; {tls}")
    for reason in a.get("reasons") or []:
        out.append(f"      decided: {reason}")
    if a.get("peer_cert_sha256"):
        out.append(f"      server certificate SHA-256 {a['peer_cert_sha256']}")
    if a.get("key_fingerprint"):
        out.append(
            f"      encrypted ({a['mode']}) to key {a['key_fingerprint']} "
            f"({a['key_source']}){', signed' if a.get('signed') else ''}"
        )
    if a.get("copy_sha256"):
        out.append(f"      copy sent: SHA-256 {a['copy_sha256']}")
    if a.get("mta_sts"):
        out.append(f"      MTA-STS {a['mta_sts']}")
    if a.get("requiretls"):
        out.append("      REQUIRETLS (RFC 8689): asked by the sender, offered by the server")
    if a.get("tls_required_no"):
        out.append("      TLS-Required: No honoured (policy allow_tls_required_no)")
    return out


def proof_text(p: dict[str, Any]) -> str:
    client = p.get("client") or {}
    lines = [
        f"Delivery proof for message {p['queue_id']}",
        f"  received      {p['received']} from {client.get('ip') or p['client_ip']}",
    ]
    if client:
        tls = client.get("tls_version") or "no TLS"
        cipher = f" {client['tls_cipher']}" if client.get("tls_cipher") else ""
        by = client.get("authorized_by") or "?"
        user = f" as {client['auth_user']}" if client.get("auth_user") else ""
        lines.append(f"  inbound       {tls}{cipher}; relay authorized by {by}{user}")
    lines += [
        f"  sender        {p['mail_from'] or '<>'}",
        f"  message-id    {p['message_id'] or '-'}",
        f"  content       {p['size']} bytes, SHA-256 {p['sha256']}",
        f"  retained      until {p['retain_until']}"
        + (" (on legal hold)" if p["held"] else "")
        + (" - content purged under retention" if p["disposed"] else ""),
        "",
    ]
    for r in p["recipients"]:
        lines.append(
            f"  {r['address']}: {r['state']} {r['status']} - mode {r['mode'] or '-'} "
            f"(rule {r['rule'] or '-'}), {r['attempts']} attempt(s)"
        )
        for a in r["history"]:
            lines += _attempt_lines(a)
            lines.append(f"      reply: {a['status']} {a['reply'][:200]}")
    log = p["log"]
    lines.append("")
    if log.get("checkpoint") is None:
        lines.append("  log: not yet covered by a signed checkpoint")
    elif "error" in log:
        lines.append(f"  log: the latest checkpoint does not verify: {log['error']}")
    else:
        lines.append(f"  log: signed checkpoint of {log['tree_size']} records")
        for record_id, status in log["records"].items():
            lines.append(f"    {record_id}: {status}")
    return "\n".join(lines) + "\n"


def csv_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipient (the envelope's Bcc recipients included)."""
    rows = []
    for m in results:
        for r in m["recipients"] or [{}]:
            last = r.get("last") or {}
            rows.append(
                {
                    "queue_id": m["queue_id"],
                    "received": m["received"],
                    "mail_from": m["mail_from"],
                    "message_id": m["message_id"] or "",
                    "size": m["size"],
                    "sha256": m["sha256"],
                    "client_ip": m["client_ip"],
                    "recipient": r.get("address", ""),
                    "mode": r.get("mode") or "",
                    "rule": r.get("rule") or "",
                    "state": r.get("state", ""),
                    "status": r.get("status", ""),
                    "attempts": r.get("attempts", 0),
                    "mx": last.get("mx") or "",
                    "ip": last.get("ip") or "",
                    "tls_version": last.get("tls_version") or "",
                    "tls_cipher": last.get("tls_cipher") or "",
                    "peer_cert_sha256": last.get("peer_cert_sha256") or "",
                    "verification": last.get("verification") or "",
                    "key_fingerprint": last.get("key_fingerprint") or "",
                    "copy_sha256": last.get("copy_sha256") or "",
                    "retain_until": m["retain_until"],
                    "held": m["held"],
                    "disposed": m["disposed"],
                }
            )
    return rows


def with_last_attempts(archive: Archive, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Search results with each recipient's last attempt's evidence (``last``)."""
    for m in results:
        last: dict[int, dict[str, Any]] = {}
        for event in archive.events(m["queue_id"], ("attempt",)):
            for r in event["body"]["recipients"]:
                last[r["idx"]] = transport(r.get("evidence") or {})
        for r in m["recipients"]:
            r["last"] = last.get(r["idx"], {})
    return results


def to_csv(results: list[dict[str, Any]], header: bool = True) -> str:
    """The load file's rows (``header``: with the line of field names first)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\r\n")
    if header:
        writer.writeheader()
    writer.writerows(csv_rows(results))
    return out.getvalue()


def to_json_lines(results: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(m, sort_keys=True) + "\n" for m in results)
