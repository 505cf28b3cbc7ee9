"""Structured JSON logging (structlog) and address redaction.

One JSON object per line on standard output, with ``timestamp`` (UTC, ISO 8601),
``level`` and ``event`` (a name from `gateway.events`).  Subjects and bodies are never
passed to the logger; addresses go through `AddressRedactor`, which by default
replaces them with a keyed hash (HMAC-SHA256, first 16 hex digits) so that an admin
who knows an address can find its log lines (``sealgate hash-address``) while the
logs alone reveal nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys
from pathlib import Path
from typing import Literal

import structlog

from gateway.durable import write_file

REDACTED_KEEP = 4096  # addresses whose hash `AddressRedactor` keeps at most

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", cache_loggers: bool = True) -> None:
    """``cache_loggers``: each module's logger is built once, at its first use (a
    tenth of a millisecond per line otherwise); structlog's ``capture_logs`` needs it
    off."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=cache_loggers,
    )
    # aiosmtpd logs every command line through the stdlib: keep it out of our stream.
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


def write_private_file(path: Path, data: bytes) -> None:
    """A new secret file (mode 0600, its directory 0700), on disk before it is used;
    never overwrites one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(path, data, 0o600, replace=False)


def load_or_create_key(path: Path) -> bytes:
    """Read a 32-byte secret, creating it (mode 0600) on first use."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        write_private_file(path, key)
        return key
    if len(key) < 16:
        raise ValueError(f"{path}: key file is shorter than 16 bytes")
    return key


class AddressRedactor:
    """Turns a mail address into what the logs may show."""

    def __init__(self, mode: Literal["hash", "plain", "omit"], key: bytes = b""):
        if mode == "hash" and not key:
            raise ValueError("hash mode needs a key")
        self.mode = mode
        self._key = key
        # the hashes of the addresses seen last (a relay writes to the same ones
        # again and again: an HMAC a log line otherwise)
        self._hashed: dict[str, str] = {}

    def __call__(self, address: str) -> str | None:
        if self.mode == "plain":
            return address
        if self.mode == "omit":
            return None
        hashed = self._hashed.get(address)
        if hashed is None:
            if len(self._hashed) >= REDACTED_KEEP:
                self._hashed.clear()
            hashed = self._hashed[address] = hash_address(self._key, address)
        return hashed


def hash_address(key: bytes, address: str) -> str:
    digest = hmac.new(
        key, address.strip().lower().encode("utf-8", "surrogateescape"), hashlib.sha256
    ).hexdigest()
    return "h:" + digest[:16]
