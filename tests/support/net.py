"""Connections ended the way hostile or crashed clients end them."""

from __future__ import annotations

import asyncio
import socket
import struct


def abort(transport: asyncio.Transport) -> None:
    """``transport.abort()``, also for an asyncio TLS transport closed before: the
    asyncio of Debian 12's python3.11 (3.11.2) raises AttributeError there, its TLS
    layer already let go of (3.11.7 checks for that) - nothing is left to abort."""
    try:
        transport.abort()
    except AttributeError:
        if not transport.is_closing():
            raise


def reset(writer: asyncio.StreamWriter) -> None:
    """Hang up with a TCP reset (SO_LINGER 0), as a crashed client's host does - not
    the FIN of a close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    abort(writer.transport)
