"""OpenPGP test keys made with the system's gpg in a private home (never the user's):
a good RSA key, a Curve25519 key, an expired, a revoked, a sign-only and a 1024-bit
one.  Made once per test session (RSA generation takes a moment)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TestKey:
    name: str
    home: Path  # holds the secret key: decrypt with it
    public: bytes  # binary export
    fingerprint: str


def gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args],
        input=data,
        capture_output=True,
        timeout=60,
    )


def make(
    base: Path, name: str, params: str, *, faked_time: str | None = None, revoke: bool = False
) -> TestKey:
    home = base / name
    home.mkdir(mode=0o700, parents=True)
    spec = base / f"{name}.spec"
    spec.write_text("%no-protection\n" + params + "%commit\n")
    extra = ["--faked-system-time", faked_time] if faked_time else []
    made = gpg(home, *extra, "--gen-key", str(spec))
    assert made.returncode == 0, made.stderr
    listing = gpg(home, "--with-colons", "--list-keys").stdout.decode()
    fingerprint = next(
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
    )
    if revoke:
        cert = (home / "openpgp-revocs.d" / f"{fingerprint}.rev").read_text()
        cert = cert.replace(
            ":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----"
        )
        done = gpg(home, "--import", data=cert.encode())
        assert done.returncode == 0, done.stderr
    public = gpg(home, "--export", fingerprint).stdout
    return TestKey(name, home, public, fingerprint)


RSA = "Key-Type: RSA\nKey-Length: {bits}\nKey-Usage: sign\nSubkey-Type: RSA\nSubkey-Length: {bits}\nSubkey-Usage: encrypt\n"


def uid(address: str, expire: str = "1y") -> str:
    return f"Name-Real: Test {address}\nName-Email: {address}\nExpire-Date: {expire}\n"


def make_all(base: Path) -> dict[str, TestKey]:
    return {
        "dave": make(base, "dave", RSA.format(bits=2048) + uid("dave@dest.test")),
        "erin": make(
            base,
            "erin",
            "Key-Type: EDDSA\nKey-Curve: ed25519\nKey-Usage: sign\nSubkey-Type: ECDH\n"
            "Subkey-Curve: cv25519\nSubkey-Usage: encrypt\n" + uid("erin@dest.test"),
        ),
        "expired": make(
            base,
            "expired",
            RSA.format(bits=2048) + uid("old@dest.test", "1d"),
            faked_time="20200101T000000",
        ),
        "revoked": make(
            base, "revoked", RSA.format(bits=2048) + uid("gone@dest.test"), revoke=True
        ),
        "signonly": make(
            base,
            "signonly",
            "Key-Type: RSA\nKey-Length: 2048\nKey-Usage: sign\n" + uid("sign@dest.test"),
        ),
        "weak": make(base, "weak", RSA.format(bits=1024) + uid("weak@dest.test")),
    }
