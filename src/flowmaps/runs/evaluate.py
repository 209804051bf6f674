"""Evaluate trained checkpoints against their teacher (``flowmaps evaluate``): load the flow maps and the
teacher, draw shared base points, measure quality versus cost (:func:`flowmaps.runs.evaluation.evaluate`)
and write ``table.md``, ``results.json`` and the plots into a run directory.

On ``device`` (``--device``); under ``torchrun`` every rank loads the models and draws its share of the
samples, and rank 0 builds the image reference, scores the gathered samples and writes the files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..data.grids import save_labeled_grids
from ..objectives import GuidedVelocity
from ..train import distributed
from . import experiment as ex
from .models import Loaded, class_labels, load_model, sample_shape
from .config import Config, ConfigError, apply_overrides, to_dict
from .typed import build
from .devices import open_device
from .evaluation import Evaluation, build_reference, evaluate, load_reference, markdown_table
from .grid_tuning import load_tuned_grids
from .plotting import plot_quality_vs_nfe, plot_sample_grid, plot_trajectories
from .rundir import RunDir

__all__ = ["evaluate_runs"]


def evaluate_runs(checkpoints: list[str], teacher: str | None, out: Path, overwrite: bool,
                  steps: list[int] | None, n: int | None, dopri5: bool | None,
                  names: list[str] | None = None, progress: bool = True,
                  overrides: list[str] | None = None, device: str = "cpu", grid: str = "uniform",
                  gammas: list[float] | None = None) -> dict:
    """Evaluate checkpoints (see ``flowmaps evaluate --help``); ``overrides`` may change ``eval.*``.
    Under torchrun the ranks share the sampling; rank 0 returns the rows, the others none.
    ``grid="tuned"`` adds rows on each run's tuned grids, ``gammas`` rows of γ-sampling."""
    device, dist = open_device(device)
    progress = progress and dist.is_main
    loaded = [load_model(c, device=device) for c in checkpoints]
    first = loaded[0]
    cfg = _with_eval_overrides(first.config, overrides, exported=first.config_source != "checkpoint")
    _check_recorded(first, cfg, overrides or [], teacher)
    bundle = _shared_data(cfg, loaded, checkpoints)
    if bundle.latents is not None:  # samples (and sheets) decoded to images on the device
        from .latents import latent_codec

        bundle.decoder = latent_codec(cfg, first.scales, device)
    dim = first.scales["dim"]
    maps, velocity = _split_models(loaded, names)
    steps = steps or cfg.eval.steps
    tuned = None
    if grid == "tuned":
        labels = list(maps)
        paths = [c for c, item in zip(checkpoints, loaded) if item.config.objective.name != "velocity"]
        several = [k for k in steps if k > 1]  # one jump has no interior time to tune
        tuned = {label: load_tuned_grids(path, several) for label, path in zip(labels, paths)}
    spec = teacher or cfg.teacher.checkpoint or ("exact" if cfg.teacher.exact else None)
    if spec is None and cfg.teacher.factory:  # distilled from the user's own model: rebuild it
        velocity, spec = ex.factory_teacher(cfg, bundle, first.scales, device), cfg.teacher.factory
        teacher_name, teacher_model = f"teacher ({spec})", None
    else:
        velocity, teacher_name, teacher_model = _teacher_velocity(cfg, spec, bundle, dim, velocity,
                                                                  device)
    _check_classes(loaded, teacher_model, spec)
    run = RunDir(out, overwrite, create=False)  # every rank checks; rank 0 writes
    distributed.barrier()
    if dist.is_main:
        run.create()
    e = cfg.eval
    steps = steps or e.steps
    n = n or e.n_samples
    g = torch.Generator().manual_seed(e.seed)
    x0 = first.interpolant.sample_base(torch.empty(n, *sample_shape(first.scales)), g)
    cond = class_labels(n, first.scales)
    exact_map = None
    if bundle.reference is not None and dist.is_main:
        exact_map = bundle.reference.flow(x0.double(), 0.0, 1.0).to(x0.dtype)
    quality = None
    if bundle.image and dist.is_main:
        from .latents import reference_bundle

        reference = (load_reference(cfg, Path(e.fid_stats), device) if e.fid_stats else
                     build_reference(cfg, reference_bundle(cfg, bundle), run.path / "reference",
                                     progress, device))
        quality = reference.quality
    result = evaluate(maps, velocity, x0, bundle.held_out, bundle.to_data_units, steps=steps,
                      solvers=e.solvers, dopri5=e.dopri5 if dopri5 is None else dopri5, rtol=e.rtol,
                      exact_map=exact_map, kl=bundle.kl, w2_samples=e.w2_samples,
                      energy_samples=e.energy_samples, seed=e.seed, teacher_name=teacher_name,
                      progress=(lambda line: print(f"  {line}", file=sys.stderr)) if progress else None,
                      quality=quality, cond=cond, device=device, chunk=e.batch_size,
                      tuned_grids=tuned, gammas=gammas or (), interpolant=first.interpolant,
                      samplers=e.samplers, spacings=e.spacings, schedulers=e.schedulers)
    if not dist.is_main:
        return {"rows": [], "table": "", "dir": run.path}
    table = markdown_table(result.rows)
    meta = {"checkpoints": checkpoints, "teacher": spec, "n_samples": n, "steps": steps,
            "grid": grid, "gammas": gammas or [],
            "data": cfg.data.name, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "device": str(device), "processes": dist.world_size,
            "chunk": e.batch_size}
    _write_results(run, table, meta, result)
    _plots(result, bundle, steps, run.plots, cfg, exact_map is not None)
    print(table)
    print(f"\nwrote {run.path / 'table.md'}, {run.path / 'results.json'} and plots in {run.plots}")
    return {"rows": result.rows, "table": table, "dir": run.path}


