"""oidc - a portal recipient signs in with an OpenID Connect provider (``portal.auth:
oidc``): the authorization code flow with PKCE (S256), a nonce and a state kept on
the server and bound to the browser, the ID token verified here (signature against
the provider's published keys, ``iss`` exactly, ``aud``/``azp``, ``exp``/``iat``
with 60 s leeway, ``nonce``), and the recipient accepted only when the token's
email is the recipient address and the provider says it verified it
(``email_verified``), within the provider's ``domains`` when listed.

The HTTP client is aiohttp's (no redirects followed, 1 MiB and 10 s per request);
the JWT work is joserfc's.  An issuer must be HTTPS, except on loopback (tests and
a provider on the same host).  Discovery and keys are cached for an hour; an ID
token signed by a key not yet known fetches the keys once more (rotation).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway.config import OidcProviderConfig
from gateway.errors import SealgateError

ALGORITHMS = ["RS256", "PS256", "ES256", "EdDSA"]
CACHE_SECONDS = 3600.0
LEEWAY = 60
MAX_RESPONSE = 1024 * 1024
TIMEOUT = 10.0


class OidcError(SealgateError):
    """The sign-in did not prove the recipient's address; the message says why (for
    logs and the access record; the recipient gets a plain page)."""


@dataclass(frozen=True)
class Started:
    """What to keep on the server for the callback, and where to send the browser."""

    url: str
    state: str
    nonce: str
    verifier: str


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class OidcClient:
    def __init__(self, provider: OidcProviderConfig, tls: ssl.SSLContext):
        self.provider = provider
        self.issuer = provider.issuer  # compared exactly (OIDC Discovery 4.3)
        self.tls = tls
        self._secret: str | None = None
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, KeySet] | None = None

    # -- HTTP ------------------------------------------------------------------------

    async def _request(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        if not url.startswith("https://") and not is_loopback_url(url):
            raise OidcError(f"{url}: the provider must be reached over HTTPS")
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, url, allow_redirects=False, ssl=self.tls, **kw) as r,
            ):
                body = await r.content.read(MAX_RESPONSE + 1)
                if len(body) > MAX_RESPONSE:
                    raise OidcError(f"{url}: answer larger than {MAX_RESPONSE} bytes")
                if r.status != 200:
                    raise OidcError(f"{url} answered HTTP {r.status}: {body[:200]!r}")
                value = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise OidcError(f"cannot reach {url}: {e}") from None
        except ValueError:
            raise OidcError(f"{url} did not answer JSON") from None
        if not isinstance(value, dict):
            raise OidcError(f"{url} did not answer a JSON object")
        return value

    async def metadata(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._metadata is None or self._metadata[0] < now:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            found = await self._request("GET", url)
            if found.get("issuer") != self.issuer:
                raise OidcError(
                    f"the provider names itself {found.get('issuer')!r}, not {self.issuer!r}"
                )
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(found.get(key), str):
                    raise OidcError(f"the provider's metadata has no {key}")
            self._metadata = (now + CACHE_SECONDS, found)
        return self._metadata[1]

    async def _key_set(self, refresh: bool = False) -> KeySet:
        now = time.monotonic()
        if refresh or self._keys is None or self._keys[0] < now:
            jwks = await self._request("GET", (await self.metadata())["jwks_uri"])
            try:
                keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            except (JoseError, ValueError, KeyError, TypeError) as e:
                raise OidcError(f"the provider's keys cannot be read: {e}") from None
            self._keys = (now + CACHE_SECONDS, keys)
        return self._keys[1]

    def _client_secret(self) -> str:
        if self._secret is None:
            path = self.provider.client_secret_file
            self._secret = path.read_text(encoding="utf-8").strip() if path else ""
        return self._secret

    # -- the flow --------------------------------------------------------------------

    async def start(
        self, redirect_uri: str, login_hint: str | None = None, scope: str = "openid email"
    ) -> Started:
        meta = await self.metadata()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)
        challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
        query = urlencode(
            {
                "response_type": "code",
                "response_mode": "query",
                "client_id": self.provider.client_id,
                "redirect_uri": redirect_uri,
                "scope": scope,
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                **({"login_hint": login_hint} if login_hint else {}),
                "prompt": "login",
            }
        )
        endpoint = meta["authorization_endpoint"]
        return Started(
            f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", state, nonce, verifier
        )

    async def finish(
        self, code: str, redirect_uri: str, nonce: str, verifier: str
    ) -> dict[str, Any]:
        """Trade the code for tokens and return the ID token's verified claims."""
        meta = await self.metadata()
        secret = self._client_secret()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        headers = {}
        if secret:  # client_secret_basic: each part form-encoded first (RFC 6749 2.3.1)
            pair = f"{quote_plus(self.provider.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.provider.client_id
        tokens = await self._request("POST", meta["token_endpoint"], data=form, headers=headers)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the provider returned no ID token")
        return await self.verify(id_token, nonce)

    async def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            token = jwt.decode(id_token, await self._key_set(), algorithms=ALGORITHMS)
        except JoseError as e:
            if "key" not in str(e).lower():
                raise OidcError(f"the ID token does not verify: {e}") from None
            try:  # a key we do not know yet: the provider may have rotated its keys
                token = jwt.decode(
                    id_token, await self._key_set(refresh=True), algorithms=ALGORITHMS
                )
            except JoseError as again:
                raise OidcError(f"the ID token does not verify: {again}") from None
        claims = dict(token.claims)
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.provider.client_id},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as e:
            raise OidcError(f"the ID token's claims are not valid: {e}") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.provider.client_id:
            raise OidcError("the ID token is for several audiences and not authorized for us")
        return claims

    def verified_email(self, claims: dict[str, Any]) -> str | None:
        """The email the provider vouches for: present, verified - ``email_verified``
        (OIDC Core 5.1, Google), or Microsoft Entra ID's ``xms_edov`` (the domain's
        owner is verified; Entra sends no ``email_verified``) - and within the
        provider's ``domains`` when it lists some."""
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            return None
        verified = claims.get("email_verified") in (True, "true") or claims.get("xms_edov") in (
            True,
            "true",
            1,
            "1",
        )
        if not verified:
            return None
        domain = email.rpartition("@")[2].lower()
        if self.provider.domains and not any(p.matches(domain) for p in self.provider.domains):
            return None
        return email
