"""Connections ended the way hostile or crashed clients end them."""

from __future__ import annotations

import asyncio
import socket
import struct


def reset(writer: asyncio.StreamWriter) -> None:
    """Hang up with a TCP reset (SO_LINGER 0), as a crashed client's host does - not
    the FIN of a close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
