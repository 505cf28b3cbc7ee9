#!/usr/bin/env python3
"""The archive's own work per message, outside the daemon, by batch size.

    .venv/bin/python bench/journal.py [--messages 4000] [--rounds 5] [--size 4096]
                                      [--batches 1,5,10,20,40] [--keys fixed|varied]
                                      [--index 0]

In one process, on a new archive in a temporary directory (SQLite, the daemon's
settings): each message's journal (envelope and content sealed, the log leaf, the
index rows) and one delivery attempt's record (a decision with its facts, the
evidence), written as the daemon's archive thread writes them - in batches, each one
transaction, journals and attempts of the batch's messages together; each envelope
with the canonical JSON its SMTP worker spooled and the message's digest checked, as
the worker hands both over.  Prints the
CPU a message takes (medians of ``--rounds``) and the write-ahead log's pages a
batch writes, for each batch size.

No target of its own: the archive's share of the relay's (issue 17: archive on /
off >= 0.9, `bench/archive.py`), measured here without the machine's noise (the
relay's rounds spread by a fifth; these by a few per cent).  Under load the
daemon's batches gather the records of `gateway.archive.service.LINGER`.

``--keys``: every message with one Message-ID, sender and recipient (``fixed``,
the default: the relay benchmarks' ``smtp-source`` sends one sender and recipient,
and Message-IDs in sequence), or a new random Message-ID each, 2,000 senders and
200,000 recipient addresses, as a hospital's mail (``varied``): then each
message's rows go to a leaf of their own in the indexes by Message-ID, sender and
recipient, and its batch writes those pages to the log.  ``--index N``: an index
of N records first (`bench/archive.py`'s ``build_index``, with their attempts), as
an archive some months old.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archive import build_index  # noqa: E402
from policy import message as policy_message  # noqa: E402

from gateway.archive.journal import canonical  # noqa: E402
from gateway.archive.service import _Journal, open_archive  # noqa: E402
from gateway.canonical import encoded  # noqa: E402
from gateway.config import load_config_text  # noqa: E402
from gateway.model import Envelope  # noqa: E402
from gateway.spool.store import handed_envelope  # noqa: E402

# what a relayed message's first attempt records, as the daemon wrote it for a
# smart host (bench/relay.py's setup)
MX = {
    "cert_not_after": None,
    "cert_sha256": None,
    "dane_match": None,
    "error": "",
    "host": "127.0.0.1",
    "ip": "127.0.0.1",
    "observed_at": 1796575108.1198063,
    "pkix_error": "",
    "pkix_valid": None,
    "port": 52005,
    "reachable": True,
    "starttls": False,
    "sts_match": None,
    "tls_cipher": None,
    "tls_version": None,
    "tlsa": "n/a",
}
SHORT = {
    "level_source": "defaults",
    "mode": "tls",
    "policy": "policy.yaml@d9ce103e3165",
    "rule": "defaults",
    "tls_level": "may",
}
DECISION = {
    **SHORT,
    "candidates": ["tls"],
    "decided_at": 1796575108.146066,
    "excluded": [],
    "facts": {
        "domain": "bench.test",
        "keys": {"error": "", "pgp": None, "smime": None},
        "mta_sts": "none",
        "mta_sts_id": "",
        "mta_sts_source": "",
        "mx": [MX],
        "mx_secure": False,
        "observed_at": 1796575108.119725,
        "route_error": "",
        "route_permanent": False,
        "via": "smart-host",
    },
    "fallback": "hold",
    "portal_auth": None,
    "portal_expiry": None,
    "reasons": ["tls: level may (defaults): 127.0.0.1 reaches may"],
    "rules": [],
    "strip_tags": [],
}
EVIDENCE = {
    "decision": SHORT,
    "dsn_passed_on": False,
    "ip": "127.0.0.1",
    "level": "may",
    "mta_sts": "",
    "mx_host": "127.0.0.1",
    "peer_cert_sha256": None,
    "port": 52005,
    "requiretls": False,
    "reused": 3,
    "started_at": "2026-12-06T16:38:28.126+00:00",
    "tls_cipher": None,
    "tls_required_no": False,
    "tls_version": None,
    "verification": "none",
}


def message(size: int) -> bytes:
    """`bench/policy.py`'s message, with a Message-ID (the archive indexes it)."""
    return b"Message-ID: <m1@clinic.test>\r\n" + policy_message(size)


