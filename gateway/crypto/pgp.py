"""OpenPGP: recipients' public keys (checked at import) and PGP/MIME encryption of
one recipient's copy (RFC 3156), with python-gnupg and the system's ``gpg``.

Keys: the key directory keeps each key (binary export, one per fingerprint), checked
by gpg when imported; copies are encrypted in this process (see `PgpEncryptor`); the
organisation's signature, when configured, is made by gpg (`PgpSigner`).

A key is accepted for an address only if it is not revoked or expired, has a valid
encryption-capable (sub)key, is RSA of at least 2048 bits or ECDH (Curve25519/NIST),
and one of its user ids is that address.

Every result is checked (an armored OpenPGP message, a signature); any failure -
including no ``gpg`` binary where gpg is needed - is a `PgpError`, and the caller
never sends the original instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gnupg
import pysequoia

from gateway.crypto.mime import SplitError, split
from gateway.errors import SealgateError

GPG_OPTIONS = [
    "--lock-never",
    "--no-auto-check-trustdb",
    "--no-autostart",
    "--no-random-seed-file",
    "--no-greeting",
    "--no-permission-warning",
    "--no-secmem-warning",
]
MIN_RSA_BITS = 2048
_RSA_ALGOS = {"1", "2", "3"}
_ECDH_ALGO = "18"
GPG_TIMEOUT = 120.0  # seconds for one encryption (a 50 MB message takes about 2 s)
NO_EXPIRY = 253402300799.0  # 9999-12-31: a key without an expiry date


class PgpError(SealgateError):
    """A key that cannot be used, or gpg that failed."""


@dataclass(frozen=True)
class PgpKey:
    fingerprint: str  # 40 hex digits, upper case as gpg prints it
    addresses: tuple[str, ...]  # from the user ids, lower case
    uid: str  # the first user id
    created: float
    expires: float
    material: bytes  # binary export of this key alone


def is_pgp(data: bytes) -> bool:
    """Armored, or a binary OpenPGP public-key packet (old or new format)."""
    return b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in data or (
        bool(data) and data[0] in (0x98, 0x99, 0x9A, 0xC6)
    )


def _gpg(home: Path) -> gnupg.GPG:
    try:
        return gnupg.GPG(gnupghome=str(home), options=list(GPG_OPTIONS))
    except (OSError, ValueError, RuntimeError) as e:  # no gpg binary, unusable home
        raise PgpError(f"gpg cannot run: {e}") from e


def read_keys(
    data: bytes, now: float | None = None, revoked: list[str] | None = None
) -> tuple[list[PgpKey], list[str]]:
    """The usable keys in ``data`` (armored or binary, one or more) and, for every key
    refused, the reason; the fingerprints of revoked keys are added to ``revoked``.
    Uses a throw-away GnuPG home: nothing is kept."""
    now = time.time() if now is None else now
    with tempfile.TemporaryDirectory(prefix="sealgate-pgp-") as tmp:
        home = Path(tmp)
        os.chmod(home, 0o700)
        gpg = _gpg(home)
        result = gpg.import_keys(data)
        if not result.fingerprints:
            raise ValueError("no OpenPGP public key in it")
        usable, refused = [], []
        for info in gpg.list_keys():
            name = (info.get("uids") or ["(no user id)"])[0]
            why = _refusal(info, now)
            if why:
                refused.append(f"{info['fingerprint']} {name}: {why}")
                if why == "revoked" and revoked is not None:
                    revoked.append(info["fingerprint"].lower())
                continue
            material = gpg.export_keys(info["fingerprint"], armor=False)
            if not isinstance(material, bytes) or not material:
                refused.append(f"{info['fingerprint']} {name}: could not be exported")
                continue
            usable.append(
                PgpKey(
                    fingerprint=info["fingerprint"],
                    addresses=_addresses(info.get("uids", [])),
                    uid=name,
                    created=float(info.get("date") or 0),
                    expires=float(info["expires"]) if info.get("expires") else NO_EXPIRY,
                    material=material,
                )
            )
        return usable, refused


def _refusal(info: dict[str, Any], now: float) -> str:
    validity = info.get("trust", "")
    if validity == "r":
        return "revoked"
    if validity == "e" or (info.get("expires") and float(info["expires"]) <= now):
        return "expired"
    if "E" not in info.get("cap", ""):
        return "no valid encryption key"
    candidates = [info] if "e" in info.get("cap", "") else []
    candidates += [
        sub
        for sub in info.get("subkey_info", {}).values()
        if "e" in sub.get("cap", "")
        and sub.get("trust") not in ("r", "e")
        and not (sub.get("expires") and float(sub["expires"]) <= now)
    ]
    if not candidates:
        return "no valid encryption key"
    for key in candidates:
        algo, bits = key.get("algo", ""), int(key.get("length") or 0)
        if (algo in _RSA_ALGOS and bits >= MIN_RSA_BITS) or algo == _ECDH_ALGO:
            return ""
    weak = _algo_name(candidates[0])
    return f"its encryption key is {weak}: RSA of 2048 bits or more, or ECDH, is needed"


def _algo_name(key: dict[str, Any]) -> str:
    algo, bits = key.get("algo", ""), key.get("length", "?")
    names = {"1": "RSA", "2": "RSA", "3": "RSA", "16": "ElGamal", "17": "DSA"}
    return f"{names.get(algo, 'algorithm ' + algo)} of {bits} bits"


_UID_ADDRESS = re.compile(r"<([^<>\s]+@[^<>\s]+)>\s*$")


def _addresses(uids: list[str]) -> tuple[str, ...]:
    """The mail address of each user id: ``Name <addr>``, or a bare ``addr``."""
    found = []
    for uid in uids:
        match = _UID_ADDRESS.search(uid)
        bare = uid.strip()
        if match:
            found.append(match.group(1).lower())
        elif "@" in bare and not any(c.isspace() for c in bare):
            found.append(bare.lower())
    return tuple(dict.fromkeys(found))


# -- encryption ---------------------------------------------------------------------------


class PgpEncryptor:
    """Encrypts copies: in this process with Sequoia-PGP (`pysequoia`) - about 0.2 to
    0.4 ms for 4 KB, where running gpg costs 2.5 ms of CPU just to start (measured:
    ``gpg --version`` alone) and held the PGP path under 200 messages/s on two cores -
    except large copies: pysequoia holds the interpreter lock while it works (a 25 MB
    copy stopped every other thread for 0.3 s), so copies over `LARGE` go to ``gpg
    --recipient-file`` in a subprocess, with an empty GnuPG home of the gateway's
    (the key is read from a file written from the directory, never imported).
    gpg (python-gnupg) checks every key at import in any case."""

    LARGE = 1024 * 1024

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self._certs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def certificate(self, fingerprint: str, material: bytes) -> Any:
        digest = hashlib.sha256(material).hexdigest()
        key = (fingerprint.upper(), digest)
        with self._lock:
            cert = self._certs.get(key)
        if cert is None:
            try:
                cert = pysequoia.Cert.from_bytes(material)
            except Exception as e:  # noqa: BLE001 - a Rust error of any kind
                raise PgpError(f"the stored key cannot be read: {str(e).splitlines()[0]}") from e
            if cert.fingerprint.upper() != fingerprint.upper():
                raise PgpError(f"the stored key is not {fingerprint}")
            with self._lock:
                if len(self._certs) > 10_000:
                    self._certs.clear()
                self._certs[key] = cert
        return cert

    def encrypt(
        self, message: bytes, fingerprint: str, material: bytes, signer: PgpSigner | None = None
    ) -> bytes:
        """The recipient's copy of ``message`` as PGP/MIME (CRLF); signed first by
        ``signer`` (RFC 3156 §6.1: ``multipart/signed`` inside the encryption)."""
        try:
            outer, entity = split(message)
        except SplitError as e:
            raise PgpError(str(e)) from e
        if signer is not None:
            entity = signer.sign(entity)
        cert = self.certificate(fingerprint, material)
        if len(entity) > self.LARGE:
            armored = self._gpg_encrypt(entity, fingerprint, material)
        else:
            try:
                armored = pysequoia.encrypt(recipients=[cert], bytes=entity)
            except Exception as e:  # noqa: BLE001 - e.g. no usable encryption subkey any more
                raise PgpError(f"not encrypted: {str(e).splitlines()[0]}") from e
        if not isinstance(armored, bytes) or not armored.startswith(b"-----BEGIN PGP MESSAGE-----"):
            raise PgpError("not encrypted: no OpenPGP message came out")
        return b"".join(outer) + pgp_mime(armored)

    def _gpg_encrypt(self, entity: bytes, fingerprint: str, material: bytes) -> bytes:
        home = self.work_dir / "gnupg"
        keys = self.work_dir / "keys"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_file = keys / f"{fingerprint.upper()}-{hashlib.sha256(material).hexdigest()[:16]}.gpg"
        if not key_file.exists():
            tmp = key_file.with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(material)
            os.replace(tmp, key_file)
        binary = shutil.which("gpg")
        if binary is None:
            raise PgpError("gpg cannot run: not found")
        args = [binary, "--homedir", str(home), "--batch", "--no-tty", "--quiet"]
        args += ["--status-fd", "2", *GPG_OPTIONS, "--armor", "--encrypt"]
        args += ["--recipient-file", str(key_file)]
        try:
            # close_fds=False lets Python use posix_spawn (no copy of this process);
            # every descriptor Python opens is non-inheritable anyway (PEP 446).
            done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
                args, input=entity, capture_output=True, timeout=GPG_TIMEOUT, close_fds=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PgpError(f"gpg cannot run: {e}") from e
        if done.returncode != 0 or b"[GNUPG:] END_ENCRYPTION" not in done.stderr:
            detail = done.stderr.decode("utf-8", "replace").strip()[-300:]
            raise PgpError(f"gpg did not encrypt (exit {done.returncode}): {detail}")
        return done.stdout


class PgpSigner:
    """The organisation's OpenPGP key (``pgp.signing_key_file``, an unprotected secret
    key), kept in a GnuPG home of its own; signs MIME entities (RFC 3156 §5)."""

    def __init__(self, home: Path, key_file: Path):
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home = home
        try:
            data = key_file.read_bytes()
        except OSError as e:
            raise PgpError(f"cannot read {key_file}: {e.strerror}") from None
        gpg = gnupg.GPG(gnupghome=str(home)) if shutil.which("gpg") else None
        if gpg is None:
            raise PgpError("gpg cannot run: not found")
        imported = gpg.import_keys(data)
        secret = [
            k
            for k in gpg.list_keys(secret=True)
            if k["fingerprint"] in (imported.fingerprints or [])
        ]
        if not secret:
            raise PgpError(f"{key_file} holds no OpenPGP secret key")
        self.fingerprint = secret[0]["fingerprint"]
        self._gpg = gpg

    def sign(self, entity: bytes) -> bytes:
        """``multipart/signed`` over the entity (its CRLF form, as RFC 3156 requires)."""
        result = self._gpg.sign(
            entity,
            keyid=self.fingerprint,
            detach=True,
            binary=False,
            extra_args=[
                "--digest-algo",
                "SHA256",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ],
        )
        signature = bytes(result.data)
        if not signature.startswith(b"-----BEGIN PGP SIGNATURE-----"):
            raise PgpError(f"gpg did not sign: {result.status or result.stderr[-300:]}")
        boundary = f"sealgate-s-{secrets.token_hex(12)}".encode()
        signature = re.sub(rb"\r?\n", b"\r\n", signature)
        return (
            b"Content-Type: multipart/signed; micalg=pgp-sha256;\r\n"
            b' protocol="application/pgp-signature"; boundary="' + boundary + b'"\r\n'
            b"\r\n"
            b"--" + boundary + b"\r\n" + entity + b"\r\n--" + boundary + b"\r\n"
            b'Content-Type: application/pgp-signature; name="signature.asc"\r\n'
            b"Content-Description: OpenPGP digital signature\r\n"
            b'Content-Disposition: attachment; filename="signature.asc"\r\n'
            b"\r\n" + signature + b"\r\n--" + boundary + b"--\r\n"
        )


def pgp_mime(armored: bytes) -> bytes:
    """The RFC 3156 ``multipart/encrypted`` entity around an armored message."""
    boundary = f"sealgate-{secrets.token_hex(12)}".encode()
    body = re.sub(rb"\r?\n", b"\r\n", armored)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="' + boundary + b'"\r\n'
        b"\r\n"
        b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n"
        b"\r\n"
        b"Version: 1\r\n"
        b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b"Content-Description: OpenPGP encrypted message\r\n"
        b'Content-Disposition: inline; filename="encrypted.asc"\r\n'
        b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n"
    )
