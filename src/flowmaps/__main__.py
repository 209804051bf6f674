"""``python -m flowmaps`` is the ``flowmaps`` command."""

import sys

from .cli import main

sys.exit(main())
