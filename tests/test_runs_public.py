"""The public names of ``flowmaps.runs`` are imported on first use (PEP 562): ``import flowmaps.runs``
stays as light as ``import flowmaps`` (no training, evaluation or plotting module, no matplotlib), and
each name, once asked for, is the object of the module it lives in. Their docstrings and API reference
entries are checked by ``tests/test_docs.py``."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowmaps.runs as runs

ROOT = Path(__file__).resolve().parent.parent


def test_importing_runs_imports_none_of_its_heavy_modules():
    code = ("import json, sys; import flowmaps.runs as r; before = sorted(sys.modules); r.run_training; "
            "print(json.dumps([before, sorted(sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    before, after = json.loads(done.stdout)
    heavy = ("flowmaps.runs.training", "flowmaps.runs.evaluate", "flowmaps.runs.evaluation",
             "flowmaps.runs.plotting", "flowmaps.runs.latents", "flowmaps.runs.posthoc_ema", "matplotlib")
    assert not set(heavy) & set(before), set(heavy) & set(before)
    assert "flowmaps.runs.training" in after


def test_each_public_name_is_its_modules_object():
    for module_name, names in runs._HOME.items():
        module = importlib.import_module(f"flowmaps.runs.{module_name}")
        for name in names:
            assert getattr(runs, name) is getattr(module, name), name
            assert name in dir(runs)
    assert sorted(runs.__all__) == sorted(runs._MODULE_OF)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        runs.nothing  # noqa: B018


def test_no_public_name_is_shadowed_by_a_module_of_the_package():
    """Importing ``flowmaps.runs.X`` sets the package's attribute ``X`` to the module: a public name
    ``X`` would then stop being the object ``__all__`` promises."""
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(runs.__path__)}
    assert not modules & set(runs.__all__)


def test_the_static_imports_match_the_lazy_ones():
    """The ``if TYPE_CHECKING:`` imports (what griffe and type checkers read) name the same objects,
    from the same modules, as the lazy table."""
    tree = ast.parse(Path(runs.__file__).read_text(encoding="utf-8"))
    guarded = next(node for node in tree.body if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING")
    static = {alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    assert static == runs._MODULE_OF
