"""Key stores: where the probe learns of a recipient's S/MIME certificate or PGP key.

The interface the policy engine's facts come from.  The stores: the key directory
managed with ``sealgate keys`` (`gateway.crypto.keydir.DirectoryKeyStore`), with WKD
discovery in front of it when ``wkd.enabled`` (`gateway.probe.wkd.WkdKeyStore`);
`NoKeys` knows none (then no recipient is decided for S/MIME or PGP).

A store answers for one address at a time, returns only keys it would encrypt to
(valid now, suitable for encryption, bound to that address), and never raises for
what it does not know: a failure is `KnownKeys.error`, and means "no key" (the
decision then moves on to another secure mode, never to plaintext).
"""

from __future__ import annotations

from typing import Protocol

from gateway.probe.facts import KeyInfo, KnownKeys


class KeyStore(Protocol):
    async def lookup(self, address: str) -> KnownKeys:
        """The keys to use for ``address`` now (`KnownKeys`; never raises)."""
        ...

    async def material(self, info: KeyInfo) -> bytes | None:
        """The key itself (an S/MIME certificate as DER, a PGP key as binary), or None
        when it is gone (removed since the lookup)."""
        ...

    async def discover(self, address: str) -> KnownKeys:
        """Like `lookup`, after looking further (WKD) where the store can."""
        ...


class NoKeys:
    async def lookup(self, address: str) -> KnownKeys:
        return KnownKeys()

    async def material(self, info: KeyInfo) -> bytes | None:
        return None

    async def discover(self, address: str) -> KnownKeys:
        return KnownKeys()