def envelope(
    queue_id: str, data: bytes, sender: str = "dr@clinic.test", recipient: str = "pat@bench.test"
) -> Envelope:
    """As the daemon's queue hands it to the archive: the canonical JSON an SMTP
    worker spooled, taken as the main process takes it (`handed_envelope`: kept as
    `Envelope.spooled_json`, which the journal stores as it is)."""
    fields = Envelope.from_dict(
        {
            "client": {"authorized_by": "network", "helo": "vm", "ip": "127.0.0.1", "port": 4918},
            "data_is_wire": True,
            "mail_from": sender,
            "queue_id": queue_id,
            "received_at": "2026-12-06T16:38:28.124781+00:00",
            "recipients": [{"address": recipient, "options": []}],
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "trace_headers": "Received: from vm (unknown [127.0.0.1])\r\n\tby localhost\r\n",
        }
    ).to_dict()  # every field, as the spool writes it
    return handed_envelope(canonical(fields), queue_id, len(data))


def attempt(archive: Any, queue_id: str) -> Any:
    record = {
        "idx": 0,
        "address": "pat@bench.test",
        "attempt": 1,
        "state": "delivered",
        "status": "2.0.0",
        "diagnostic": "250 2.0.0 Ok",
        # the queue state's JSON of them, as the daemon hands them over
        "evidence": encoded(EVIDENCE),
        "decision": encoded(DECISION),
    }
    return lambda: archive.journal_attempt(queue_id, [record])


def one_message(queue_id: str, data: bytes, rng: random.Random | None) -> tuple[bytes, Envelope]:
    """A message and its envelope: ``rng`` None, as every other (``--keys fixed``)."""
    if rng is None:
        return data, envelope(queue_id, data)
    _, crlf, rest = data.partition(b"\r\n")  # (its first line is the Message-ID)
    data = f"Message-ID: <{rng.getrandbits(128):032x}@ehr.clinic.test>".encode() + crlf + rest
    n = rng.randrange(2000)
    sender = f"user{n}@clinic{n % 20}.example"
    recipient = f"patient{rng.randrange(200_000)}@mail{rng.randrange(2)}.example"
    return data, envelope(queue_id, data, sender, recipient)


def run(batch: int, args: argparse.Namespace, data: bytes) -> tuple[list[float], float]:
    """CPU microseconds a message, a round each; WAL pages a batch."""
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-journal-"))
    rng = random.Random(batch) if args.keys == "varied" else None
    try:
        config = load_config_text(f"state_dir: {workdir}\n")
        archive = open_archive(config, "bench.sealgate.test")
        db = archive.index.db
        if args.index:
            build_index(archive, args.index, events=True)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # (its log emptied: counted from 0)
        db.execute("PRAGMA wal_autocheckpoint=0")  # (to count the log's pages)
        wal = workdir / "archive" / "index.db-wal"
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        per_message: list[float] = []
        frames_before, batches = wal.stat().st_size, 0
        for r in range(args.rounds):
            jobs: list[Any] = []
            for i in range(args.messages):
                queue_id = f"B{batch:02d}R{r:02d}{i:08d}"
                body, handed = one_message(queue_id, data, rng)
                # (no subject index; the digest checked, as an SMTP worker's handover is)
                jobs.append(_Journal(archive, None, handed, body, False, True))
                jobs.append(attempt(archive, queue_id))
            started = time.process_time()
            for start in range(0, len(jobs), 2 * batch):
                outcomes = archive.batch(jobs[start : start + 2 * batch])
                batches += 1
                failed = [e for _, e in outcomes if e is not None]
                if failed:
                    raise SystemExit(f"a record failed: {failed[0]}")
            per_message.append((time.process_time() - started) / args.messages * 1e6)
        pages = (wal.stat().st_size - frames_before) / (page + 24) / batches
        archive.index.close()
        return per_message, pages
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batches", default="1,5,10,20,40")
    ap.add_argument("--keys", choices=["fixed", "varied"], default="fixed")
    ap.add_argument("--index", type=int, default=0, help="records in the index beforehand")
    args = ap.parse_args()
    data = message(args.size)
    for batch in [int(b) for b in args.batches.split(",")]:
        rounds, pages = run(batch, args, data)
        print(
            f"batches of {batch} messages ({args.size} B, {args.messages} x {args.rounds}, "
            f"keys {args.keys}, index of {args.index} records before): "
            f"{statistics.median(rounds):.1f} us of CPU a message (journal + one attempt "
            f"record) [{', '.join(f'{r:.1f}' for r in rounds)}]; "
            f"{pages:.1f} pages to the write-ahead log a batch ({pages / batch:.1f} a message)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
