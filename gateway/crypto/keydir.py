"""The key directory: recipients' S/MIME certificates and OpenPGP public keys,
imported by an administrator, kept in SQLite at ``<state_dir>/keydir.db``.

``sealgate keys import|list|show|remove|pin`` work on it while the daemon runs; the
daemon's `DirectoryKeyStore` reads a snapshot and notices changes (SQLite's
``data_version``) within a second.

Which key is used for an address: a pinned one (``sealgate keys pin ADDRESS FPR``)
when there is a pin - and if the pinned key has expired, none (never silently
another); else the valid key that lasts longest.  Every change is recorded in the
directory's log (who, when, what).
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.crypto.certs import CertificateError, check, is_ca, read_certificates
from gateway.crypto.pgp import PgpError, is_pgp, read_keys
from gateway.probe.facts import KeyInfo, KnownKeys
from gateway.storage.database import Database, Dialect, Schema
from gateway.storage.migrations import Versioned, prepare

SCHEMA = Schema("""
CREATE TABLE IF NOT EXISTS keys (
    fingerprint TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    not_before {real} NOT NULL,
    not_after {real} NOT NULL,
    source TEXT NOT NULL,
    added {real} NOT NULL,
    material {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT NOT NULL,
    fingerprint TEXT NOT NULL REFERENCES keys(fingerprint) ON DELETE CASCADE,
    PRIMARY KEY (address, fingerprint)
);
CREATE TABLE IF NOT EXISTS pins (
    address TEXT NOT NULL,
    kind TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (address, kind)
);
CREATE TABLE IF NOT EXISTS log (
    id {id},
    at {real} NOT NULL,
    action TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    address TEXT NOT NULL,
    actor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (n BIGINT NOT NULL);
INSERT INTO changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM changes);
""")
VERSIONED = Versioned("keydir", (SCHEMA,))
CHOSEN_MAX = 10_000  # addresses whose chosen keys the daemon keeps (then starts again)


@dataclass(frozen=True)
class StoredKey:
    fingerprint: str
    kind: str
    subject: str
    not_before: float
    not_after: float
    source: str
    added: float
    addresses: tuple[str, ...]

    def info(self) -> KeyInfo:
        not_after = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
        return KeyInfo(self.kind, self.fingerprint, self.source, not_after.isoformat())


@dataclass(frozen=True)
class ImportReport:
    imported: tuple[StoredKey, ...]
    skipped: tuple[str, ...]  # one line per certificate not imported, with the reason


class KeyDirectory:
    def __init__(self, where: Path | Database):
        """``where``: the SQLite file (``<state_dir>/keydir.db``), or an open
        `Database` (SQLite or PostgreSQL)."""
        self._db = where if isinstance(where, Database) else Database.sqlite(where)
        prepare(self._db, VERSIONED)

    def close(self) -> None:
        self._db.close()

    def version(self) -> int:
        """Changes with every change, from any connection (a ``sealgate keys``
        command, another node)."""
        return int(self._db.execute("SELECT n FROM changes").fetchone()[0])

    # -- changes -----------------------------------------------------------------------

    def import_any(
        self, data: bytes, address: str | None = None, source: str = "import", actor: str = ""
    ) -> ImportReport:
        """S/MIME certificates or OpenPGP public keys, whichever ``data`` holds."""
        if is_pgp(data):
            return self.import_pgp(data, address, source, actor)
        return self.import_smime(data, address, source, actor)

    def import_pgp(
        self, data: bytes, address: str | None = None, source: str = "import", actor: str = ""
    ) -> ImportReport:
        """Import the usable OpenPGP public keys in ``data``; with ``address``, only
        keys with that user id.  ValueError when nothing usable is in it."""
        revoked: list[str] = []
        try:
            keys, skipped = read_keys(data, revoked=revoked)
        except PgpError as e:
            raise ValueError(str(e)) from e
        withdrawn = []
        for fingerprint in revoked:  # the holder revoked it: it is never used again
            if self.remove(fingerprint, actor or "revocation"):
                withdrawn.append(fingerprint)
                skipped.append(f"{fingerprint.upper()}: revoked - removed from the directory")
        wanted = address.lower() if address else None
        usable = []
        for k in keys:
            if wanted is not None and wanted not in k.addresses:
                skipped.append(f"{k.fingerprint} {k.uid}: no user id {wanted}")
            elif not k.addresses:
                skipped.append(f"{k.fingerprint} {k.uid}: no mail address in its user ids")
            else:
                usable.append(k)
        if not usable:
            if withdrawn:
                return ImportReport((), tuple(skipped))
            raise ValueError("no usable key: " + "; ".join(skipped))
        now = time.time()
        entries = [
            (
                StoredKey(
                    k.fingerprint.lower(),
                    "pgp",
                    k.uid,
                    k.created,
                    k.expires,
                    source,
                    now,
                    (wanted,) if wanted else k.addresses,
                ),
                k.material,
            )
            for k in usable
        ]
        return ImportReport(self._save(entries, actor), tuple(skipped))

    def _save(self, entries: list[tuple[StoredKey, bytes]], actor: str) -> tuple[StoredKey, ...]:
        """Store keys (each with its material) and their addresses, in one transaction."""
        actor = actor or _actor()
        with self._db.transaction():
            for key, material in entries:
                self._db.execute(
                    "INSERT INTO keys(fingerprint, kind, subject, not_before, not_after, "
                    "source, added, material) VALUES (?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (fingerprint) DO UPDATE SET kind=excluded.kind, "
                    "subject=excluded.subject, not_before=excluded.not_before, "
                    "not_after=excluded.not_after, source=excluded.source, "
                    "added=excluded.added, material=excluded.material",
                    (
                        key.fingerprint,
                        key.kind,
                        key.subject,
                        key.not_before,
                        key.not_after,
                        key.source,
                        key.added,
                        material,
                    ),
                )
                for address in key.addresses:
                    self._add_address(address, key.fingerprint, actor)
        return tuple(key for key, _ in entries)

    def _add_address(self, address: str, fingerprint: str, actor: str) -> None:
        self._db.execute(
            "INSERT INTO addresses(address, fingerprint) VALUES (?,?) ON CONFLICT DO NOTHING",
            (address, fingerprint),
        )
        self._log("import", fingerprint, address, actor)

    def import_smime(
        self, data: bytes, address: str | None = None, source: str = "import", actor: str = ""
    ) -> ImportReport:
        """Import the usable certificates in ``data`` (PEM, DER, PKCS#7).  With
        ``address``, only certificates naming it.  ValueError when nothing usable is in it."""
        certs = read_certificates(data)
        wanted = address.lower() if address else None
        usable, skipped = [], []
        for cert in certs:
            name = cert.subject.rfc4514_string() or "(no subject)"
            if is_ca(cert) and len(certs) > 1:
                skipped.append(f"{name}: a CA certificate of the bundle (not imported)")
                continue
            try:
                checked = check(cert)
            except CertificateError as e:
                skipped.append(f"{name}: {e}")
                continue
            if wanted is not None and wanted not in checked.addresses:
                skipped.append(f"{name}: does not name {wanted} ({', '.join(checked.addresses)})")
                continue
            usable.append(checked)
        if not usable:
            raise ValueError("no usable certificate: " + "; ".join(skipped))
        now = time.time()
        entries = [
            (
                StoredKey(
                    c.fingerprint,
                    "smime",
                    c.subject,
                    c.not_before.timestamp(),
                    c.not_after.timestamp(),
                    source,
                    now,
                    (wanted,) if wanted else c.addresses,
                ),
                c.der,
            )
            for c in usable
        ]
        return ImportReport(self._save(entries, actor), tuple(skipped))

    def remove(self, fingerprint: str, actor: str = "") -> bool:
        fingerprint = _normal(fingerprint)
        with self._db.transaction():
            found = self._db.execute(
                "DELETE FROM keys WHERE fingerprint=?", (fingerprint,)
            ).rowcount
            if found:
                self._db.execute("DELETE FROM pins WHERE fingerprint=?", (fingerprint,))
                self._log("remove", fingerprint, "", actor or _actor())
        return bool(found)

    def forget_discovered(self, address: str) -> int:
        """Remove the keys WKD once served for ``address`` (it serves none now)."""
        address = address.lower()
        with self._db.transaction():
            rows = self._db.execute(
                "SELECT fingerprint FROM keys WHERE source='wkd' AND fingerprint IN "
                "(SELECT fingerprint FROM addresses WHERE address=?)",
                (address,),
            ).fetchall()
            for (fingerprint,) in rows:
                self._db.execute("DELETE FROM keys WHERE fingerprint=?", (fingerprint,))
                self._log("remove", fingerprint, address, "wkd")
        return len(rows)

    def pin(self, address: str, fingerprint: str, actor: str = "") -> StoredKey:
        """Use this key, and only this one, for ``address`` (ValueError if it is not
        a key for that address)."""
        address, fingerprint = address.lower(), _normal(fingerprint)
        key = next((k for k in self.stored(address) if k.fingerprint == fingerprint), None)
        if key is None:
            raise ValueError(f"no key {fingerprint[:16]}... for {address} in the directory")
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO pins(address, kind, fingerprint) VALUES (?,?,?) "
                "ON CONFLICT (address, kind) DO UPDATE SET fingerprint=excluded.fingerprint",
                (address, key.kind, fingerprint),
            )
            self._log("pin", fingerprint, address, actor or _actor())
        return key

    def _log(self, action: str, fingerprint: str, address: str, actor: str) -> None:
        """Record a change (inside its transaction); readers see the version move."""
        self._db.execute(
            "INSERT INTO log(at, action, fingerprint, address, actor) VALUES (?,?,?,?,?)",
            (time.time(), action, fingerprint, address, actor),
        )
        self._db.execute("UPDATE changes SET n = n + 1")

    # -- reading ------------------------------------------------------------------------

    def stored(self, address: str | None = None) -> list[StoredKey]:
        sql = (
            "SELECT k.fingerprint, k.kind, k.subject, k.not_before, k.not_after, k.source, "
            f"k.added, {self._joined('a.address')} FROM keys k LEFT JOIN addresses a "
            "USING (fingerprint) "
        )
        args: tuple[Any, ...] = ()
        if address is not None:
            sql += "WHERE k.fingerprint IN (SELECT fingerprint FROM addresses WHERE address=?) "
            args = (address.lower(),)
        sql += "GROUP BY k.fingerprint ORDER BY k.added"
        return [
            StoredKey(
                fingerprint=row[0],
                kind=row[1],
                subject=row[2],
                not_before=row[3],
                not_after=row[4],
                source=row[5],
                added=row[6],
                addresses=tuple(sorted((row[7] or "").split(","))),
            )
            for row in self._db.execute(sql, args)
        ]

    def _joined(self, column: str) -> str:
        """The engine's aggregate joining a column's values with commas."""
        if self._db.dialect is Dialect.POSTGRESQL:
            return f"string_agg({column}, ',')"
        return f"group_concat({column})"

    def pins(self) -> dict[tuple[str, str], str]:
        return {
            (a, k): f for a, k, f in self._db.execute("SELECT address, kind, fingerprint FROM pins")
        }

    def material(self, fingerprint: str) -> bytes | None:
        row = self._db.execute(
            "SELECT material FROM keys WHERE fingerprint=?", (_normal(fingerprint),)
        ).fetchone()
        return bytes(row[0]) if row else None

    def log(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT at, action, fingerprint, address, actor FROM log ORDER BY id"
        )
        keys = ("at", "action", "fingerprint", "address", "actor")
        return [dict(zip(keys, r, strict=True)) for r in rows]


def choose(
    keys: list[StoredKey], pins: dict[tuple[str, str], str], address: str, now: float
) -> KnownKeys:
    """The key of each kind to use for ``address``: the pinned one (if still valid),
    else the valid one that lasts longest."""
    chosen: dict[str, KeyInfo | None] = {}
    for kind in ("smime", "pgp"):
        mine = [k for k in keys if k.kind == kind]
        pinned = pins.get((address, kind))
        if pinned is not None:
            mine = [k for k in mine if k.fingerprint == pinned]
        valid = [k for k in mine if k.not_before <= now < k.not_after]
        best = max(valid, key=lambda k: k.not_after, default=None)
        chosen[kind] = best.info() if best else None
    return KnownKeys(smime=chosen["smime"], pgp=chosen["pgp"])


class DirectoryKeyStore:
    """The daemon's view of the key directory (`gateway.probe.keys.KeyStore`): an
    in-memory snapshot, reloaded when the directory changed (checked at most once a
    second), so a lookup costs a dictionary access."""

    CHECK_INTERVAL = 1.0

    def __init__(self, directory: KeyDirectory, clock: Any = time.time, metrics: Any = None):
        self.directory = directory
        self.clock = clock
        self.metrics = metrics
        self._version = -1
        self._checked = 0.0
        self._by_address: dict[str, list[StoredKey]] = {}
        self._pins: dict[tuple[str, str], str] = {}
        self._material: dict[str, bytes] = {}  # by fingerprint, for this snapshot
        # by address, for this snapshot: the keys chosen, and until when the choice
        # holds (the next start or end of one of the address's keys)
        self._chosen: dict[str, tuple[KnownKeys, float]] = {}
        self._lock = asyncio.Lock()  # one reader of the directory at a time

    async def lookup(self, address: str) -> KnownKeys:
        address = address.lower()
        now = self.clock()
        if now - self._checked >= self.CHECK_INTERVAL:
            async with self._lock:
                if now - self._checked >= self.CHECK_INTERVAL:
                    snapshot = await asyncio.to_thread(self._read_if_changed)
                    if snapshot is not None:  # replaced here, between two lookups
                        self._version, self._by_address, self._pins = snapshot
                        self._material, self._chosen = {}, {}
                    self._checked = now
        chosen = self._chosen.get(address)
        if chosen is not None and now < chosen[1]:
            return chosen[0]
        keys = self._by_address.get(address, [])
        known = choose(keys, self._pins, address, now)
        changes = [t for k in keys for t in (k.not_before, k.not_after) if t > now]
        if len(self._chosen) >= CHOSEN_MAX:
            self._chosen.clear()
        self._chosen[address] = (known, min(changes, default=math.inf))
        return known

    def _read_if_changed(
        self,
    ) -> tuple[int, dict[str, list[StoredKey]], dict[tuple[str, str], str]] | None:
        """The directory's version, keys by address and pins, if it changed since the
        snapshot (and the key gauges)."""
        version = self.directory.version()
        if version == self._version:
            return None
        by_address: dict[str, list[StoredKey]] = {}
        counts: dict[tuple[str, str], int] = {}
        for key in self.directory.stored():
            counts[(key.kind, key.source)] = counts.get((key.kind, key.source), 0) + 1
            for a in key.addresses:
                if a:
                    by_address.setdefault(a, []).append(key)
        if self.metrics is not None:
            for kind in ("smime", "pgp"):
                for source in ("import", "wkd"):
                    self.metrics.keys.labels(kind, source).set(counts.get((kind, source), 0))
        return version, by_address, self.directory.pins()

    async def discover(self, address: str) -> KnownKeys:
        return await self.lookup(address)

    def invalidate(self) -> None:
        """Read the directory again at the next lookup (after this process wrote it)."""
        self._checked = 0.0
        self._version = -1

    async def material(self, info: KeyInfo) -> bytes | None:
        """The key itself; read once per snapshot (keys are a few KB)."""
        found = self._material.get(info.fingerprint)
        if found is None:
            async with self._lock:
                found = await asyncio.to_thread(self.directory.material, info.fingerprint)
            if found is not None:
                self._material[info.fingerprint] = found
        return found


def _normal(fingerprint: str) -> str:
    return fingerprint.replace(":", "").replace(" ", "").lower().removeprefix("sha256")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
