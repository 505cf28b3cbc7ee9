"""The HTTPS API listener (``api.listen``): everything that serves message content or
evidence to programs - the archive API (`gateway.archive.api`) - over TLS only."""
