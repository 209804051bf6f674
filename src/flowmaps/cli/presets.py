"""``flowmaps presets``: list the shipped presets, or print one fully resolved."""

from __future__ import annotations

from ..runs.config import dump_config, list_presets, load_config


def cmd_presets(args) -> int:
    if args.show:
        overrides = [f"objective.name={args.objective}"] if args.objective else []
        print(dump_config(load_config(args.show, None, overrides)), end="")
    else:
        for name in list_presets():
            print(name)
    return 0
