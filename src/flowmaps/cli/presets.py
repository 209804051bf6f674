"""``flowmaps presets``: list the shipped presets, or print one fully resolved."""

from __future__ import annotations

from ..runs.config import dump_config, list_presets, load_config


def cmd_presets(args) -> int:
    if args.show:
        print(dump_config(load_config(args.show)), end="")
    else:
        for name in list_presets():
            print(name)
    return 0
