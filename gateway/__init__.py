"""Sealgate: an encrypting SMTP relay gateway for regulated email."""

__version__ = "0.1.0"
