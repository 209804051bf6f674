"""The ``flowmaps`` command: train, distill, sample, evaluate, demo, presets.

Every run writes its own directory: ``config.yaml`` (the fully resolved config: rerun it with
``--config``), ``metrics.jsonl``, ``checkpoints/`` (resumable ``step-K``, ``best`` and ``final``
safetensors + JSON pairs, see :mod:`flowmaps.train.resume`) and ``plots/``. ``train`` and ``distill`` run
unchanged under ``torchrun --nproc_per_node=N`` (rank 0 writes), continue with ``--resume``, and stop
cleanly on SIGTERM/SIGINT with a checkpoint (exit 0).

Exit status: 0 success; 2 bad input, reported as one line ``flowmaps: error: ...`` with nothing on disk
changed (nothing is overwritten unless ``--overwrite``); 3 training stopped by non-finite steps (the
last good checkpoint is kept and named).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .runs.config import Config, ConfigError, dump_config, list_presets, load_config

EPILOG_OVERRIDES = """overrides:
  Any config key as section.key=value (YAML values), applied after the preset and --config, e.g.
    train.steps=2000 train.lr=5e-4 model.width=128 objective.emd_form=full data.path=x.npy
  Sections: data, interpolant, model, objective, teacher, train, eval (see `flowmaps presets --show NAME`).
