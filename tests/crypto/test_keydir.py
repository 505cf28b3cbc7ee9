"""Importing S/MIME certificates into the key directory: what is refused and why,
bundles, pins, and the daemon's view."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.crypto.keydir import DirectoryKeyStore, KeyDirectory
from tests.support.smime_pki import ca, mailbox, rsa_key


@pytest.fixture
def keydir(tmp_path):
    d = KeyDirectory(tmp_path / "keydir.db")
    yield d
    d.close()


REFUSED = [
    ("expired", lambda: mailbox("bob@dest.test", expired=True), "expired on"),
    (
        "no keyEncipherment",
        lambda: mailbox("bob@dest.test", key_encipherment=False),
        "Key Usage does not allow keyEncipherment",
    ),
    (
        "server-auth only",
        lambda: mailbox("bob@dest.test", eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        "does not include emailProtection",
    ),
    ("RSA 1024", lambda: mailbox("bob@dest.test", key=rsa_key(1024)), "1024 bits (at least 2048)"),
    (
        "EC key",
        lambda: mailbox("bob@dest.test", key=ec.generate_private_key(ec.SECP256R1())),
        "an EC key: S/MIME encryption here needs RSA",
    ),
    ("no mail address", lambda: mailbox(), "names no mail address"),
    ("a CA", lambda: ca(), "a CA certificate"),
]


@pytest.mark.parametrize(("case", "make", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_unusable_certificates_are_refused_with_the_reason(keydir, case, make, reason):
    with pytest.raises(ValueError, match="no usable certificate") as err:
        keydir.import_smime(make().pem)
    assert reason in str(err.value)
    assert keydir.stored() == []


def test_a_certificate_for_another_address_is_refused_for_this_one(keydir):
    with pytest.raises(ValueError, match=r"does not name bob@dest.test \(alice@dest.test\)"):
        keydir.import_smime(mailbox("alice@dest.test").pem, address="Bob@Dest.test")


@pytest.mark.parametrize("form", ["pem", "der", "p7b-pem", "p7b-der"])
def test_pem_der_and_pkcs7_bundles_are_read_and_the_bundle_ca_skipped(keydir, form):
    bob = mailbox("Bob@Dest.test", "robert@dest.test")
    data = {
        "pem": lambda: bob.pem,
        "der": lambda: bob.der,
        "p7b-pem": lambda: pkcs7.serialize_certificates([bob.cert, ca().cert], Encoding.PEM),
        "p7b-der": lambda: pkcs7.serialize_certificates([bob.cert, ca().cert], Encoding.DER),
    }[form]()
    report = keydir.import_smime(data)
    (key,) = report.imported
    assert key.addresses == ("bob@dest.test", "robert@dest.test") and key.kind == "smime"
    assert len(key.fingerprint) == 64
    if form.startswith("p7b"):
        assert report.skipped == (
            "CN=Sealgate Test S/MIME CA: a CA certificate of the bundle (not imported)",
        )
    assert keydir.material(key.fingerprint) == bob.der


async def test_the_daemon_sees_imports_pins_and_removals_within_a_second(tmp_path):
    writer = KeyDirectory(tmp_path / "keydir.db")  # as `sealgate keys` would
    reader = KeyDirectory(tmp_path / "keydir.db")  # the daemon's connection
    now = [time.time()]
    store = DirectoryKeyStore(reader, clock=lambda: now[0])
    assert (await store.lookup("bob@dest.test")).smime is None
    short = mailbox("bob@dest.test", days=30, n=1)
    long = mailbox("bob@dest.test", days=700, n=2)
    (k_short,) = writer.import_smime(short.pem).imported
    (k_long,) = writer.import_smime(long.pem).imported
    assert (await store.lookup("bob@dest.test")).smime is None  # not checked again yet
    now[0] += 1.1
    found = await store.lookup("BOB@dest.test")
    assert found.smime.fingerprint == k_long.fingerprint  # the one that lasts longest
    assert found.smime.source == "import" and found.pgp is None
    assert await store.material(found.smime) == long.der
    writer.pin("bob@dest.test", k_short.fingerprint)
    now[0] += 1.1
    assert (await store.lookup("bob@dest.test")).smime.fingerprint == k_short.fingerprint
    now[0] += 31 * 86400  # the pinned key expired: no key, not the other one
    assert (await store.lookup("bob@dest.test")).smime is None
    assert writer.remove(k_short.fingerprint) and not writer.remove(k_short.fingerprint)
    now[0] += 1.1
    assert (await store.lookup("bob@dest.test")).smime.fingerprint == k_long.fingerprint
    assert [e["action"] for e in writer.log()] == ["import", "import", "pin", "remove"]
    writer.close()
    reader.close()


async def test_the_chosen_key_follows_the_clock_between_directory_changes(tmp_path):
    """The daemon keeps each address's choice until one of its keys starts or ends:
    a key that becomes valid is chosen from then on, one that expires is dropped."""
    writer = KeyDirectory(tmp_path / "keydir.db")
    reader = KeyDirectory(tmp_path / "keydir.db")
    bob = mailbox("bob@dest.test", days=10, n=1)  # valid from a day ago for 10 days
    (key,) = writer.import_smime(bob.pem).imported
    now = [key.not_before - 3600.0]  # an hour before it starts
    store = DirectoryKeyStore(reader, clock=lambda: now[0])
    assert (await store.lookup("bob@dest.test")).smime is None
    now[0] = key.not_before + 0.5  # within the same snapshot (no second gone by)
    assert (await store.lookup("bob@dest.test")).smime.fingerprint == key.fingerprint
    now[0] = key.not_after + 0.5
    assert (await store.lookup("bob@dest.test")).smime is None
    writer.close()
    reader.close()


def test_pin_needs_a_key_of_that_address(keydir):
    (key,) = keydir.import_smime(mailbox("bob@dest.test").pem).imported
    with pytest.raises(ValueError, match="no key"):
        keydir.pin("alice@dest.test", key.fingerprint)


def test_an_import_that_fails_halfway_stores_nothing(keydir, monkeypatch):
    bundle = mailbox("a@dest.test", n=11).pem + mailbox("b@dest.test", n=12).pem
    calls = []

    def failing(address, fingerprint, actor):
        calls.append(address)
        if len(calls) == 2:
            raise OSError("disk full")
        KeyDirectory._add_address(keydir, address, fingerprint, actor)

    monkeypatch.setattr(keydir, "_add_address", failing)
    with pytest.raises(OSError, match="disk full"):
        keydir.import_smime(bundle)
    assert keydir.stored() == [] and keydir.log() == []  # nothing half-imported
