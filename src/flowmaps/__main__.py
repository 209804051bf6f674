"""``python -m flowmaps`` is the ``flowmaps`` command."""

from .cli import console

console()
