"""Logs, metrics and the ops HTTP listener."""
