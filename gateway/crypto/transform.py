"""transform - make a recipient's own copy of a message: the one step between the
policy's decision and the SMTP client.

`CopyMaker` turns the message as received into what is sent:

- ``encrypt``: an S/MIME (`gateway.crypto.smime`) or PGP/MIME (`gateway.crypto.pgp`)
  copy for one recipient's key, signed with the organisation's key when configured
  (``smime.signing_*``, ``pgp.signing_key_file``);
- ``signed``: a changed copy loses the original DKIM signature (it would fail) and is
  signed with the key of its From domain (``dkim.keys``, else ``dkim.domain``'s);
  an unchanged one goes as it is (or signed too under ``dkim.sign: all``);
- tag removal (the policy's ``strip_tags``) is `gateway.policy.features`'s, applied
  by the caller before either.

How it fails: ``encrypt`` raises `KeyUnusable` (the key cannot be used now: expired,
refused by the checks) or `EncryptFailed` (the encryption itself failed); nothing is
sent then, and the caller moves the recipient to its next mode.  A copy that cannot
be DKIM-signed (no From field, no key for its domain) goes out unsigned, logged and
counted.  Large copies, signing and
gpg subprocesses run in this step's own threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from cryptography import x509

from gateway.config import Config
from gateway.crypto import dkim, smime
from gateway.crypto.certs import CertificateError, check
from gateway.crypto.pgp import PgpEncryptor, PgpError, PgpSigner
from gateway.crypto.signers import DkimKeys, Signer, dkim_keys, load_signer
from gateway.errors import ConfigError, SealgateError
from gateway.events import Event
from gateway.layout import StateLayout
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.probe.facts import KeyInfo

log = get_logger("gateway.crypto")
T = TypeVar("T")

# a smaller copy takes well under a millisecond: no thread hand-off
IN_THREAD_ABOVE = 32 * 1024


class KeyUnusable(SealgateError):
    """The recipient's key cannot be used now (expired, refused by the checks)."""


class EncryptFailed(SealgateError):
    """Encrypting the copy failed (the library or gpg refused it)."""


class CopyMaker:
    def __init__(self, state_dir: Path, metrics: Metrics | None = None):
        # three at once: a gpg subprocess waits on its pipes
        self._threads = ThreadPoolExecutor(3, thread_name_prefix="crypto")
        self._pgp = PgpEncryptor(StateLayout(state_dir).pgp_home)
        self._state_dir = state_dir
        self._certs: dict[bytes, x509.Certificate] = {}
        self._smime_signer: Signer | None = None
        self._smime_subject: str | None = None
        self._pgp_signer: PgpSigner | None = None
        self._dkim = DkimKeys({}, None)
        self._dkim_all = False
        self._metrics = metrics

    def configure(self, config: Config) -> None:
        """Take the signing keys from ``config`` (start, SIGHUP); a key that does not
        load raises `ConfigError` before anything changes."""
        pgp_signer = None
        if config.pgp.signing_key_file is not None:
            try:
                home = StateLayout(self._state_dir).pgp_signing_home
                pgp_signer = PgpSigner(home, config.pgp.signing_key_file)
            except PgpError as e:
                raise ConfigError("pgp.signing_key_file", str(e)) from None
        sm = config.smime
        signer = None
        if sm.signing_cert_file is not None and sm.signing_key_file is not None:
            signer = load_signer(sm.signing_cert_file, sm.signing_key_file)
        dkim_signing = dkim_keys(config)
        # everything that can fail has been read: from here on, nothing raises
        self._pgp_signer, self._dkim, self._dkim_all = (
            pgp_signer,
            dkim_signing,
            (config.dkim.sign == "all"),
        )
        self._smime_signer, self._smime_subject = signer, sm.subject

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def signs(self, smime_copy: bool) -> bool:
        """Whether an S/MIME (or else a PGP) copy is signed by the organisation."""
        return (self._smime_signer if smime_copy else self._pgp_signer) is not None

    async def _run(self, work: Callable[[], T], in_thread: bool) -> T:
        if not in_thread:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    async def encrypt_smime(self, plain: bytes, certificate_der: bytes) -> bytes:
        try:
            cert = self._certificate(certificate_der)
        except (CertificateError, ValueError) as e:
            raise KeyUnusable(str(e)) from None
        work = functools.partial(
            smime.encrypt, plain, cert, signer=self._smime_signer, subject=self._smime_subject
        )
        try:
            return await self._run(
                work, len(plain) > IN_THREAD_ABOVE or self._smime_signer is not None
            )
        except (ValueError, CertificateError) as e:
            raise KeyUnusable(str(e)) from None
        except (smime.SmimeError, OSError) as e:
            raise EncryptFailed(str(e)) from None

    async def encrypt_pgp(self, plain: bytes, info: KeyInfo, material: bytes) -> bytes:
        if info.not_after and _expired(info.not_after):
            raise KeyUnusable(f"expired on {info.not_after[:10]}")
        work = functools.partial(
            self._pgp.encrypt, plain, info.fingerprint, material, self._pgp_signer
        )
        # in-process, a fraction of a millisecond for a small copy; larger ones, and
        # signing, in a thread (over 1 MiB: a gpg subprocess)
        try:
            return await self._run(
                work, len(plain) > IN_THREAD_ABOVE or self._pgp_signer is not None
            )
        except (ValueError, CertificateError) as e:
            raise KeyUnusable(str(e)) from None
        except (PgpError, OSError) as e:
            raise EncryptFailed(str(e)) from None

    def has_aligned_key(self, message: bytes) -> bool:
        """Whether a changed copy of ``message`` would be signed by its From domain
        (the From field is parsed only when there are keys per domain to match)."""
        if not self._dkim.by_domain:
            return False
        return self._dkim.aligned(dkim.author_domain(message)) is not None

    async def signed(self, copy: bytes, changed: bool) -> bytes:
        """A changed copy without the original DKIM signature (it would fail), signed
        with the key of its From domain (or ``dkim.domain``'s) when there is one; an
        unchanged one as it is (or signed too under ``dkim.sign: all``)."""
        if changed:
            copy = dkim.without_signatures(copy)
        if not self._dkim or not (changed or self._dkim_all):
            return copy
        author = dkim.author_domain(copy)
        key = self._dkim.aligned(author)
        result = "aligned"
        if key is None:
            key, result = self._dkim.fallback, "fallback"
        if key is None:
            self._count("no_key")
            log.warning(Event.DKIM_NOT_SIGNED, reason="no key for the From domain", domain=author)
            return copy
        try:
            if len(copy) > IN_THREAD_ABOVE:
                signature = await asyncio.to_thread(dkim.sign, copy, key)
            else:
                signature = dkim.sign(copy, key)
        except dkim.DkimError as e:  # e.g. no From field: it goes out unsigned
            self._count("error")
            log.warning(Event.DKIM_NOT_SIGNED, reason=str(e)[:300], domain=author)
            return copy
        self._count(result)
        return signature + copy

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.dkim_copies.labels(result).inc()

    def _certificate(self, der: bytes) -> x509.Certificate:
        """The certificate, parsed and checked once; its validity period checked at
        every use (CertificateError when it cannot be used now)."""
        cert = self._certs.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            check(cert)
            if len(self._certs) > 10_000:
                self._certs.clear()
            self._certs[der] = cert
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise CertificateError(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return cert


def _expired(not_after: str) -> bool:
    when = datetime.datetime.fromisoformat(not_after)
    return when <= datetime.datetime.now(datetime.UTC)
