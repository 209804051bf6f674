"""The ``flowmaps`` command: :mod:`~flowmaps.cli.main` builds the parser and runs a command; each
command is a small module (``train``, which also distils, ``sample``, ``evaluate``, ``export``, ``demo``,
``fid_stats``, ``presets``) that reads its arguments and calls the :mod:`flowmaps.runs` that does the
work."""

from .main import console, main

__all__ = ["console", "main"]
