"""``sealgate api key NAME --scopes send,read-status [--expires YYYY-MM-DD]``: a new
key for the message API, and the ``api.keys`` entry that admits it (only its SHA-256
is kept: the key is shown once)."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from typing import Any

import yaml

from gateway.api.keys import new_key
from gateway.config import API_SCOPES


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    api = sub.add_parser("api", help="the message API (api.keys)")
    asub = api.add_subparsers(dest="api_command", required=True, metavar="ACTION")
    key = asub.add_parser("key", help="make a key and print its api.keys entry")
    key.add_argument("name", help="who holds it (recorded with every call)")
    key.add_argument(
        "--scopes", required=True, help=f"comma-separated, of: {', '.join(API_SCOPES)}"
    )
    key.add_argument("--expires", default=None, help="last day it works, YYYY-MM-DD (UTC)")


def key(name: str, scopes_text: str, expires: str | None) -> int:
    scopes = [s.strip() for s in scopes_text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in API_SCOPES]
    if not scopes or unknown:
        print(f"sealgate: scopes are among: {', '.join(API_SCOPES)}", file=sys.stderr)
        return 2
    if expires is not None:
        try:
            datetime.date.fromisoformat(expires)
        except ValueError:
            print(f"sealgate: --expires {expires!r} is not YYYY-MM-DD", file=sys.stderr)
            return 2
    secret, digest = new_key()
    entry = {"name": name, "scopes": scopes, "key_sha256": digest, "expires": expires}
    print(f"key: {secret}")
    print("(shown once; give it to the application, and add to api.keys:)")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0
