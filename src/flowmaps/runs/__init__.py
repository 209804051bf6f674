"""Runs: what the command line does, as a library.

:mod:`~flowmaps.runs.config` typed configs and the shipped presets (each value checked by
:mod:`~flowmaps.runs.typed`, the values together by :mod:`~flowmaps.runs.validation`);
:mod:`~flowmaps.runs.models` builds a run's network and saves and loads models (checkpoints and
exports); :mod:`~flowmaps.runs.experiment` assembles the rest of a run (data, teacher, objective);
:mod:`~flowmaps.runs.rundir` the run directory; :mod:`~flowmaps.runs.training`
trains or distils into one (``flowmaps train``, ``distill``); :mod:`~flowmaps.runs.evaluation` measures
quality versus cost (vectors and images, with the image reference statistics) and
:mod:`~flowmaps.runs.evaluate` evaluates checkpoints into a run directory (``flowmaps evaluate``);
:mod:`~flowmaps.runs.plotting` draws the figures. :mod:`~flowmaps.runs.export` loads any model path
(:func:`flowmaps.load`) and exports a run's map (``flowmaps export``); :mod:`~flowmaps.runs.posthoc_ema`
reconstructs power-function averages after training (``flowmaps ema``); :mod:`~flowmaps.runs.grid_tuning`
tunes a run's time grids (``flowmaps tune-grid``); :mod:`~flowmaps.runs.latents` encodes images into
latents (``flowmaps encode``) and decodes a latent run's samples; :mod:`~flowmaps.runs.devices` opens
``--device`` / ``train.device`` and torchrun's process group; :mod:`~flowmaps.runs.extras` checks the
optional extras; :mod:`~flowmaps.runs.tracking` writes the TensorBoard sink beside ``metrics.jsonl``.

The public names below are imported on first use (PEP 562), each from its module: importing
``flowmaps.runs`` imports none of them, so that reading a config does not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["ConfigError", "load_config", "list_presets",
           "Loaded", "load_model", "save_model", "build_model",
           "DataBundle", "build_data", "build_teacher", "build_objective",
           "run_training", "TrainingStopped", "TrainingInterrupted",
           "evaluate_runs",
           "load", "export_model",
           "reconstruct", "list_snapshots",
           "tune_run_grids", "load_tuned_grids",
           "encode_dataset"]

# Where each public name lives (a module of this package). None of them is named like a module here:
# importing ``flowmaps.runs.evaluate`` sets the attribute ``evaluate`` to the module.
_HOME = {
    "config": ("ConfigError", "load_config", "list_presets"),
    "models": ("Loaded", "load_model", "save_model", "build_model"),
    "experiment": ("DataBundle", "build_data", "build_teacher", "build_objective"),
    "training": ("run_training", "TrainingStopped", "TrainingInterrupted"),
    "evaluate": ("evaluate_runs",),
    "export": ("load", "export_model"),
    "posthoc_ema": ("reconstruct", "list_snapshots"),
    "grid_tuning": ("tune_run_grids", "load_tuned_grids"),
    "latents": ("encode_dataset",),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

if TYPE_CHECKING:  # what static readers (type checkers, griffe and the API reference) see
    from .config import ConfigError, list_presets, load_config
    from .evaluate import evaluate_runs
    from .experiment import DataBundle, build_data, build_objective, build_teacher
    from .export import export_model, load
    from .grid_tuning import load_tuned_grids, tune_run_grids
    from .latents import encode_dataset
    from .models import Loaded, build_model, load_model, save_model
    from .posthoc_ema import list_snapshots, reconstruct
    from .training import TrainingInterrupted, TrainingStopped, run_training


def __getattr__(name: str):
    """``flowmaps.runs.NAME``: imports NAME's module on first use and keeps the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
