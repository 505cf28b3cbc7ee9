"""Delivery: route to the recipient's mail servers and enforce TLS at connect time."""
