"""Envelopes for the state-store tests."""

from __future__ import annotations

from gateway.model import ClientInfo, Envelope, Recipient


def envelope(queue_id: str, *rcpts: str) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        received_at="2026-11-22T07:00:00+00:00",
        mail_from="s@clinic.test",
        mail_options=(),
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo(ip="127.0.0.1", port=1, helo="h"),
        size=1,
        sha256="0",
    )
