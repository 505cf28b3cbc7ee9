"""credentials - how a portal recipient proves who they are, and the secrets kept
for it.

``portal.auth`` (and a policy rule's ``portal_auth``; the strongest of the matching
rules wins) picks one of, from weakest to strongest:

- ``code``: a one-time code mailed to the recipient.  It protects against a
  forwarded link, not against someone who reads the recipient's mail path - the
  link travels the same way;
- ``password``: at first pickup the recipient proves the address with a code and
  sets a password; later messages to that address need the password.  A reset needs
  a code again, is recorded and limited to `RESETS_PER_DAY`;
- ``passphrase``: the sender sets a passphrase for the message (a header the gateway
  removes on acceptance) and tells the recipient another way; nothing derived from
  it is in the notification;
- ``oidc``: the recipient signs in with an OpenID Connect provider from
  ``portal.oidc_providers`` whose verified email is the recipient address.

Passwords and passphrases are kept only as Argon2id hashes (OWASP: 19 MiB, 2
passes, 1 lane); a password must have at least `MIN_PASSWORD` characters (NIST SP
800-63B-4 for a password that is the only factor) and is checked against a short
list of the most common ones and the recipient's own address.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD = 15
MAX_SECRET = 256  # characters: a bound on the hashing work one request can ask for
RESETS_PER_DAY = 3

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# The most used long passwords (breach corpora); a full blocklist is the operator's
# identity provider's job - this stops the obvious.
_COMMON = {
    "passwordpassword",
    "password12345678",
    "123456789012345",
    "1234567890123456",
    "qwertyuiopasdfgh",
    "qwertyuiopasdfghjkl",
    "aaaaaaaaaaaaaaa",
    "iloveyouiloveyou",
    "letmeinletmein1",
    "changemechangeme",
}


def hash_secret(secret: str) -> str:
    """An Argon2id hash (PHC string) of a password or passphrase."""
    return _HASHER.hash(secret[:MAX_SECRET])


def verify_secret(encoded: str, secret: str) -> bool:
    """Constant-time (by construction of Argon2) check of ``secret``; False for a
    malformed hash as well."""
    if len(secret) > MAX_SECRET:
        return False
    try:
        return _HASHER.verify(encoded, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_problem(password: str, address: str) -> str | None:
    """Why ``password`` cannot be the recipient's password, or None."""
    if len(password) < MIN_PASSWORD:
        return f"Please choose a password of at least {MIN_PASSWORD} characters."
    if len(password) > MAX_SECRET:
        return f"Please choose a password of at most {MAX_SECRET} characters."
    folded = password.casefold()
    local = address.partition("@")[0].casefold()
    if folded in _COMMON or len(set(folded)) < 4:
        return "That password is too easy to guess. Please choose another."
    if address.casefold() in folded or (len(local) >= 4 and local in folded):
        return "Please do not use your email address in your password."
    return None
