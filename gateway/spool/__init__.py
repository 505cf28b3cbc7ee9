"""The durable spool: accepted messages on disk before anyone is told "250"."""

from gateway.spool.store import Spool, SpoolWriter, new_queue_id

__all__ = ["Spool", "SpoolWriter", "new_queue_id"]
