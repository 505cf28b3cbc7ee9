"""The accepting side: the inbound SMTP listener (aiosmtpd)."""
