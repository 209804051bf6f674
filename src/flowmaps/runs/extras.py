"""Optional extras: what a plain ``pip install flowmaps`` lacks, checked before a command writes
anything. The main job (train, distil, sample, export) runs without any extra; matplotlib figures
are then skipped with one warning, and a command that needs an extra (``evaluate`` and ``demo``: POT
and matplotlib; ``train.logger=tensorboard``) stops with one line naming it."""

from __future__ import annotations

import importlib
import sys

from .config import ConfigError

__all__ = ["missing", "require", "plots_available", "warn_no_plots", "EVAL_EXTRA", "EVAL_MODULES"]

EVAL_EXTRA = "pip install 'flowmaps[eval]'"
EVAL_MODULES = {"matplotlib": "matplotlib", "ot": "POT"}  # evaluate and demo: figures, exact W2


def missing(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported here."""
    absent = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


def require(what: str, modules: dict[str, str], extra: str) -> None:
    """Stop with one line when one of ``modules`` (import name → package name) is missing:
    ``{what} needs <packages>, an optional extra: <extra>``."""
    absent = [modules[name] for name in missing(*modules)]
    if absent:
        raise ConfigError(f"{what} needs {' and '.join(absent)}, an optional extra: {extra}")


def plots_available() -> bool:
    return not missing("matplotlib")


def warn_no_plots(what: str) -> None:
    print(f"flowmaps: warning: matplotlib is not installed: no {what} ({EVAL_EXTRA} for the "
          "figures)", file=sys.stderr)
