"""Transforms of a recipient copy: S/MIME, PGP/MIME; the key directory."""