# --- what is evaluated -----------------------------------------------------------------------------

def _with_eval_overrides(cfg: Config, overrides: list[str] | None, exported: bool = False) -> Config:
    """The first checkpoint's config with ``eval.*`` and ``decode.*`` overrides applied (any other key is
    refused). An exported model (first path) also takes ``data.*`` and ``teacher.*``: an export may not
    record its data or teacher, or record paths that are elsewhere on this machine."""
    if not overrides:
        return cfg
    allowed = ("eval.", "decode.", "data.", "teacher.") if exported else ("eval.", "decode.")
    bad = [o for o in overrides if not o.startswith(allowed)]
    if bad:
        what = ("eval.*, decode.*, data.* and teacher.* overrides only (the rest comes from the export)"
                if exported else "eval.* and decode.* overrides only (the rest comes from the checkpoints; "
                "data.* and teacher.* apply to exported models)")
        raise ConfigError(f"override {bad[0]!r}: evaluate takes {what}")
    return build(type(cfg), apply_overrides(to_dict(cfg), overrides)).validate()


def _check_recorded(first: Loaded, cfg: Config, overrides: list[str], teacher: str | None) -> None:
    """An export that records no run config (``FlowMap.save_pretrained``) is evaluated only on data
    given as ``data.*`` overrides: one line naming what is missing (its teacher is optional: without
    one the table has the maps' rows only). The map's own standardiser and interpolant are the export's."""
    if first.config_source is None and not any(o.startswith("data.") for o in overrides):
        raise ConfigError(f"{first.path}: the export records no training config (saved by "
                          "FlowMap.save_pretrained); name its data as overrides, e.g. data.name=gmm "
                          "(and a teacher: --teacher CKPT|exact or teacher.*)")


def _shared_data(cfg: Config, loaded: list[Loaded], checkpoints: list[str]) -> ex.DataBundle:
    """The data every checkpoint was trained on (refusing checkpoints trained on other data), with its
    exact reference attached when it has one."""
    first = loaded[0]
    for other, path in zip(loaded[1:], checkpoints[1:]):
        if other.scales["dim"] != first.scales["dim"] or other.config.data != cfg.data:
            raise ConfigError(f"{path}: trained on different data than {checkpoints[0]}")
    bundle = ex.build_data(cfg)
    dim = first.scales["dim"]
    if bundle.dim != dim:
        raise ConfigError(f"{cfg.data.path or cfg.data.name}: data has dimension {bundle.dim}, "
                          f"{checkpoints[0]} was trained on dimension {dim}")
    if first.config_source != "checkpoint":  # an export: samples in data units by its own standardiser
        bundle.standardizer = first.standardizer
    ex.attach_reference(cfg, bundle, first.interpolant)
    return bundle


def _split_models(loaded: list[Loaded], names: list[str] | None) -> tuple[dict, object]:
    """``({label: flow map}, velocity)``: the flow maps to evaluate, and the first velocity checkpoint
    among them (a teacher candidate, or None)."""
    maps, velocity = {}, None
    for i, item in enumerate(loaded):
        label = names[i] if names else item.config.objective.name.upper()
        if item.config.objective.name == "velocity":
            velocity = velocity or item.model.velocity
        else:
            maps[label] = item.model
    return maps, velocity


def _teacher_velocity(cfg: Config, spec: str | None, bundle: ex.DataBundle, dim: int, velocity,
                      device="cpu"):
    """``(velocity, name, loaded teacher or None)`` of the teacher ``spec`` ("exact", a checkpoint, or
    None: then the velocity checkpoint among those evaluated, if any). A teacher that is the config's
    own checkpoint is guided as it was for distillation (``teacher.guidance``)."""
    if spec == "exact":
        if bundle.reference is None:
            raise ConfigError("--teacher exact: only gmm data has an exact velocity")
        return bundle.reference.velocity, "exact velocity", None
    if not spec:
        return velocity, "teacher", None
    teacher = load_model(spec, device=device)
    guided = cfg.teacher.guidance != 1.0 and spec == cfg.teacher.checkpoint
    if teacher.scales["dim"] != dim:
        raise ConfigError(f"{spec}: teacher has dimension {teacher.scales['dim']}, the "
                          f"checkpoints have dimension {dim}")
    if not guided:
        return teacher.model.velocity, "teacher", teacher
    return (GuidedVelocity(teacher.model, cfg.teacher.guidance,
                           null_label=teacher.scales.get("num_classes", 0)),
            f"teacher (guidance {cfg.teacher.guidance:g})", teacher)


