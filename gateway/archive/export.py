"""Exports for eDiscovery: one zip that an outside party can check with standard
tools, without Sealgate and without trusting whoever handed it over.

    README.txt                    what is in it, and how to verify it
    messages/<id>.eml             each message exactly as received
    messages/<id>.envelope.json   its envelope (MAIL FROM, every RCPT TO including
                                  Bcc, client, inbound TLS), as committed to the log
    copies/<sha256>.eml           copies the gateway changed before sending (as sent)
    events/<record>.json          each delivery attempt (decision and evidence), hold
                                  or access about the messages, as committed
    loadfile.csv                  one row per recipient: envelope, mode, TLS, result
    proofs.json                   for every record: its leaf index and the inclusion
                                  proof to the checkpoint below
    checkpoint.txt                the signed checkpoint (C2SP signed note)
    checkpoint.body, .sig         its signed text and raw Ed25519 signature (openssl)
    checkpoint-key.pem            the archive's public checkpoint key
    verify.py                     recomputes every record's leaf from the files and
                                  checks its proof against the checkpoint's root
                                  (Python standard library only)
    SHA256SUMS                    SHA-256 of every file above (sha256sum -c)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import zipfile
from typing import Any, BinaryIO

from gateway.archive.journal import Archive, canonical
from gateway.archive.query import Query
from gateway.archive.report import to_csv, with_last_attempts
from gateway.archive.service import public_pem

README = """\
Sealgate archive export
=======================

Made {made} by {actor} for: {scope}
Messages: {count}.  Archive log: {origin}, checkpoint of {size} records.

What the files are: see the list at the end.

How to verify (Debian: coreutils, openssl, python3; nothing else):

1. Every file is the one exported (the manifest):

       sha256sum -c SHA256SUMS

2. The checkpoint was signed by the archive's key (compare checkpoint-key.pem with
   the key the organisation published), and checkpoint.body is the signed text of
   checkpoint.txt:

       openssl pkeyutl -verify -pubin -inkey checkpoint-key.pem -rawin \\
           -in checkpoint.body -sigfile checkpoint.sig