"""


class RunDirError(ValueError):
    pass


# --- run directories ------------------------------------------------------------------------------

class RunDir:
    """A run's folder. Refuses a folder that already holds files unless ``overwrite`` (or ``resume``,
    which continues the run in it). Nothing is created before :meth:`create` (rank 0 only)."""

    ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "plots", "samples", "results.json",
                 "table.md")

    def __init__(self, path: str | Path, overwrite: bool = False, create: bool = True,
                 resume: bool = False):
        self.path = Path(path)
        self.overwrite, self.resume = overwrite, resume
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path}: exists and is not a directory")
        _check_parents(self.path)
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise RunDirError(f"--resume: {self.path} is not a run directory (no config.yaml)")
        elif self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            hint = " or --resume to continue it" if (self.path / "config.yaml").is_file() else ""
            raise RunDirError(f"--out {self.path}: already holds files (another run?); choose a new "
                              f"directory or pass --overwrite{hint}")
        if create:
            self.create()

    def create(self) -> None:
        if self.overwrite and not self.resume and self.path.is_dir():
            for name in self.ARTIFACTS:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        (self.path / "plots").mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _records(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a resume starts from)."""
        from .checkpoint import _atomic_write

        kept = [r for r in self._records() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        _atomic_write(self.path / "metrics.jsonl", lambda h: h.write(text))

    def losses(self) -> list[float]:
        """Logged training losses, in step order (for the loss plot of a resumed run too)."""
        return [r["loss"] for r in self._records() if "event" not in r and "loss" in r]


def _check_parents(path: Path) -> None:
    """Refuse a path whose nearest existing ancestor is not a directory (mkdir would fail midway)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RunDirError(f"--out {path}: {parent} is not a directory")


def _default_out(cfg: Config, what: str) -> Path:
    return Path("runs") / f"{cfg.preset}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return values


def _grid(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated times, got {text!r}") from None
    if len(values) < 2 or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("a grid needs at least two times in [0, 1]")
    return values


def _setup_torch(cfg: Config) -> torch.device:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return device


# --- training ------------------------------------------------------------------------------------

RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.threads", "train.device", "train.max_bad_steps")


class TrainingStopped(Exception):
    """Training ended early (non-finite steps); the message names the last good checkpoint."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: the run wrote a checkpoint and said how to resume; the command exits 0 (and a
    multi-run command such as ``demo`` stops instead of starting its next run)."""


def _resume_config(run: Path, cfg: Config) -> Config:
    """The saved config of the run at ``run``, with the changes a resume may make taken from ``cfg``."""
    from .runs.config import _flatten, to_dict

    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise RunDirError(f"--resume: {run} is not a run directory (no config.yaml)")
    saved = load_config(None, saved_path)
    if cfg is None:
        return saved
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    changed = [k for k in a if a[k] != b.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        k = changed[0]
        raise ConfigError(f"--resume: {k} is {b.get(k)!r} here but {a[k]!r} in the run being resumed; "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change")
    for key in RESUMABLE_CHANGES:
        section, name = key.split(".")
        setattr(getattr(saved, section), name, getattr(getattr(cfg, section), name))
    return saved


def run_training(cfg: Config, out: Path | None, overwrite: bool, distill: bool,
                 progress: bool = True, label: str | None = None, resume: bool = False) -> Path:
    """Train (or distil) the model ``cfg`` describes into a run directory; returns the directory.

    Under torchrun every rank runs this; rank 0 alone writes files. With ``resume`` the run in ``out``
    continues from its newest checkpoint, bit-identically to an uninterrupted run. SIGTERM/SIGINT end
    the run after the current step with a checkpoint and raise :class:`TrainingInterrupted` (``main``
    prints how to resume and exits 0); non-finite steps raise :class:`TrainingStopped` (exit 3).
    """
    from .train import distributed
    from .runs import experiment as ex
    from .runs.plotting import plot_loss, plot_samples
    from .train.resume import CheckpointRotation, StopOnSignal, latest_checkpoint
    from .solvers import solve_ode
    from .train.trainer import Trainer

    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = _resume_config(Path(out), cfg)
    name = cfg.objective.name
    if distill and name in ("velocity", "fmm"):
        raise ConfigError(f"objective.name: {name} trains without a teacher; use `flowmaps train`")
    if not distill and name in ("lmd", "emd", "pfmm"):
        raise ConfigError(f"objective.name: {name} distils from a teacher; use `flowmaps distill`")
    device = _setup_torch(cfg)
    dist = distributed.init(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    main_rank = dist.is_main
    resumed = None
    if resume:
        skipped: list[str] = []
        resumed = latest_checkpoint(Path(out) / "checkpoints", skipped=skipped,
                                    check=ex.check_model_checkpoint)
        if resumed is None:
            why = f": {skipped[0]}" if skipped else ""
            raise RunDirError(f"--resume: no resumable checkpoint in {Path(out) / 'checkpoints'}{why}")
        for reason in skipped:
            print(f"flowmaps: warning: {reason}", file=sys.stderr)
        if resumed[2]["trainer"]["world_size"] != dist.world_size:
            raise ConfigError(f"--resume: {resumed[0]} was written by {resumed[2]['trainer']['world_size']}"
                              f" process(es); resume with the same number (now {dist.world_size})")
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    interpolant = ex.build_interpolant(cfg, scales)
    ex.attach_reference(cfg, bundle, interpolant)
    teacher = ex.build_teacher(cfg, bundle, scales, device) if distill else None
    torch.manual_seed(cfg.train.seed)
    model = ex.build_model(cfg, scales).to(device)
    objective = ex.build_objective(cfg, interpolant, teacher)
    t = cfg.train
    if resumed is not None and resumed[2]["step"] >= t.steps:
        print(f"flowmaps: {out} is already at step {resumed[2]['step']} (train.steps={t.steps}); "
              "nothing to do (raise train.steps to continue it)", file=sys.stderr)
        return Path(out)

    # Every rank checks the directory (read-only) before rank 0 creates anything.
    run_path = Path(out) if out else _default_out(cfg, name)
    if dist.enabled and not out:
        raise ConfigError("under torchrun give --out (each rank must agree on the run directory)")
    run = RunDir(run_path, overwrite, create=False, resume=resume)
    distributed.barrier()
    if main_rank:
        run.create()
        if not resume:
            (run.path / "config.yaml").write_text(dump_config(cfg))
    augment = None
    if cfg.data.hflip:
        if not bundle.image:
            raise ConfigError("data.hflip: horizontal flips apply to image datasets only")
        from .data.images import random_hflip
        augment = random_hflip
    conditional = scales["num_classes"] > 0
    trainer = Trainer(model, objective, bundle.train.to(device), batch_size=t.batch_size, lr=t.lr,
                      optimizer=t.optimizer, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      lr_decay_start=t.lr_decay_start, ema_decay=t.ema_decay, seed=t.seed,
                      max_bad_steps=t.max_bad_steps, grad_accum=t.grad_accum,
                      precision=t.precision, compile=t.compile,
                      labels=bundle.labels if conditional else None, label_dropout=t.label_dropout,
                      null_label=scales["num_classes"] if conditional else None, augment=augment)
    rotation = CheckpointRotation(run.checkpoints, keep=t.keep_checkpoints)
    if resumed is not None:
        stem, tensors, meta = resumed
        try:
            trainer.load_state_dict(tensors, meta["trainer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{stem}: cannot resume from it ({str(err).splitlines()[0]})") from None
        rotation.best_loss = meta.get("best_validation_loss")
        if main_rank:
            run.truncate_metrics(trainer.step_count)
            print(f"[{label or name}] resuming {run.path} from {stem.name} (step {trainer.step_count})",
                  file=sys.stderr)
    val_data = bundle.held_out[:2048 if not bundle.image else 256]
    val_cond = bundle.held_out_labels[:val_data.shape[0]] if conditional else None
    if bundle.standardizer is not None:
        val_data = bundle.standardizer.transform(val_data)
    start = time.perf_counter()

    def write_checkpoint(stem: Path, best_loss, state) -> None:
        ex.save_model(stem, model, trainer.ema, cfg, scales, bundle.standardizer, trainer.step_count,
                      extra={"best_validation_loss": best_loss}, trainer_state=state)

    def checkpoint(final: bool = False) -> Path | None:
        trainer.check_replicas()  # under torchrun: refuse to save replicas that drifted apart
        state = trainer.state_dict()  # collective under torchrun: every rank calls it
        path = None
        if main_rank:
            if final:
                path = run.checkpoints / "final"
                write_checkpoint(path, rotation.best_loss, state)
            else:
                val = trainer.validation_loss(val_data, seed=cfg.eval.seed, cond=val_cond)
                path = rotation.save(trainer.step_count,
                                     lambda stem, best: write_checkpoint(stem, best, state), val)
                run.log({"step": trainer.step_count, "event": "checkpoint", "path": str(path),
                         "validation_loss": val})
        distributed.barrier()
        return path

    def callback(step: int, out) -> None:
        if main_rank and out.skipped:
            run.log({"step": step, "event": "skipped", "non_finite": out.skipped,
                     "loss": out.loss.item(), **out.terms, "grad_norm": trainer.last_grad_norm})
            print(f"flowmaps: warning: step {step}: non-finite {out.skipped}, update skipped "
                  f"(terms {out.terms})", file=sys.stderr)
        if main_rank and (step % t.log_every == 0 or step == t.steps):
            run.log({"step": step, "loss": out.loss.item(), **out.terms, **out.stats,
                     "lr": trainer.scheduler.get_last_lr()[0], "grad_norm": trainer.last_grad_norm,
                     "seconds": round(time.perf_counter() - start, 3)})
        if step % t.checkpoint_every == 0 and step < t.steps:
            checkpoint()

    if progress and main_rank:
        world = f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""
        print(f"[{label or name}] {run.path}: {name} on {cfg.data.name}, {t.steps} steps, "
              f"batch {t.batch_size}{world}", file=sys.stderr)
    with StopOnSignal() as stop:
        try:
            history = trainer.run(t.steps - trainer.step_count, progress=progress, callback=callback,
                                  should_stop=stop)
        except FloatingPointError as err:
            kept = (latest_checkpoint(run.checkpoints, check=ex.check_model_checkpoint) if main_rank
                    else None)
            where = f"; the last good checkpoint is {kept[0]}" if kept else "; no checkpoint was written"
            raise TrainingStopped(f"{err}{where}") from None
    if trainer.stopped:
        path = checkpoint()
        raise TrainingInterrupted(
            f"stopped by {stop.signal_name} at step {trainer.step_count}; checkpoint {path}. Resume "
            f"with: flowmaps {'distill' if distill else 'train'} --resume --out {run.path}")
    checkpoint(final=True)
    evaluated = trainer.ema if trainer.ema is not None else model
    # Evaluation samples are drawn in shards, one per rank, and gathered on rank 0.
    n_plot = 64 if bundle.image else 4000
    n_plot -= n_plot % dist.world_size
    g = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.eval.seed, dist.rank))
    x0 = interpolant.sample_base(torch.empty(n_plot // dist.world_size, *bundle.sample_shape,
                                             device=device), g)
    cond = class_labels(x0.shape[0], scales, device)
    with torch.no_grad():
        if name == "velocity":
            shown = {"RK4, 8 steps (NFE 32)": solve_ode(
                lambda x, tt: evaluated.velocity(x, tt, cond), x0, "rk4", steps=8).x}
        else:
            shown = {f"{k} step{'s' * (k > 1)}": evaluated.sample(x0, steps=k, cond=cond)
                     for k in (1, 2, 4)}
    shown = {k: distributed.all_gather_rows(v) for k, v in shown.items()}
    if main_rank:
        plot_loss(history if resumed is None else run.losses(), run.plots / "loss.png",
                  title=f"{name} on {cfg.data.name}")
        if bundle.image:
            from .data.grids import save_labeled_grids
            save_labeled_grids({"data": bundle.held_out[:n_plot],
                                **{k: v.cpu().clamp(-1, 1) for k, v in shown.items()}},
                               run.plots / "samples.png")
        else:
            plot_samples({k: bundle.to_data_units(v.cpu()) for k, v in shown.items()},
                         bundle.held_out, run.plots / "samples.png", title=f"{name} on {cfg.data.name}")
    if progress and main_rank:
        final_loss = history[-1] if history else float("nan")
        print(f"[{label or name}] done in {time.perf_counter() - start:.0f}s, final loss "
              f"{final_loss:.4g}; checkpoint {run.checkpoints / 'final'}", file=sys.stderr)
    return run.path


def class_labels(n: int, scales: dict, device="cpu") -> torch.Tensor | None:
    """Labels ``0, 1, …, K−1, 0, 1, …`` for ``n`` samples of a class-conditional model (else None):
    class-balanced evaluation and sample sheets."""
    k = scales.get("num_classes", 0)
    return torch.arange(n, device=device) % k if k else None


def cmd_train(args, distill: bool = False) -> int:
    overrides = []
    if args.objective:
        overrides.append(f"objective.name={args.objective}")
    elif distill and not args.resume:
        overrides.append("objective.name=lmd")
    if distill and args.teacher:
        overrides += (["teacher.exact=true"] if args.teacher == "exact"
                      else [f"teacher.checkpoint={args.teacher}"])
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume continues the run in --out with its saved config.yaml; "
                              "drop --preset/--config (overrides such as train.steps=N are allowed)")
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise RunDirError(f"--resume: {args.out} is not a run directory (no config.yaml)")
        cfg = load_config(None, saved, overrides + args.overrides)
    else:
        cfg = load_config(args.preset if args.preset or args.config else "checkerboard", args.config,
                          overrides + args.overrides)
    run_training(cfg, args.out, args.overwrite, distill, progress=not args.quiet, resume=args.resume)
    return 0


# --- sampling --------------------------------------------------------------------------------------

def cmd_sample(args) -> int:
    import numpy as np

    from .checkpoint import checkpoint_stem
    from .runs.experiment import load_model
    from .runs.experiment import sample_shape as ex_sample_shape
    from .runs.plotting import plot_samples
    from .solvers import solve_ode

    loaded = load_model(args.checkpoint, use_ema=not args.raw_weights)
    stem = checkpoint_stem(args.checkpoint)
    out = Path(args.out) if args.out else stem.parent.parent / "samples"
    is_velocity = loaded.config.objective.name == "velocity"
    num_classes = loaded.scales.get("num_classes", 0)
    if args.label is not None and not 0 <= args.label < num_classes:
        raise ConfigError(f"--label {args.label}: the checkpoint has "
                          + (f"classes 0..{num_classes - 1}" if num_classes else "no classes"))
    if args.guidance != 1.0 and not (is_velocity and num_classes):
        raise ConfigError("--guidance: applies to class-conditional velocity checkpoints (a distilled "
                          "map learned its guidance from its teacher)")
    velocity = loaded.model.velocity
    if args.guidance != 1.0:
        from .objectives import GuidedVelocity
        velocity = GuidedVelocity(loaded.model, args.guidance, null_label=num_classes)
    jobs = []  # (label, callable of (x0, cond))
    if args.grid:
        if is_velocity:
            raise ConfigError("--grid: a velocity checkpoint is sampled with an ODE solver; use --steps")
        grid = torch.tensor(args.grid)
        jobs.append(("grid", lambda x0, c: loaded.model.sample(x0, grid=grid, cond=c)))
    for k in args.steps or ([] if args.grid else [1, 2, 4]):
        if is_velocity:
            jobs.append((f"{args.solver}{k}", lambda x0, c, k=k: solve_ode(
                lambda x, t: velocity(x, t, c), x0, args.solver, steps=k).x))
        else:
            jobs.append((f"steps{k}", lambda x0, c, k=k: loaded.model.sample(x0, steps=k, cond=c)))
    dim = loaded.scales["dim"]
    image = len(ex_sample_shape(loaded.scales)) == 3
    if image and args.data is not None:
        raise ConfigError("--data: plotting data beside samples is for vector data; image samples are "
                          "written as a grid")
    data = None
    if args.data is not None:  # read and checked before any sample is written
        data = _load_data(args.data)
        if data.shape[1] != dim:
            raise ConfigError(f"--data {args.data}: has dimension {data.shape[1]}, the checkpoint has "
                              f"dimension {dim}")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a directory")
    _check_parents(out)
    files = [out / f"samples_{label}.npy" for label, _ in jobs]
    clash = [str(f) for f in files if f.exists()]
    if clash and not args.overwrite:
        raise RunDirError(f"{clash[0]} already exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    x0 = loaded.interpolant.sample_base(torch.empty(args.n, *ex_sample_shape(loaded.scales)), g)
    cond = None
    if num_classes:
        cond = (torch.full((args.n,), args.label) if args.label is not None
                else class_labels(args.n, loaded.scales))
    shown = {}
    with torch.no_grad():
        for (label, job), path in zip(jobs, files):
            x = loaded.to_data_units(job(x0, cond))
            np.save(path, x.numpy())
            shown[label] = x
            print(f"wrote {path} ({args.n} samples)")
    if image:
        from .data.grids import save_labeled_grids
        png = save_labeled_grids({k: v[:64].clamp(-1, 1) for k, v in shown.items()},
                                 out / "samples.png")
    else:
        png = plot_samples(shown, shown[next(iter(shown))] if data is None else data,
                           out / "samples.png", title=str(stem))
    print(f"wrote {png}")
    return 0


def _load_data(path):
    from .data.points import load_array

    return load_array(path)


# --- evaluation ------------------------------------------------------------------------------------

def evaluate_runs(checkpoints: list[str], teacher: str | None, out: Path, overwrite: bool,
                  steps: list[int] | None, n: int | None, dopri5: bool | None,
                  names: list[str] | None = None, progress: bool = True,
                  overrides: list[str] | None = None) -> dict:
    """Evaluate checkpoints (see ``flowmaps evaluate --help``); ``overrides`` may change ``eval.*``."""
    from .runs import experiment as ex
    from .runs.config import _build, apply_overrides, to_dict
    from .runs.evaluation import evaluate, markdown_table
    from .runs.plotting import plot_quality_vs_nfe

    loaded = [ex.load_model(c) for c in checkpoints]
    first = loaded[0]
    cfg = first.config
    if overrides:
        bad = [o for o in overrides if not o.startswith("eval.")]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: evaluate takes eval.* overrides only (the rest "
                              "comes from the checkpoints)")
        cfg = _build(type(cfg), apply_overrides(to_dict(cfg), overrides)).validate()
    for other, path in zip(loaded[1:], checkpoints[1:]):
        if other.scales["dim"] != first.scales["dim"] or other.config.data != cfg.data:
            raise ConfigError(f"{path}: trained on different data than {checkpoints[0]}")
    bundle = ex.build_data(cfg)
    dim = first.scales["dim"]
    if bundle.dim != dim:
        raise ConfigError(f"{cfg.data.path or cfg.data.name}: data has dimension {bundle.dim}, "
                          f"{checkpoints[0]} was trained on dimension {dim}")
    interpolant = first.interpolant
    ex.attach_reference(cfg, bundle, interpolant)
    maps, velocity = {}, None
    for i, (item, path) in enumerate(zip(loaded, checkpoints)):
        label = names[i] if names else item.config.objective.name.upper()
        if item.config.objective.name == "velocity":
            velocity = velocity or item.model.velocity
        else:
            maps[label] = item.model
    teacher_name, teacher_model = "teacher", None
    spec = teacher or cfg.teacher.checkpoint or ("exact" if cfg.teacher.exact else None)
    if spec == "exact":
        if bundle.reference is None:
            raise ConfigError("--teacher exact: only gmm data has an exact velocity")
        velocity, teacher_name = bundle.reference.velocity, "exact velocity"
    elif spec:
        teacher_model = ex.load_model(spec)
        if cfg.teacher.guidance != 1.0 and spec == cfg.teacher.checkpoint:
            from .objectives import GuidedVelocity
            teacher_name = f"teacher (guidance {cfg.teacher.guidance:g})"
        if teacher_model.scales["dim"] != dim:
            raise ConfigError(f"{spec}: teacher has dimension {teacher_model.scales['dim']}, the "
                              f"checkpoints have dimension {dim}")
        velocity = teacher_model.model.velocity
        if teacher_name != "teacher":
            velocity = GuidedVelocity(teacher_model.model, cfg.teacher.guidance,
                                      null_label=teacher_model.scales.get("num_classes", 0))
    num_classes = first.scales.get("num_classes", 0)
    if any(item.scales.get("num_classes", 0) != num_classes for item in loaded):
        raise ConfigError("checkpoints: mix class-conditional and unconditional models")
    if teacher_model is not None and teacher_model.scales.get("num_classes", 0) != num_classes:
        raise ConfigError(f"{spec}: the teacher's class conditioning differs from the checkpoints'")
    run = RunDir(out, overwrite)
    e = cfg.eval
    steps = steps or e.steps
    n = n or e.n_samples
    g = torch.Generator().manual_seed(e.seed)
    x0 = interpolant.sample_base(torch.empty(n, *ex.sample_shape(first.scales)), g)
    cond = class_labels(n, first.scales)
    exact_map = None
    if bundle.reference is not None:
        exact_map = bundle.reference.flow(x0.double(), 0.0, 1.0).to(x0.dtype)
    quality = None
    if bundle.image:
        from .runs.image_evaluation import build_reference, load_reference
        reference = (load_reference(cfg, Path(e.fid_stats)) if e.fid_stats else
                     build_reference(cfg, bundle, run.path / "reference", progress=progress))
        quality = reference.quality
    result = evaluate(maps, velocity, x0, bundle.held_out, bundle.to_data_units, steps=steps,
                      solvers=e.solvers, dopri5=e.dopri5 if dopri5 is None else dopri5, rtol=e.rtol,
                      exact_map=exact_map, kl=bundle.kl, w2_samples=e.w2_samples,
                      energy_samples=e.energy_samples, seed=e.seed, teacher_name=teacher_name,
                      progress=(lambda s: print(f"  evaluated {s}", file=sys.stderr)) if progress else None,
                      quality=quality, cond=cond)
    table = markdown_table(result.rows)
    (run.path / "table.md").write_text(table + "\n")
    meta = {"checkpoints": checkpoints, "teacher": spec, "n_samples": n, "steps": steps,
            "data": cfg.data.name, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}
    (run.path / "results.json").write_text(json.dumps(
        {"meta": meta, "rows": [r.as_dict() for r in result.rows]}, indent=2))
    if bundle.image:
        _image_plots(result, bundle, steps, run.plots)
    else:
        _vector_plots(result, bundle, steps, run.plots)
    if any(r.w2 is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, run.plots / "w2_vs_nfe.png", "w2", "W2 to held-out data")
    if any(r.fd is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, run.plots / "fd_vs_nfe.png", "fd",
                            f"Fréchet distance ({cfg.eval.features} features)")
    if any(r.kl is not None for r in result.rows):
        plot_quality_vs_nfe(result.rows, run.plots / "kl_vs_nfe.png", "kl", "histogram KL")
    if exact_map is not None:
        plot_quality_vs_nfe(result.rows, run.plots / "map_error_vs_nfe.png", "map_error",
                            "mean |X̂₀₁(x) − X₀₁(x)|")
    print(table)
    print(f"\nwrote {run.path / 'table.md'}, {run.path / 'results.json'} and plots in {run.plots}")
    return {"rows": result.rows, "table": table, "dir": run.path}


def _vector_plots(result, bundle, steps, folder: Path) -> None:
    from .runs.plotting import plot_sample_grid, plot_trajectories

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


def _image_plots(result, bundle, steps, folder: Path, n: int = 32) -> None:
    """Sample sheets: the data, then every method × step count (and the teacher's dopri5 and Euler at
    the largest step count), the same base points in every row; and trajectories of a few samples."""
    from .data.grids import save_labeled_grids

    rows = {"data (held out)": bundle.held_out[:n]}
    for (method, sampler, k), x in result.samples.items():
        if sampler == "flow map":
            rows[f"{method}, {k} step{'s' * (k > 1)}"] = x[:n].clamp(-1, 1)
        elif sampler == "dopri5" or (sampler == "euler" and k == max(steps)):
            rows[f"{method} {sampler}" + (f" {k}" if k else "")] = x[:n].clamp(-1, 1)
    save_labeled_grids(rows, folder / "samples_grid.png", nrow=16)
    paths = {name: path[:, :8].transpose(0, 1).reshape(-1, *path.shape[2:]).clamp(-1, 1)
             for name, path in result.paths.items()}
    save_labeled_grids(paths, folder / "trajectories.png",
                       nrow=next(iter(result.paths.values())).shape[0])


def cmd_evaluate(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    # key=value arguments among the checkpoints are eval.* overrides (argparse's nargs="+" takes both)
    overrides = [c for c in args.checkpoints if "=" in c and not Path(c).exists()] + args.overrides
    checkpoints = [c for c in args.checkpoints if c not in overrides]
    if not checkpoints:
        raise ConfigError("evaluate: give at least one checkpoint")
    evaluate_runs(checkpoints, args.teacher, out, args.overwrite, args.steps, args.n,
                  False if args.no_dopri5 else None, overrides=overrides)
    return 0


# --- demo ----------------------------------------------------------------------------------------

DEMO_BUDGET = {  # steps per model; sized so `make demo` ends within 10 minutes on 2 CPU cores
    "teacher": 10000, "lmd": 6000, "emd": 6000, "fmm": 8000,
}


def cmd_demo(args) -> int:
    root = Path(args.out)
    if root.exists() and any(root.iterdir()) and not args.overwrite:
        raise RunDirError(f"--out {root}: already holds files; choose a new directory or pass "
                          "--overwrite")
    scale = args.scale
    common = ["model.width=128", "model.depth=4", "train.batch_size=512", "train.log_every=100",
              "train.checkpoint_every=100000"] + args.overrides

    def steps(key):
        return f"train.steps={max(10, int(DEMO_BUDGET[key] * scale))}"

    def decay(key):
        return f"train.lr_decay_start={max(1, int(DEMO_BUDGET[key] * scale) // 4)}"

    start = time.perf_counter()
    teacher_dir = run_training(load_config(args.preset, None, common + [
        "objective.name=velocity", steps("teacher"), decay("teacher"), "train.lr=2e-3"]),
        root / "teacher", args.overwrite, distill=False, label="1/4 teacher velocity")
    teacher_ckpt = str(teacher_dir / "checkpoints" / "final")
    runs = {}
    for i, (name, extra) in enumerate([("lmd", ["train.lr=1e-3"]),
                                       ("emd", ["objective.emd_form=full", "train.lr=1e-3"])]):
        runs[{"lmd": "LMD", "emd": "EMD-full"}[name]] = run_training(load_config(args.preset, None, common + extra + [
            f"objective.name={name}", f"teacher.checkpoint={teacher_ckpt}", steps(name), decay(name)]),
            root / name, args.overwrite, distill=True, label=f"{i + 2}/4 {name.upper()} distillation")
    runs["FMM"] = run_training(load_config(args.preset, None, common + [
        "objective.name=fmm", steps("fmm"), decay("fmm"), "train.lr=1e-3"]),
        root / "fmm", args.overwrite, distill=False, label="4/4 FMM direct training")
    print("evaluating at 1, 2, 4, 8 steps against the teacher's ODE solvers ...", file=sys.stderr)
    checkpoints = [str(p / "checkpoints" / "final") for p in runs.values()]
    evaluate_runs(checkpoints, teacher_ckpt, root / "eval", args.overwrite, [1, 2, 4, 8], None, True,
                  names=list(runs))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; runs in {root}, plots in "
          f"{root / 'eval' / 'plots'}")
    return 0


def cmd_fid_stats(args) -> int:
    from .runs import experiment as ex
    from .runs.image_evaluation import build_reference

    cfg = load_config(args.preset if args.preset or args.config else "digits", args.config,
                      args.overrides)
    bundle = ex.build_data(cfg)
    if not bundle.image:
        raise ConfigError(f"data.name: fid-stats is for image datasets; {cfg.data.name} is vector data")
    out = Path(args.out) if args.out else Path("fid-stats") / cfg.data.name
    run = RunDir(out, args.overwrite, create=False)
    run.create()
    (run.path / "config.yaml").write_text(dump_config(cfg))
    reference = build_reference(cfg, bundle, run.path, progress=not args.quiet)
    print(json.dumps(reference.info, indent=2))
    print(f"use it with: eval.fid_stats={run.path}")
    return 0


def cmd_presets(args) -> int:
    if args.show:
        print(dump_config(load_config(args.show)), end="")
    else:
        for name in list_presets():
            print(name)
    return 0


# --- parser --------------------------------------------------------------------------------------

def _add_run_options(p: argparse.ArgumentParser, resume: bool = True) -> None:
    p.add_argument("--preset", choices=list_presets(), help="named preset (default: checkerboard)")
    p.add_argument("--config", metavar="FILE", help="YAML config (e.g. a run's config.yaml), applied "
                   "after the preset")
    p.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: "
                   "runs/<preset>-<objective>-<time>); must be new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out, replacing its "
                   "run files")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest "
                       "checkpoint (exactly as if uninterrupted); overrides may change train.steps and "
                       "logging/checkpoint options only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def is_main_process() -> bool:
    from .train.distributed import is_main

    return is_main()


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``flowmaps: error: ...`` with status 2 (sub-commands
    inherit the class), like every other input error, instead of the usage text."""

    def error(self, message):
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="flowmaps", formatter_class=fmt,
        description="Flow map generative models: train or distil the two-time flow map X_{s,t}, then "
                    "sample in 1, 2, 4... steps chosen after training (t=0 noise, t=1 data).")
    from ._version import __version__
    parser.add_argument("--version", action="version", version=f"flowmaps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a velocity (teacher) or a flow map directly (FMM)",
                       formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                       description="Train a velocity model with flow matching (--objective velocity, "
                                   "the default) or a flow map from samples alone (--objective fmm).")
    p.add_argument("--objective", choices=["velocity", "fmm"], help="what to train (default: the "
                   "config's objective.name, velocity)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a flow map (LMD, EMD, PFMM) from a teacher velocity",
                       formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                       description="Distil a flow map from a teacher velocity: a checkpoint made by "
                                   "`flowmaps train`, or the exact velocity of the gmm dataset.")
    p.add_argument("--objective", choices=["lmd", "emd", "pfmm"], help="distillation objective "
                   "(default: lmd)")
    p.add_argument("--teacher", metavar="CKPT|exact", help="teacher checkpoint (run directory or "
                   "checkpoint path), or 'exact' for the gmm dataset's closed-form velocity")
    _add_run_options(p)
    p.set_defaults(func=lambda a: cmd_train(a, distill=True))

    p = sub.add_parser("sample", help="draw samples from a checkpoint at one or more step counts",
                       formatter_class=fmt,
                       description="Draw --n samples at each step count; writes samples_<label>.npy "
                                   "(data units) and samples.png. Flow maps jump along a uniform grid "
                                   "(or --grid); velocity checkpoints use an ODE solver (--solver).")
    p.add_argument("checkpoint", help="checkpoint path (STEM, STEM.json) or a run directory")
    p.add_argument("--n", type=int, default=10000, help="number of samples (default 10000)")
    p.add_argument("--steps", type=_steps_list, help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--grid", type=_grid, help="explicit time grid, e.g. 0,0.4,1 (flow maps)")
    p.add_argument("--solver", default="rk4", choices=["euler", "heun", "rk4"],
                   help="ODE solver for velocity checkpoints (default rk4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base samples (default 0)")
    p.add_argument("--label", type=int, help="class label for a class-conditional checkpoint "
                   "(default: cycle through the classes)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w for "
                   "a class-conditional velocity checkpoint (default 1: none)")
    p.add_argument("--data", metavar="FILE", help="optional .npy/.csv of data to plot beside samples")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/samples)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample files")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="quality-versus-cost table of flow maps and their teacher",
                       formatter_class=fmt,
                       description="For each flow map and step count: NFE, wall time per 10k "
                                   "samples, W2 and energy distance to held-out data, histogram KL "
                                   "(checkerboard, gmm) and the exact-map error (gmm); the teacher's "
                                   "Euler/Heun/RK4 at the same NFE and dopri5. Writes table.md, "
                                   "results.json and plots.")
    p.add_argument("checkpoints", nargs="+", help="flow-map checkpoints (and optionally a velocity "
                   "checkpoint, used as the teacher), and eval.* overrides as key=value (e.g. "
                   "eval.fid_stats=DIR made by `flowmaps fid-stats`, eval.n_samples=5000)")
    p.add_argument("--teacher", metavar="CKPT|exact", help="teacher velocity (default: the one the "
                   "first checkpoint was distilled from)")
    p.add_argument("--steps", type=_steps_list, help="step counts (default: the config's eval.steps)")
    p.add_argument("--n", type=int, help="number of samples (default: eval.n_samples)")
    p.add_argument("--no-dopri5", action="store_true", help="skip the adaptive dopri5 reference")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/eval-<time>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.set_defaults(func=cmd_evaluate, overrides=[])

    p = sub.add_parser("demo", help="the main job: teacher, LMD, EMD, FMM on the checkerboard, "
                       "evaluated at 1, 2, 4, 8 steps", formatter_class=fmt,
                       description="Train a teacher velocity, distil flow maps with LMD and EMD, train "
                                   "one with FMM directly, then evaluate all at 1, 2, 4, 8 steps "
                                   "against the teacher's ODE solvers; prints the table, writes plots.")
    p.add_argument("--preset", default="checkerboard", choices=list_presets(),
                   help="dataset preset (default checkerboard)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output root (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for all runs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fid-stats", help="reference statistics of an image dataset for the Fréchet "
                       "distance (trains the offline feature classifier)", formatter_class=fmt,
                       epilog=EPILOG_OVERRIDES,
                       description="Compute once per dataset what image evaluations compare against: "
                                   "with eval.features=classifier (default) a small classifier trained "
                                   "on the training split (accuracy on the held-out split recorded) and "
                                   "the mean/covariance of its features over the dataset; with "
                                   "eval.features=inception the Inception-v3 statistics (local weights "
                                   "in eval.inception_weights). Evaluate with eval.fid_stats=DIR.")
    _add_run_options(p, resume=False)
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("presets", help="list the shipped presets, or print one resolved")
    p.add_argument("--show", metavar="NAME", help="print the fully resolved config of a preset")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (argparse alone collects only the first group).
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except _UsageError as err:
        print(f"flowmaps: error: {' '.join(str(err).split())} (see flowmaps --help)", file=sys.stderr)
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    clean = False
    try:
        status = args.func(args)
        clean = status == 0
        return status
    except (ConfigError, CheckpointError, RunDirError, FileNotFoundError, ValueError) as err:
        if os.environ.get("FLOWMAPS_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"flowmaps: error: {message}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        if is_main_process():
            print(f"flowmaps: {err}", file=sys.stderr)
        clean = True
        return 0
    except TrainingStopped as err:
        print(f"flowmaps: error: training stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("flowmaps: interrupted", file=sys.stderr)
        return 130
    finally:
        # Leave the process group (torchrun): exiting with it alive aborts the process.
        from .train.distributed import shutdown

        shutdown(sync=clean)


if __name__ == "__main__":
    sys.exit(main())
