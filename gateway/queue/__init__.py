"""The queue: per-recipient state, scheduling, retries and expiry."""