3. Every message, envelope, changed copy and event in this export is a record of
   that log, unchanged (each record's leaf hash is recomputed from the files and
   its inclusion proof checked against the checkpoint's root hash, RFC 6962/9162):

       python3 verify.py

   A message's record is its envelope file, a newline, then its .eml bytes.

A later checkpoint of the same archive must be consistent with this one: the
archive can prove that nothing in these {size} records was changed or removed since.

Files:
{files}
"""

VERIFY_PY = r'''#!/usr/bin/env python3
"""Check every record of this export against the signed checkpoint's root hash.
Standard library only.  Exit status 0: all records verified."""
import base64, hashlib, json, pathlib, sys

here = pathlib.Path(__file__).resolve().parent


def leaf(kind, record_id, content):
    digest = hashlib.sha256(content).hexdigest()
    commitment = json.dumps({"id": record_id, "kind": kind, "sha256": digest},
                            sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"\x00" + commitment).digest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def included(leaf_hash, index, size, path, root):  # RFC 9162 2.1.3.2
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


note = (here / "checkpoint.txt").read_text()
body = note.split("\n\n", 1)[0] + "\n"
if (here / "checkpoint.body").read_text() != body:
    sys.exit("checkpoint.body is not the signed text of checkpoint.txt")
origin, size, root = body.splitlines()[:3]
size, root = int(size), base64.b64decode(root)
proofs = json.loads((here / "proofs.json").read_text())
failed = 0
for record_id, p in sorted(proofs.items()):
    kind, name = p["kind"], p["file"]
    content = (here / name).read_bytes()
    if kind == "message":
        content = (here / p["envelope"]).read_bytes() + b"\n" + content
    ok = p["tree_size"] == size and included(
        leaf(kind, record_id, content), p["leaf_index"], size,
        [bytes.fromhex(h) for h in p["path"]], root)
    print(f"{record_id}: {'OK' if ok else 'FAILED'} ({name})")
    failed += not ok
print(f"{len(proofs) - failed} of {len(proofs)} records verified against {origin} size {size}")
sys.exit(1 if failed or not proofs else 0)
'''


def export(  # noqa: PLR0915 - the export package, file by file, in the order its README lists
    archive: Archive, queue_ids: list[str], out: BinaryIO, actor: str, scope: str
) -> dict[str, Any]:
    """Write the zip for these messages to ``out`` (a checkpoint is signed first, so
    every record is covered).  Purged messages are listed in the load file, without
    content.  Returns a summary, also recorded in the access record."""
    note = archive.checkpoint()
    size = int(note.split("\n")[1])
    files: dict[str, bytes] = {}
    proofs: dict[str, dict[str, Any]] = {}
    want: list[tuple[str, str, str, str | None]] = []  # record, kind, file, envelope file
    results = []
    for queue_id in queue_ids:
        found = archive.search(Query(queue_id=queue_id), limit=1)
        if not found:
            continue
        results += found
        try:
            envelope, data = archive.message(queue_id)
        except KeyError:
            envelope = None  # purged under retention
        if envelope is not None:
            files[f"messages/{queue_id}.eml"] = data
            files[f"messages/{queue_id}.envelope.json"] = canonical(envelope)
            want.append(
                (
                    f"msg-{queue_id}",
                    "message",
                    f"messages/{queue_id}.eml",
                    f"messages/{queue_id}.envelope.json",
                )
            )
        for event in archive.events(queue_id):
            text = archive.event_text(event["record_id"])
            name = f"events/{event['record_id']}.json"
            files[name] = text.encode()
            want.append((event["record_id"], "event", name, None))
        for copy in archive.copies(queue_id):
            try:
                files[f"copies/{copy['sha256']}.eml"] = archive.record(copy["record_id"])
            except KeyError:
                continue
            want.append((copy["record_id"], "copy", f"copies/{copy['sha256']}.eml", None))
    found_proofs = archive.proofs([w[0] for w in want], size)
    for record_id, kind, name, envelope_file in want:
        p = found_proofs.get(record_id)
        if p is None:
            continue
        proofs[record_id] = {**p, "kind": kind, "file": name}
        if envelope_file:
            proofs[record_id]["envelope"] = envelope_file
    files["loadfile.csv"] = to_csv(with_last_attempts(archive, results)).encode()
    files["proofs.json"] = json.dumps(proofs, indent=1, sort_keys=True).encode()
    files["checkpoint.txt"] = note.encode()
    body, _, signature_line = note.partition("\n\n")
    files["checkpoint.body"] = (body + "\n").encode()
    files["checkpoint.sig"] = base64.b64decode(signature_line.split(" ")[2])[4:]
    files["checkpoint-key.pem"] = public_pem(archive.signing_key.public_key())
    files["verify.py"] = VERIFY_PY.encode()
    listing = "\n".join(f"  {line}" for line in (__doc__ or "").split("\n\n", 1)[1].splitlines())
    files["README.txt"] = README.format(
        made=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        actor=actor,
        scope=scope,
        count=len(results),
        origin=archive.origin,
        size=size,
        files=listing,
    ).encode()
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())
    ).encode()
    files["SHA256SUMS"] = manifest
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            z.writestr(f"sealgate-export/{name}", data)
    summary: dict[str, Any] = {
        "messages": len(results),
        "records": len(proofs),
        "checkpoint_size": size,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    archive.access(actor, "export", scope=scope, queue_ids=sorted(queue_ids), **summary)
    return summary


def export_bytes(archive: Archive, queue_ids: list[str], actor: str, scope: str) -> bytes:
    buffer = io.BytesIO()
    export(archive, queue_ids, buffer, actor, scope)
    return buffer.getvalue()
