"""Time grids of a run tuned after training (``flowmaps tune-grid``), stored in the run as
``tuned_grids.json`` and used by ``flowmaps sample`` / ``flowmaps evaluate`` with ``--grid tuned``.

The reference endpoint of the tuning (:func:`flowmaps.tune_grid`) is the teacher's where the run has one:
the exact flow map for ``teacher.exact`` (gmm data), otherwise the teacher's dopri5 solution (rtol
``eval.rtol``) for ``teacher.checkpoint`` / ``teacher.factory``; a run without a teacher (FMM,
self-distillation) is tuned against its own 64-step composition. The base points are fresh draws of the
training base ``N(0, σ0²)`` from ``--seed`` (default 7, apart from the evaluation seed ``eval.seed`` and
``flowmaps sample``'s default seed 0), so tuned grids are measured on other points than they were fitted to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import _atomic_write, checkpoint_stem, model_folder
from ..solvers import solve_ode, uniform_grid
from ..tuning import composition_error, self_reference, tune_grid
from . import experiment as ex
from .models import Loaded, class_labels, load_model, sample_shape
from .config import ConfigError

__all__ = ["GRIDS_FILE", "run_directory", "tune_run_grids", "load_tuned_grids"]

GRIDS_FILE = "tuned_grids.json"


def run_directory(checkpoint: str | Path) -> Path:
    """The folder a model's products go in: the run directory of a checkpoint (``RUN/checkpoints/STEM``)
    or of a run directory, or an exported model's folder (its tuned grids, its samples)."""
    path = Path(checkpoint)
    folder = model_folder(path)
    if folder is not None:
        return folder
    if path.is_dir():
        return path
    return checkpoint_stem(path).parent.parent


def _reference(loaded: Loaded, x0, cond, progress):
    """``(endpoints of x0, description)``: the teacher's where the run has one, else the map's own."""
    cfg, t = loaded.config, loaded.config.teacher
    if t.exact:
        bundle = ex.build_data(cfg)
        ex.attach_reference(cfg, bundle, loaded.interpolant)
        if bundle.reference is None:
            raise ConfigError("teacher.exact: the run's data has no exact flow map")
        return bundle.reference.flow(x0.double(), 0.0, 1.0).to(x0.dtype), "exact flow map"
    velocity, name = None, None
    if t.checkpoint:
        teacher = load_model(t.checkpoint)
        velocity, name = teacher.model.velocity, f"teacher dopri5 ({t.checkpoint})"
    elif t.factory:
        bundle = ex.build_data(cfg)
        velocity = ex.factory_teacher(cfg, bundle, loaded.scales)
        name = f"teacher dopri5 ({t.factory})"
    if velocity is None:
        return self_reference(loaded.model, x0, steps=64, cond=cond), "own 64-step composition"
    if progress:
        print(f"solving the teacher's ODE (dopri5, rtol {cfg.eval.rtol:g}) for {x0.shape[0]} base "
              "points ...", flush=True)
    field = velocity if cond is None else (lambda x, tt: velocity(x, tt, cond))
    rtol = cfg.eval.rtol
    with torch.no_grad():
        return solve_ode(field, x0, "dopri5", rtol=rtol, atol=rtol).x, name


def tune_run_grids(checkpoint: str, steps: list[int], n: int = 2048, seed: int = 7, iters: int = 150,
                   progress: bool = True) -> dict:
    """Tune a grid for each step count of ``steps`` and store them in ``RUN/tuned_grids.json`` (grids
    of other step counts already there are kept). Returns what was written."""
    if any(k < 1 for k in steps):
        raise ConfigError(f"--steps: step counts must be positive, got {steps}")
    if n < 2:
        raise ConfigError(f"--n: need at least 2 base points, got {n}")
    loaded = load_model(checkpoint)
    if loaded.config.objective.name == "velocity":
        raise ConfigError(f"{checkpoint}: a velocity checkpoint is sampled with an ODE solver; tune "
                          "grids of flow maps")
    out = run_directory(checkpoint) / GRIDS_FILE
    stored = _read(out) if out.exists() else {"grids": {}, "tuning_error": {}}
    g = torch.Generator().manual_seed(seed)
    x0 = loaded.interpolant.sample_base(torch.empty(n, *sample_shape(loaded.scales)), g)
    cond = class_labels(n, loaded.scales)
    reference, name = _reference(loaded, x0, cond, progress)
    model = loaded.model.eval()
    for k in steps:
        grid = tune_grid(model, k, x0, reference, cond=cond, iters=iters,
                         generator=torch.Generator().manual_seed(seed + k))
        before = composition_error(model, x0, reference, uniform_grid(k), cond)
        after = composition_error(model, x0, reference, grid, cond)
        stored["grids"][str(k)] = grid.tolist()
        stored["tuning_error"][str(k)] = {"uniform": before, "tuned": after}
        if progress:
            print(f"steps {k}: grid {[round(v, 4) for v in grid.tolist()]}; error on the tuning points "
                  f"{before:.4g} (uniform) -> {after:.4g} (tuned)", flush=True)
    stored.update(checkpoint=str(checkpoint), step=loaded.metadata.get("step"), reference=name,
                  n=n, seed=seed, iters=iters)
    text = json.dumps(stored, indent=2)
    _atomic_write(out, lambda handle: handle.write(text.encode()))
    if progress:
        print(f"wrote {out}")
    return stored


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable tuned-grid file ({err})") from None
    grids = data.get("grids") if isinstance(data, dict) else None
    if not isinstance(grids, dict):
        raise ConfigError(f"{path}: not a tuned-grid file (no 'grids' mapping)")
    for key, grid in grids.items():
        ok = (key.isdigit() and isinstance(grid, list) and len(grid) == int(key) + 1
              and all(isinstance(v, (int, float)) for v in grid)
              and grid[0] == 0.0 and grid[-1] == 1.0 and all(a < b for a, b in zip(grid, grid[1:])))
        if not ok:
            raise ConfigError(f"{path}: the grid for {key!r} steps is not an increasing grid from 0 to 1")
    data.setdefault("tuning_error", {})
    return data


def load_tuned_grids(checkpoint: str | Path, steps: list[int]) -> dict[int, torch.Tensor]:
    """``{k: grid}`` of a run's tuned grids for each of ``steps`` (one step has the one grid ``[0, 1]``);
    one line naming the missing ones."""
    path = run_directory(checkpoint) / GRIDS_FILE
    if all(k == 1 for k in steps):
        return {1: uniform_grid(1)}
    if not path.is_file():
        raise ConfigError(f"--grid tuned: {path} not found; make it with `flowmaps tune-grid "
                          f"{checkpoint} --steps {','.join(map(str, steps))}`")
    grids = _read(path)["grids"]
    missing = [k for k in steps if k > 1 and str(k) not in grids]
    if missing:
        raise ConfigError(f"--grid tuned: {path} has no grid for {','.join(map(str, missing))} steps; "
                          f"run `flowmaps tune-grid {checkpoint} --steps {','.join(map(str, missing))}`")
    return {k: uniform_grid(1) if k == 1 else torch.tensor(grids[str(k)], dtype=torch.float64)
            for k in steps}
