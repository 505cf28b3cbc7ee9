"""layout - where everything lives under ``state_dir``: the one description of the
state directory, so that the daemon, the command line and the tests agree.

    spool/                 queue/, tmp/, corrupt/, quarantine/ (gateway/spool/FORMAT.md)
    queue.db               per-recipient delivery state (gateway.queue.store)
    keydir.db              recipients' S/MIME certificates and PGP keys
    mta-sts.json           cached MTA-STS policies
    tls/selfsigned.crt|.key  the certificate generated on first start
    keys/address-hash.key  the key that hashes addresses in logs
    pgp/, pgp-signing/     gpg homes (encryption of large copies, signing)
    archive/               index.db, keys/ (master, checkpoint signing)
    portal/portal.db       messages waiting in the portal
    console/console.db     the console's local accounts, sessions and sign-ins
    sealgate.lock          held by the running daemon (gateway.statelock)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def lock(self) -> Path:
        return self.root / "sealgate.lock"

    @property
    def queue_db(self) -> Path:
        return self.root / "queue.db"

    @property
    def keydir_db(self) -> Path:
        return self.root / "keydir.db"

    @property
    def mta_sts_cache(self) -> Path:
        return self.root / "mta-sts.json"

    @property
    def self_signed(self) -> tuple[Path, Path]:
        return self.root / "tls" / "selfsigned.crt", self.root / "tls" / "selfsigned.key"

    @property
    def address_hash_key(self) -> Path:
        return self.root / "keys" / "address-hash.key"

    @property
    def pgp_home(self) -> Path:
        return self.root / "pgp"

    @property
    def pgp_signing_home(self) -> Path:
        return self.root / "pgp-signing"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def portal_db(self) -> Path:
        return self.root / "portal" / "portal.db"

    @property
    def console_db(self) -> Path:
        return self.root / "console" / "console.db"
