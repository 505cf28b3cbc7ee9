"""submit - the one way into the queue (Postfix's cleanup).

Every new message goes through a `Submitter`: the SMTP listener streams a client's
message into a `Submission`; the queue's DSNs and the portal's notifications, codes
and replies (and anything that submits mail later, such as an HTTP API) call
`Submitter.submit`.  Either way the message is made durable in the spool first
(`gateway.spool.store`: fsync, rename, fsync of the directory) and only then handed
on - with its bytes when they are in memory, so the queue need not read back what
it was just given (the file stays the durable copy).

What a message is for is its envelope's `Purpose`; nothing else tells the stages
after this one how to treat it.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from gateway.errors import SpoolError
from gateway.headers import header_is_ascii
from gateway.model import ClientInfo, Envelope, Purpose, Recipient
from gateway.spool.store import Spool, SpoolWriter, new_queue_id

# Told of every message made durable: its envelope, and its bytes when at hand.  It
# may return an awaitable: the message is acknowledged only once that completes
# (``cluster.ack: shared``: once it is in the shared store); if that fails, the
# message is removed again and the submission fails (`SpoolError`).
OnSubmitted = Callable[[Envelope, bytes | None], Awaitable[None] | None]


class Submit(Protocol):
    """`Submitter.submit`, as the stages that write mail of their own use it (the
    queue's DSNs, the portal's notifications, codes and replies)."""

    async def __call__(
        self,
        sender: str,
        recipients: Iterable[str],
        data: bytes,
        purpose: Purpose,
        extra: dict[str, Any] | None = None,
    ) -> str: ...


class Submission:
    """One message on its way in: written in pieces, then committed."""

    def __init__(self, writer: SpoolWriter, on_submitted: OnSubmitted):
        self._writer = writer
        self._on_submitted = on_submitted

    @property
    def queue_id(self) -> str:
        return self._writer.queue_id

    @property
    def size(self) -> int:
        return self._writer.size

    async def write(self, data: bytes) -> None:
        await self._writer.write(data)

    async def commit(self, make_envelope: Callable[[int, str], Envelope]) -> Envelope:
        """Make the message durable (`SpoolError` if it cannot be), then hand it on;
        returns only when it will survive a crash."""
        envelope = await self._writer.commit(make_envelope)
        handed = self._on_submitted(envelope, self._writer.message)
        if handed is not None:
            try:
                await handed
            except Exception as e:  # not acknowledged: it must not be delivered either
                spool = self._writer.spool
                await spool.run_io(spool.remove, envelope.queue_id, envelope.size)
                raise SpoolError(
                    f"{envelope.queue_id} not recorded in the shared store: {e}"
                ) from e
        return envelope

    async def abort(self) -> None:
        await self._writer.abort()

    def abort_soon(self) -> None:
        """`abort`, not waited for: from a caller being cancelled."""
        self._writer.abort_soon()


class Submitter:
    def __init__(self, spool: Spool, hostname: str, marker_header: str, on_submitted: OnSubmitted):
        self.spool = spool
        self.hostname = hostname
        self.marker_header = marker_header
        self.on_submitted = on_submitted

    def begin(self) -> Submission:
        """A message that arrives in pieces (the SMTP listener's DATA)."""
        return Submission(self.spool.writer(new_queue_id()), self.on_submitted)

    async def submit(
        self,
        sender: str,
        recipients: Iterable[str],
        data: bytes,
        purpose: Purpose,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A message Sealgate writes itself (a DSN, a portal notification, code or
        reply), made durable and queued; its queue id.  Its MAIL parameters are
        what its addresses and bytes need (`mail_options_for`)."""
        recipients = tuple(recipients)
        submission = self.begin()
        await submission.write(data)
        now = datetime.datetime.now(datetime.UTC)
        client = ClientInfo(ip="", port=0, helo=self.hostname, authorized_by="local")
        envelope = await submission.commit(
            lambda size, sha: Envelope(
                queue_id=submission.queue_id,
                received_at=now.isoformat(timespec="microseconds"),
                mail_from=sender,
                mail_options=mail_options_for(sender, recipients, data),
                recipients=tuple(Recipient(r) for r in recipients),
                client=client,
                size=size,
                sha256=sha,
                trace_headers=f"{self.marker_header}: {self.hostname}\r\n",
                purpose=purpose,
                extra=dict(extra or {}),
            )
        )
        return envelope.queue_id


def mail_options_for(sender: str, recipients: Iterable[str], data: bytes) -> tuple[str, ...]:
    """The MAIL parameters a message that came without a MAIL command needs
    (Sealgate's own, or one submitted through the API): SMTPUTF8 when an address or
    the header section is not ASCII (RFC 6531, RFC 6532: a header may name such an
    address only in UTF-8 - and without SMTPUTF8 the queue would set the message
    aside, as the listener refuses such an envelope), BODY=8BITMIME when its bytes
    are not all ASCII (RFC 6152)."""
    options: tuple[str, ...] = ()
    addresses = sender.isascii() and all(r.isascii() for r in recipients)
    if not (addresses and header_is_ascii(data)):
        options += ("SMTPUTF8",)
    if not data.isascii():
        options += ("BODY=8BITMIME",)
    return options
