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
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .runs.config import ConfigError, dump_config, list_presets, load_config
from .runs.rundir import RunDir, RunDirError, check_parents
from .runs.training import TrainingInterrupted, TrainingStopped, run_training

EPILOG_OVERRIDES = """overrides:
  Any config key as section.key=value (YAML values), applied after the preset and --config, e.g.
    train.steps=2000 train.lr=5e-4 model.width=128 objective.emd_form=full data.path=x.npy
  Sections: data, interpolant, model, objective, teacher, train, eval (see `flowmaps presets --show NAME`).
"""


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
    from .runs.experiment import class_labels, load_model
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
    check_parents(out)
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


def cmd_evaluate(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    # key=value arguments among the checkpoints are eval.* overrides (argparse's nargs="+" takes both)
    overrides = [c for c in args.checkpoints if "=" in c and not Path(c).exists()] + args.overrides
    checkpoints = [c for c in args.checkpoints if c not in overrides]
    if not checkpoints:
        raise ConfigError("evaluate: give at least one checkpoint")
    from .runs.evaluate import evaluate_runs  # loads matplotlib, which not every command needs

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
    from .runs.evaluate import evaluate_runs

    evaluate_runs(checkpoints, teacher_ckpt, root / "eval", args.overwrite, [1, 2, 4, 8], None, True,
                  names=list(runs))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; runs in {root}, plots in "
          f"{root / 'eval' / 'plots'}")
    return 0


def cmd_fid_stats(args) -> int:
    from .runs import experiment as ex
    from .runs.evaluation import build_reference

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
