"""`sealgate keys`: what an administrator types, and what they are told."""

from __future__ import annotations

import json

from tests.conftest import run_sealgate
from tests.support.smime_pki import mailbox


def keys(tmp_path, *args):
    return run_sealgate("keys", *args, "--state-dir", str(tmp_path / "state"))


def test_import_list_show_pin_remove(tmp_path):
    first, second = (
        mailbox("bob@dest.test", n=8),
        mailbox("bob@dest.test", "b@dest.test", days=700, n=9),
    )
    (tmp_path / "1.pem").write_bytes(first.pem)
    (tmp_path / "2.der").write_bytes(second.der)
    out = keys(tmp_path, "import", str(tmp_path / "1.pem"))
    assert out.returncode == 0, out.stderr
    fpr1 = out.stdout.split()[1]
    out = keys(tmp_path, "import", str(tmp_path / "2.der"), "--address", "B@dest.test")
    assert out.returncode == 0, out.stderr
    fpr2 = out.stdout.split()[1]
    assert out.stdout.rstrip().endswith("b@dest.test  CN=bob@dest.test")  # for that address alone
    listed = [json.loads(line) for line in keys(tmp_path, "list", "--json").stdout.splitlines()]
    assert [(k["fingerprint"], k["addresses"]) for k in listed] == [
        (fpr1, ["bob@dest.test"]),
        (fpr2, ["b@dest.test"]),
    ]
    assert (
        keys(tmp_path, "pin", "bob@dest.test", fpr1).stdout == f"pinned {fpr1} for bob@dest.test\n"
    )
    shown = keys(tmp_path, "show", "Bob@dest.test").stdout
    assert fpr1 in shown and "pinned for bob@dest.test" in shown
    assert keys(tmp_path, "show", fpr2[:12]).stdout.startswith(fpr2)
    assert keys(tmp_path, "remove", fpr1).stdout == f"removed {fpr1}\n"
    gone = keys(tmp_path, "remove", fpr1)
    assert gone.returncode == 1 and "no key" in gone.stderr


def test_a_refused_certificate_says_why_and_imports_nothing(tmp_path):
    (tmp_path / "old.pem").write_bytes(mailbox("bob@dest.test", expired=True, n=10).pem)
    out = keys(tmp_path, "import", str(tmp_path / "old.pem"))
    assert out.returncode == 1
    assert "no usable certificate: CN=bob@dest.test: expired on" in out.stderr
    assert keys(tmp_path, "list").stdout == ""
    (tmp_path / "junk.pem").write_bytes(b"hello")
    out = keys(tmp_path, "import", str(tmp_path / "junk.pem"))
    assert out.returncode == 1 and "not a certificate (PEM, DER) or a PKCS#7 bundle" in out.stderr
    pin = keys(tmp_path, "pin", "bob@dest.test", "00" * 32)
    assert pin.returncode == 1 and "no key" in pin.stderr
