"""The library version, in a module of its own so that any layer can record it (checkpoints do)."""

__version__ = "0.1.0"
"""The version of flowmaps (recorded in every checkpoint and export)."""
