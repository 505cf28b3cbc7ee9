"""The key directory's contract, on SQLite and on a real PostgreSQL server: what is
imported is found by address with its material byte for byte; a second import adds
addresses; pins hold and go with their key; WKD's keys are forgotten alone; every
change is logged and moves the version another connection (another process, another
node) sees, and that connection finds the key."""

from __future__ import annotations

import pytest

from gateway.crypto.keydir import KeyDirectory
from tests.support.smime_pki import mailbox

BOB = mailbox("bob@dest.test", n=31)
BOB_TOO = mailbox("bob@dest.test", n=32)


def test_an_import_is_found_by_address_with_its_material(connect):
    directory = KeyDirectory(connect())
    report = directory.import_smime(BOB.pem, actor="alice")
    (key,) = report.imported
    (found,) = directory.stored("Bob@Dest.test".lower())
    assert found.fingerprint == key.fingerprint and found.addresses == ("bob@dest.test",)
    assert found.kind == "smime" and found.not_after > found.not_before
    assert directory.material(key.fingerprint) == BOB.der
    assert directory.stored("nobody@dest.test") == []


def test_importing_again_adds_an_address_and_keeps_one_key(connect):
    directory = KeyDirectory(connect())
    directory.import_smime(BOB.pem)
    cert = mailbox("bob@dest.test", "robert@dest.test", n=33)
    directory.import_smime(cert.pem, address="robert@dest.test")
    directory.import_smime(cert.pem, address="bob@dest.test")
    keys = [k for k in directory.stored() if k.fingerprint != directory.stored()[0].fingerprint]
    (both,) = keys
    assert both.addresses == ("bob@dest.test", "robert@dest.test")
    assert len(directory.stored()) == 2


def test_a_pin_holds_and_goes_with_its_key(connect):
    directory = KeyDirectory(connect())
    first = directory.import_smime(BOB.pem).imported[0]
    second = directory.import_smime(BOB_TOO.pem).imported[0]
    directory.pin("bob@dest.test", first.fingerprint, actor="alice")
    directory.pin("bob@dest.test", second.fingerprint, actor="alice")  # replaces the pin
    assert directory.pins() == {("bob@dest.test", "smime"): second.fingerprint}
    with pytest.raises(ValueError, match="no key"):
        directory.pin("carol@dest.test", first.fingerprint)
    assert directory.remove(second.fingerprint, actor="alice")
    assert directory.pins() == {}
    assert [k.fingerprint for k in directory.stored("bob@dest.test")] == [first.fingerprint]
    assert not directory.remove(second.fingerprint)


def test_keys_found_by_wkd_are_forgotten_alone(connect):
    directory = KeyDirectory(connect())
    imported = directory.import_smime(BOB.pem).imported[0]
    directory.import_smime(BOB_TOO.pem, source="wkd")
    assert directory.forget_discovered("bob@dest.test") == 1
    assert [k.fingerprint for k in directory.stored("bob@dest.test")] == [imported.fingerprint]


def test_every_change_is_logged_and_seen_by_another_connection(connect):
    writer, reader = KeyDirectory(connect()), KeyDirectory(connect())
    before = reader.version()
    key = writer.import_smime(BOB.pem, actor="alice").imported[0]
    assert reader.version() != before  # another process or node notices
    assert [k.fingerprint for k in reader.stored("bob@dest.test")] == [key.fingerprint]
    seen = reader.version()
    writer.pin("bob@dest.test", key.fingerprint, actor="bob")
    assert reader.version() != seen
    writer.remove(key.fingerprint, actor="carol")
    log = reader.log()
    assert [(e["action"], e["actor"]) for e in log] == [
        ("import", "alice"),
        ("pin", "bob"),
        ("remove", "carol"),
    ]
    assert all(isinstance(e["at"], float) and e["at"] > 1.7e9 for e in log)


def test_timestamps_keep_their_precision(connect):
    """PostgreSQL's REAL is four bytes: a timestamp there would lose minutes."""
    directory = KeyDirectory(connect())
    key = directory.import_smime(BOB.pem).imported[0]
    (stored,) = directory.stored()
    assert stored.added == key.added and stored.not_after == key.not_after