def _check_classes(loaded: list[Loaded], teacher: Loaded | None, spec: str | None) -> None:
    num_classes = loaded[0].scales.get("num_classes", 0)
    if any(item.scales.get("num_classes", 0) != num_classes for item in loaded):
        raise ConfigError("checkpoints: mix class-conditional and unconditional models")
    if teacher is not None and teacher.scales.get("num_classes", 0) != num_classes:
        raise ConfigError(f"{spec}: the teacher's class conditioning differs from the checkpoints'")


# --- what is written -------------------------------------------------------------------------------

def _write_results(run: RunDir, table: str, meta: dict, result: Evaluation) -> None:
    (run.path / "table.md").write_text(table + "\n")
    (run.path / "results.json").write_text(json.dumps(
        {"meta": meta, "rows": [r.as_dict() for r in result.rows]}, indent=2))


def _plots(result: Evaluation, bundle: ex.DataBundle, steps: list[int], folder: Path, cfg: Config,
           exact: bool) -> None:
    """Sample sheets and trajectories, and every measured quality against NFE."""
    if bundle.image:
        _image_plots(result, bundle, steps, folder)
    else:
        _vector_plots(result, bundle, steps, folder)
    if any(r.w2 is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, folder / "w2_vs_nfe.png", "w2", "W2 to held-out data")
    if any(r.fd is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, folder / "fd_vs_nfe.png", "fd",
                            f"Fréchet distance ({cfg.eval.features} features)")
    if any(r.kl is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, folder / "kl_vs_nfe.png", "kl", "histogram KL")
    if exact:
        plot_quality_vs_nfe(result.rows, folder / "map_error_vs_nfe.png", "map_error",
                            "mean |X̂₀₁(x) − X₀₁(x)|")


def _vector_plots(result: Evaluation, bundle: ex.DataBundle, steps: list[int], folder: Path) -> None:
    grid = {}
    for (method, sampler, k), x in result.samples.items():
        if sampler == "flow map":
            grid.setdefault(method, {})[k] = x
    extra = {f"{m} {s}" + (f" {k}" if k else ""): x for (m, s, k), x in result.samples.items()
             if s == "dopri5" or (s == "euler" and k == max(steps))}
    if grid or extra:
        plot_sample_grid(grid or {"teacher": {}}, bundle.held_out, folder / "samples_grid.png",
                         extra=extra or None)
    paths = {k: bundle.to_data_units(v) for k, v in result.paths.items()}
    plot_trajectories(paths, bundle.held_out, folder / "trajectories.png")


def _image_plots(result: Evaluation, bundle: ex.DataBundle, steps: list[int], folder: Path,
                 n: int = 32) -> None:
    """Sample sheets: the data, then every method × step count (and the teacher's dopri5 and Euler at
    the largest step count), the same base points in every row; and trajectories of a few samples."""
    label = "data (held out)" if bundle.latents is None else "data (held out, through the VAE)"
    rows = {label: bundle.to_data_units(bundle.held_out[:n]).clamp(-1, 1)}
    for (method, sampler, k), x in result.samples.items():
        if sampler == "flow map":
            rows[f"{method}, {k} step{'s' * (k > 1)}"] = x[:n].clamp(-1, 1)
        elif sampler == "dopri5" or (sampler == "euler" and k == max(steps)):
            rows[f"{method} {sampler}" + (f" {k}" if k else "")] = x[:n].clamp(-1, 1)
    save_labeled_grids(rows, folder / "samples_grid.png", nrow=16)
    paths = result.paths
    if bundle.decoder is not None:
        from .latents import decode_paths

        paths = decode_paths(bundle.to_data_units, paths)
    tiles, nrow = trajectory_bands(paths)
    save_labeled_grids(tiles, folder / "trajectories.png", nrow=nrow)


def trajectory_bands(paths: dict[str, torch.Tensor], n: int = 8) -> tuple[dict, dict[str, int]]:
    """``(tiles, nrow)`` of ``trajectories.png``: one band per method, one line per sample (the first
    ``n``), base to data from left to right. Methods' paths differ in length (the teacher's RK4 path
    has 17 points, a map's ``max(steps) + 1``), so each band has its own line length."""
    tiles = {name: path[:, :n].transpose(0, 1).reshape(-1, *path.shape[2:]).clamp(-1, 1)
             for name, path in paths.items()}
    return tiles, {name: path.shape[0] for name, path in paths.items()}
