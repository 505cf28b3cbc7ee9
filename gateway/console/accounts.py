"""accounts - the console's local accounts: an Argon2id password and a TOTP second
factor (RFC 6238: 30 s steps, 6 digits, SHA-1 - what authenticator apps use), for
small sites and break-glass access when the identity provider is down.

A sign-in needs the name, the password and the current code together; the answer
never says which of them was wrong.  A code is accepted one step either side of now
(clock drift) and only once (`ConsoleStore.check` keeps the last step used).
Passwords follow NIST SP 800-63B-4 within MFA: at least `MIN_PASSWORD` characters,
no composition rules; a generated one is 24 random characters.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from collections.abc import Callable

import pyotp

from gateway.config import CONSOLE_ROLES
from gateway.console.store import User
from gateway.portal.credentials import MAX_SECRET, hash_secret, verify_secret

MIN_PASSWORD = 12
STEP = 30
ISSUER = "Sealgate console"


@functools.cache
def _nobody() -> str:
    """A stand-in hash for names that have no account: the same Argon2id work is done
    for them, so the time taken does not tell which names exist."""
    return hash_secret(secrets.token_urlsafe(16))


def new_password() -> str:
    return secrets.token_urlsafe(18)


def password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_SECRET:
        return f"a password has at most {MAX_SECRET} characters"
    if len(set(password)) < 4:
        return "that password is too easy to guess"
    return None


def check_roles(roles: list[str]) -> tuple[str, ...]:
    """The roles, each once, in a fixed order (ValueError: an unknown one, or none)."""
    unknown = [r for r in roles if r not in CONSOLE_ROLES]
    if unknown or not roles:
        raise ValueError(f"roles are {', '.join(CONSOLE_ROLES)} (got {', '.join(roles) or 'none'})")
    return tuple(r for r in CONSOLE_ROLES if r in roles)


def new_totp() -> str:
    """A 160-bit base32 TOTP secret."""
    return pyotp.random_base32()


def provisioning_uri(name: str, secret: str) -> str:
    """The otpauth:// URI an authenticator app reads (as a QR code, or typed in)."""
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=ISSUER)


def totp_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step whose code ``code`` is (now, or one either side), or None."""
    code = code.strip().replace(" ", "")
    if not (len(code) == 6 and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    step = int((time.time() if now is None else now) // STEP)
    for candidate in (step, step - 1, step + 1):
        if hmac.compare_digest(totp.at(candidate * STEP), code):
            return candidate
    return None


def matcher(
    password: str, code: str, secret_of: Callable[[str], str | None], now: float | None = None
) -> Callable[[User | None], int | None]:
    """What `ConsoleStore.check` asks: the step of a right password and code."""

    def right(user: User | None) -> int | None:
        if user is None:
            verify_secret(_nobody(), password)
            return None
        password_right = verify_secret(user.password, password)
        secret = secret_of(user.name)
        step = totp_step(secret, code, now) if secret else None
        return step if password_right else None

    return right
