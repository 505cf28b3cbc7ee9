"""The compliance archive: journal, encryption at rest, tamper-evident log."""
