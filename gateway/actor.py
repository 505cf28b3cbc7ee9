"""Who runs a command-line tool, for the archive's and the portal's access records.

The operating-system account of the process (its real user id, not ``$USER`` or
``$LOGNAME``, which anyone can set) and, under sudo, the account that ran sudo
(``SUDO_USER``): ``alice@cli``, ``root@cli (sudo: alice)``.  ``--actor`` adds a note
beside it (a case number, a ticket), never instead of it.
"""

from __future__ import annotations

import os
import pwd


def cli_actor(note: str | None = None, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    actor = f"{name}@cli"
    sudo = env.get("SUDO_USER")
    if sudo and sudo != name and "SUDO_UID" in env:
        actor += f" (sudo: {_printable(sudo)})"
    if note:
        actor += f" (note: {_printable(note)})"
    return actor


def _printable(text: str) -> str:
    """At most 200 printable characters: the access record is read by people."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
