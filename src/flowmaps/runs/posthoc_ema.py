"""Power-function EMA snapshots of a run and their post-hoc reconstruction (``flowmaps ema``; EDM2,
arXiv 2312.02696, App. C.3; the maths is :mod:`flowmaps.train.power_ema`).

A run trained with ``train.ema_std=0.05,0.10 train.ema_snapshot_every=N`` writes, every ``N`` steps and
at its last step, ``RUN/ema_snapshots/step-K.{safetensors,json}``: the weights of every tracked profile
at step ``K`` (groups ``ema_std0p050`` …) with the run's model metadata, so each snapshot is also a
model checkpoint (``flowmaps sample RUN/ema_snapshots/step-K --ema std0.100``).

:func:`reconstruct` turns the snapshots up to a step ``K`` (the last one by default) into the average of
any other length σ_rel: the coefficients x of the snapshot profiles that best approximate the target
profile in L² (closed-form inner products, one linear solve), then θ̂_r = Σ_i x_i θ̂_i accumulated in
float64 one snapshot at a time. Each result is written as a new model checkpoint
``RUN/ema/std0.075-step0000K.{safetensors,json}`` (its only weights are that average, its default);
an existing file is never replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, checkpoint_files, load_checkpoint, save_checkpoint
from ..train.power_ema import posthoc_coefficients, profile_group, profile_name, std_to_gamma
from .config import Config
from .models import build_model, check_model_checkpoint, model_metadata
from .rundir import RunDirError
from .typed import build

__all__ = ["SNAPSHOTS", "RECONSTRUCTED", "write_snapshot", "list_snapshots", "reconstruct"]

SNAPSHOTS, RECONSTRUCTED = "ema_snapshots", "ema"
_STEP = re.compile(r"^step-(\d+)\.json$")


def write_snapshot(run: str | Path, trainer, cfg: Config, scales: dict, standardizer, domain) -> Path:
    """Write ``RUN/ema_snapshots/step-K`` (K = the trainer's step) holding every power-function profile
    of ``trainer`` (atomic; a snapshot of the same step, from a run resumed before it, is replaced by
    the identical one)."""
    step = trainer.step_count
    stem = Path(run) / SNAPSHOTS / f"step-{step:08d}"
    meta = model_metadata(cfg, scales, standardizer, step, domain)
    meta.update(trainer.ema_metadata(), ema_snapshot={"step": step})
    return save_checkpoint(stem, trainer.power_ema.state_dict(), meta)


def list_snapshots(run: str | Path) -> list[tuple[int, Path]]:
    """``[(step, stem)]`` of the complete snapshots of a run (both files present), by step."""
    folder = Path(run) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP.match(path.name)
        if match and checkpoint_files(path.with_suffix(""))[1].is_file():
            found.append((int(match.group(1)), path.with_suffix("")))
    return sorted(found)


def _profiles(stem: Path) -> list[dict]:
    """The profiles a snapshot's JSON lists (read as JSON only; the weights are checked on loading)."""
    meta_path = checkpoint_files(stem)[0]
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        profiles = meta["ema_profiles"]
        out = [{"name": str(p["name"]), "gamma": float(p["gamma"]), "group": str(p["group"])}
               for p in profiles]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{meta_path}: not an EMA snapshot (no readable ema_profiles)") from None
    if not out or not all(o["gamma"] >= 0 for o in out):
        raise CheckpointError(f"{meta_path}: not an EMA snapshot (no readable ema_profiles)")
    return out


def reconstruct(run: str | Path, stds: list[float], step: int | None = None) -> list[dict]:
    """Reconstruct the power-function average of each length in ``stds`` at ``step`` (a snapshot's step;
    default the last) from the run's snapshots up to it, and write each as a checkpoint in
    ``RUN/ema/``. Returns ``[{"path", "std", "gamma", "step", "snapshots", "residual"}]`` (``residual``:
    ‖Σ x_i p_i − p_r‖ / ‖p_r‖ of the profile fit).

    Everything is checked before anything is written: the run, its snapshots, the lengths (each in
    (0, 12^{-1/2}]), the step, and that no output exists already (existing files are never replaced)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise RunDirError(f"{run}: not a run directory (no config.yaml)")
    snapshots = list_snapshots(run)
    if not snapshots:
        raise RunDirError(f"{run}: no EMA snapshots in {run / SNAPSHOTS} (train with train.ema_std=0.05,"
                          f"0.10 train.ema_snapshot_every=N to write them)")
    if not stds:
        raise ValueError("--std: give at least one relative standard deviation")
    gammas = [std_to_gamma(s) for s in stds]  # the range check
    names = [profile_name(s) for s in stds]
    if len(set(names)) != len(names):
        raise ValueError(f"--std: the lengths must differ, got {stds}")
    steps = [k for k, _ in snapshots]
    target = steps[-1] if step is None else int(step)
    if target not in steps:
        raise ValueError(f"--step: {target} is not the step of a snapshot of {run} (they are at "
                         f"{_ranges(steps)})")
    used = [(k, stem) for k, stem in snapshots if k <= target]
    outputs = [run / RECONSTRUCTED / f"{name}-step{target:08d}" for name in names]
    for out in outputs:
        existing = [p for p in checkpoint_files(out) if p.exists()]
        if existing:
            raise RunDirError(f"{existing[0]}: exists; not replaced (delete it to reconstruct again)")
    basis = [(k, stem, p) for k, stem in used for p in _profiles(stem)]
    coefficients = []
    for gamma in gammas:
        x, residual = posthoc_coefficients([k for k, _, _ in basis], [p["gamma"] for _, _, p in basis],
                                           target, gamma)
        coefficients.append((x, residual))
    sums, last_groups, last_meta = _combine(basis, [x for x, _ in coefficients])
    cfg = build(Config, last_meta["config"])
    params = set(dict(build_model(cfg, last_meta["scales"]).named_parameters()))
    some = next(iter(last_groups.values()))  # buffers (not averaged) from the snapshot at the step
    done = []
    for out, name, std, gamma, total, (x, residual) in zip(outputs, names, stds, gammas, sums,
                                                           coefficients):
        state = {key: (total[key].to(value.dtype) if key in params else value)
                 for key, value in some.items()}
        profile = {"name": name, "std": float(std), "gamma": gamma, "group": profile_group(name)}
        meta = {key: last_meta[key] for key in ("config", "step", "objective", "domain", "interpolant",
                                                "scales", "standardizer")}
        meta.update(ema_profiles=[profile], ema_default=name,
                    ema_posthoc={"std": float(std), "gamma": gamma, "step": target,
                                 "snapshots": [[k, p["name"]] for k, _, p in basis],
                                 "coefficients": x.tolist(), "profile_residual": residual})
        save_checkpoint(out, {profile_group(name): state}, meta)
        done.append({"path": out, "std": float(std), "gamma": gamma, "step": target,
                     "snapshots": len(used), "residual": residual})
    return done


def _combine(basis, xs) -> tuple[list[dict], dict, dict]:
    """Σ_i x_i θ̂_i for each coefficient vector in ``xs``, in float64, loading one snapshot at a time;
    returns the sums, the last snapshot's groups and its metadata."""
    sums: list[dict] = [{} for _ in xs]
    i = 0
    groups, meta = {}, {}
    by_stem: dict[Path, list] = {}
    for k, stem, p in basis:
        by_stem.setdefault(stem, []).append(p)
    keys = None
    for stem, profiles in by_stem.items():
        groups, meta = load_checkpoint(stem, check=check_model_checkpoint)
        for p in profiles:
            state = groups.get(p["group"])
            if state is None:
                raise CheckpointError(f"{stem}: its JSON lists profile {p['name']} but it holds no "
                                      f"weights {p['group']}")
            if keys is None:
                keys = set(state)
            elif set(state) != keys:
                raise CheckpointError(f"{stem}: its weights do not match the other snapshots' (from "
                                      "another run?)")
            for total, x in zip(sums, xs):
                for key, value in state.items():
                    if value.is_floating_point():
                        term = float(x[i]) * value.double()
                        total[key] = term if key not in total else total[key] + term
            i += 1
    return sums, groups, meta


def _ranges(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else \
        f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-2:]))}"
