"""Hand a trained map to others: ``flowmaps export RUN DIR`` writes a folder with the map alone
(``model.safetensors``: the EMA weights when the run kept them, no optimiser, RNG or training state;
``config.json``: what rebuilds it, see :mod:`flowmaps.checkpoint`), and :func:`load` opens any model
path — an exported folder, a run directory or a checkpoint — as a ready :class:`~flowmaps.FlowMap`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, model_folder
from ..flowmap import FlowMap
from .config import to_dict
from .models import load_model

__all__ = ["load", "export_model"]


def load(path: str | Path, device: str | torch.device = "cpu", use_ema: bool | str = True) -> FlowMap:
    """A ready :class:`~flowmaps.FlowMap` in eval mode on ``device``, from an exported folder
    (:meth:`FlowMap.from_pretrained`), a run directory or a checkpoint (:func:`load_model`, EMA weights
    unless ``use_ema=False``; a name such as ``"std0.100"`` picks a power-function EMA profile). The map carries ``interpolant`` (draw base points with
    ``model.interpolant.sample_base(torch.empty(n, *model.sample_shape))``), ``sample_shape``,
    ``num_classes``, ``domain`` and ``to_data_units``."""
    folder = model_folder(path)
    if folder is not None:
        return FlowMap.from_pretrained(folder, device=device)
    return load_model(path, use_ema=use_ema, device=device).model


def export_model(source: str | Path, directory: str | Path, use_ema: bool | str = True,
                 overwrite: bool = False) -> dict:
    """Write the map of ``source`` (a run directory or checkpoint) to ``directory``; returns what was
    written (``{"directory", "weights", "step", "objective"}``; ``weights``: ``model``, ``ema`` or a
    power-function profile's name, chosen by ``use_ema`` as in :func:`load`). The source is read and
    checked before anything is written; a folder holding files is refused unless ``overwrite``."""
    if model_folder(source) is not None:
        raise CheckpointError(f"{source}: is already an exported model; copy the folder instead")
    loaded = load_model(source, use_ema=use_ema)
    weights = loaded.weights
    cfg = loaded.config
    trained = {"objective": cfg.objective.name, "step": loaded.metadata.get("step", 0),
               "data": cfg.data.name, "preset": cfg.preset, "interpolant": cfg.interpolant.name}
    # the run's resolved config travels with the map, so `sample`, `evaluate` and `tune-grid` find the
    # data, the teacher and the evaluation settings of an export as they find a run's
    loaded.model.save_pretrained(directory, overwrite=overwrite,
                                 extra={"weights": weights, "trained": trained,
                                        "run_config": to_dict(cfg)})
    return {"directory": Path(directory), "weights": weights, "step": trained["step"],
            "objective": trained["objective"]}
