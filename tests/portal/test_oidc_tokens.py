"""The ID token checks of the portal's OpenID Connect client, one by one: a token
signed by the provider's key for us, with our nonce, in time, is accepted; a wrong
issuer, audience, nonce, an expired token, another key's signature, an unknown
algorithm, several audiences without azp are not; the email counts only when
verified and within the provider's domains."""

from __future__ import annotations

import math
import ssl
import time

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from gateway.config import OidcProviderConfig, parse_domain_pattern
from gateway.portal.oidc import OidcClient, OidcError

ISSUER = "https://idp.example.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1"})


def client(domains=()) -> OidcClient:
    provider = OidcProviderConfig(
        name="idp",
        issuer=ISSUER,
        client_id="portal",
        domains=tuple(parse_domain_pattern(d) for d in domains),
    )
    c = OidcClient(provider, ssl.create_default_context())
    # the provider's published keys, as a fetch would have cached them
    c._keys = (math.inf, KeySet.import_key_set(KeySet([KEY]).as_dict(private=False)))
    return c


def token(key=KEY, alg="RS256", **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "portal", "iat": now, "exp": now + 300, "nonce": "n1"}
    body.update(claims)
    return jwt.encode(
        {"alg": alg, "kid": "k1"}, {k: v for k, v in body.items() if v is not None}, key
    )


async def test_a_good_token_is_accepted():
    claims = await client().verify(token(email="p@plain.test", email_verified=True), "n1")
    assert claims["email"] == "p@plain.test"


@pytest.mark.parametrize(
    "bad",
    [
        {"iss": "https://evil.example.test"},
        {"aud": "someone-else"},
        {"nonce": "replayed"},
        {"nonce": None},
        {"exp": int(time.time()) - 3600},
        {"iat": None},
        {"aud": ["portal", "other"]},  # several audiences and no azp
    ],
)
async def test_claims_that_do_not_hold_are_refused(bad):
    with pytest.raises(OidcError):
        await client().verify(token(**bad), "n1")


async def test_another_keys_signature_and_symmetric_algorithms_are_refused():
    with pytest.raises(OidcError):
        await client().verify(token(key=OTHER), "n1")
    forged = jwt.encode(
        {"alg": "HS256", "kid": "k1"},
        {
            "iss": ISSUER,
            "aud": "portal",
            "exp": int(time.time()) + 60,
            "iat": int(time.time()),
            "nonce": "n1",
        },
        OctKey.import_key(b"x" * 32),
    )
    c = client()
    c._keys = (math.inf, KeySet([OctKey.import_key(b"x" * 32)]))  # even with such a key
    with pytest.raises(OidcError):
        await c.verify(forged, "n1")


def test_the_email_counts_only_when_verified_and_within_the_domains():
    c = client(domains=["plain.test"])
    assert c.verified_email({"email": "p@plain.test", "email_verified": True}) == "p@plain.test"
    assert c.verified_email({"email": "p@plain.test", "email_verified": False}) is None
    assert c.verified_email({"email": "p@plain.test"}) is None
    assert c.verified_email({"email": "p@other.test", "email_verified": True}) is None
    # Microsoft Entra ID says a verified domain owner with xms_edov (the optional claim)
    assert c.verified_email({"email": "p@plain.test", "xms_edov": True}) == "p@plain.test"
    assert c.verified_email({"email": "p@plain.test", "xms_edov": False}) is None
