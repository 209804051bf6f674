"""Benchmark — self-distillation: flow maps from data alone (LSD, ESD, PSD, MeanFlow, α-Flow, shortcut,
CT, sCT) against each other, against [P2]'s Table 1, and against the teacher + LMD pipeline at equal CPU
time.

Parts (each a sub-command, so they can run in separate processes):

  table1     the checkerboard in the layout of [P2] Table 1: KL at N = 1, 2, 4, 8, 16 steps (64,000
             samples) for LSD, ESD, PSD-M, PSD-U, MeanFlow, α-Flow, shortcut (and CT, sCT), each
             trained from scratch with the checkerboard preset's settings for it, the same number of
             steps; [P2]'s numbers beside ours.
  table1-budget
             LSD on the same checkerboard at several training budgets (default 5000, 10000, 20000,
             40000 steps × 512, each its own run with the preset's schedule), KL at N = 1–16: how far
             the Table 1 gap is a matter of training budget ([P2] trains ~1500× our samples).
  compute    equal total compute on the checkerboard: a teacher velocity (flow matching) plus LMD, against
             LSD alone given at most the same CPU time (CPU seconds of this process, per run).
  gmm        the spec §6.3 Gaussian mixture: each objective's exact-map error (and W2) at 1–16 steps
             over 3 seeds (mean and spread) beside the exact velocity's Euler error.
  calibrate-digits / train-digits METHOD / evaluate-digits
             the 8×8 digits: the per-step CPU cost of every step type measured side by side, the
             teacher (6000 steps) + LMD (10000 steps) pipeline's CPU time from it, LSD / MeanFlow /
             α-Flow / shortcut / sCT trained from scratch within that CPU time, then FD (digits-
             classifier features, 2000 samples) at 1–16 steps beside the pipeline's recorded FD
             (images_digits.py).

sCT trains the jumps to the data X_{s,1} alone (its maps record the domain "data"): the evaluation samples
it at one jump and, at k > 1 steps, with γ = 1 (jump to the data, re-noise; rows "gamma=1"), the
consistency models' multistep sampler, where every other method composes k deterministic jumps.

Usage:  .venv/bin/python benchmarks/self_distillation.py PART [--threads 1] [--scale 1.0]
Writes benchmarks/results/self_distillation/<part>/ (runs, tables, results.json, plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from flowmaps.runs.config import load_config
from flowmaps.runs.evaluate import evaluate_runs
from flowmaps.runs.models import time_frequencies
from flowmaps.runs.training import run_training

ROOT = Path(__file__).resolve().parent / "results" / "self_distillation"
STEPS = [1, 2, 4, 8, 16]

# [P2] Table 1, checker KL (spec §5.2.4): batch 100,000, 150,000 steps, 4-layer MLP of 512, A100.
PAPER_TABLE1 = {"LSD": [0.086, 0.077, 0.071, 0.070, 0.071], "ESD": [0.098, 0.092, 0.083, 0.082, 0.075],
                "PSD-M": [0.146, 0.089, 0.081, 0.072, 0.069], "PSD-U": [0.111, 0.107, 0.075, 0.073, 0.068]}
METHODS = {
    "LSD": ["objective.name=lsd"],
    "ESD": ["objective.name=esd"],
    "PSD-M": ["objective.name=psd", "objective.psd_gamma=midpoint"],
    "PSD-U": ["objective.name=psd", "objective.psd_gamma=uniform"],
    "MeanFlow": ["objective.name=meanflow"],
    "iMF": ["objective.name=imf"],
    "AlphaFlow": ["objective.name=alphaflow"],
    "Shortcut": ["objective.name=shortcut"],
    "CT": ["objective.name=ct"],
    "sCT": ["objective.name=sct"],
}


def cpu_seconds() -> float:
    return time.process_time()


REUSE = False  # --reuse: a run whose final checkpoint and cpu.json exist is kept, not trained again


def train(preset: str, out: Path, overrides: list[str], distill: bool = False, label: str = "") -> dict:
    """Train one run; returns its directory and the CPU seconds it took (this process). With ``--reuse``
    a finished run of the same configuration is read back instead (its config is compared first)."""
    if REUSE and (out / "cpu.json").is_file() and (out / "checkpoints" / "final.json").is_file():
        cfg, saved = load_config(preset, None, overrides), load_config(None, out / "config.yaml", [])
        for c in (cfg, saved):  # model.n_frequencies: null means the objective's choice
            c.model.n_frequencies = time_frequencies(c)
        if saved != cfg:
            raise SystemExit(f"--reuse: {out} was trained with another configuration; remove it or "
                             "drop --reuse")
        return {**json.loads((out / "cpu.json").read_text()), "run": str(out)}
    start = cpu_seconds()
    run = run_training(load_config(preset, None, overrides), out, overwrite=True, distill=distill,
                       label=label, progress=sys.stderr.isatty())
    record = {"run": str(run), "cpu_seconds": round(cpu_seconds() - start, 1)}
    (out / "cpu.json").write_text(json.dumps(record))
    return record


def budget(steps: int, scale: float, checkpoints: bool = False, log_every: int = 200) -> list[str]:
    """``steps × scale`` steps, the LR decaying from a quarter of them; with ``checkpoints`` a
    checkpoint every quarter (the digits pipeline's settings, images_digits.py), else none but the last."""
    n = max(20, int(steps * scale))
    every = max(1, n // 4) if checkpoints else 1000000
    return [f"train.steps={n}", f"train.lr_decay_start={max(1, n // 4)}",
            f"train.checkpoint_every={every}", f"train.log_every={log_every}"]


def final(run: dict | str) -> str:
    return str(Path(run["run"] if isinstance(run, dict) else run) / "checkpoints" / "final")


def rows_by(result: dict, name: str, key: str) -> dict[int, float]:
    """A method's rows by step count: "flow map" rows, and for sCT (domain "data") its "gamma=1" rows at
    k > 1, which the evaluation gives it in place of a deterministic composition."""
    return {r.steps: getattr(r, key) for r in result["rows"] if r.method == name}


# --- the checkerboard, in the layout of [P2] Table 1 -----------------------------------------------

def table1(args) -> dict:
    out = ROOT / "table1"
    methods = args.methods.split(",") if args.methods else list(METHODS)
    runs = {name: train("checkerboard", out / name.lower(), METHODS[name] + budget(args.steps, args.scale),
                        label=name) for name in methods}
    result = evaluate_runs([final(r) for r in runs.values()], None, out / "eval", True, STEPS, 64000,
                           False, names=list(runs))
    summary = {}
    for name, run in runs.items():
        kl = rows_by(result, name, "kl")
        summary[name] = {"kl": kl, "w2": rows_by(result, name, "w2"), "cpu_seconds": run["cpu_seconds"],
                         "paper_kl": dict(zip(STEPS, PAPER_TABLE1.get(name, [None] * 5)))}
    lsd = summary.get("LSD")
    if lsd:
        lsd["target_1step_kl_le_0.10"] = lsd["kl"][1] <= 0.10
        lsd["target_4step_kl_le_0.085"] = lsd["kl"][4] <= 0.085
        ones = {name: s["kl"][1] for name, s in summary.items()}
        summary["best_at_1_step"] = min(ones, key=ones.get)
    (out / "table.md").write_text(table1_markdown(summary))
    return summary


def table1_markdown(summary: dict) -> str:
    lines = ["| method | " + " | ".join(f"N={k}" for k in STEPS) + " | CPU s |",
             "|---|" + "---:|" * (len(STEPS) + 1)]
    for name, s in summary.items():
        if not isinstance(s, dict) or "kl" not in s:
            continue
        ours = " | ".join(f"**{s['kl'][k]:.3f}**" + (f" ({s['paper_kl'][k]:.3f})" if s["paper_kl"][k]
                                                       else "") for k in STEPS)
        lines.append(f"| {name} | {ours} | {s['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n\nKL(ρ1 ‖ ρ̂) on 64,000 samples (ours in bold; [P2] Table 1 in brackets).\n"


def table1_budget(args) -> dict:
    out = ROOT / "table1-budget"
    budgets = [int(b) for b in args.budgets.split(",")]
    runs = {}
    for n in budgets:
        runs[f"LSD {n}"] = train("checkerboard", out / f"lsd-{n}", METHODS["LSD"] + budget(n, args.scale),
                                 label=f"LSD {n}")
    result = evaluate_runs([final(r) for r in runs.values()], None, out / "eval", True, STEPS, 64000,
                           False, names=list(runs))
    summary = {name: {"steps": n, "kl": rows_by(result, name, "kl"), "w2": rows_by(result, name, "w2"),
                      "cpu_seconds": run["cpu_seconds"]}
               for n, (name, run) in zip(budgets, runs.items())}
    lines = ["| LSD, steps × 512 | " + " | ".join(f"N={k}" for k in STEPS) + " | W2 (N=1) | CPU s |",
             "|---|" + "---:|" * (len(STEPS) + 2)]
    for name, s in summary.items():
        lines.append(f"| {s['steps']} | " + " | ".join(f"{s['kl'][k]:.3f}" for k in STEPS)
                     + f" | {s['w2'][1]:.4f} | {s['cpu_seconds']:.0f} |")
    lines.append("| [P2] Table 1 (150,000 × 100,000) | " + " | ".join(f"{v:.3f}" for v in PAPER_TABLE1["LSD"])
                 + " | | |")
    (out / "table.md").write_text("\n".join(lines) + "\n\nKL(ρ1 ‖ ρ̂) on 64,000 samples of each run's EMA map.\n")
    return summary


# --- equal total compute: teacher + LMD against LSD alone ------------------------------------------

def compute(args) -> dict:
    out = ROOT / "compute"
    teacher = train("checkerboard", out / "teacher", budget(args.teacher_steps, args.scale) + [
        "objective.name=velocity", "train.lr=2e-3"], label="teacher")
    lmd = train("checkerboard", out / "lmd", budget(args.lmd_steps, args.scale) + [
        "objective.name=lmd", f"teacher.checkpoint={final(teacher)}"], distill=True, label="LMD")
    pipeline_cpu = teacher["cpu_seconds"] + lmd["cpu_seconds"]
    # LSD's CPU per step, measured on a short run of the same configuration in this process.
    probe = train("checkerboard", out / "lsd_probe", METHODS["LSD"] + budget(300, 1.0), label="probe")
    per_step = probe["cpu_seconds"] / 300
    lsd_steps = int(0.97 * pipeline_cpu / per_step)
    lsd = train("checkerboard", out / "lsd", METHODS["LSD"] + budget(lsd_steps, 1.0), label="LSD")
    result = evaluate_runs([final(lmd), final(lsd)], final(teacher), out / "eval", True, STEPS, 64000,
                           True, names=["teacher+LMD", "LSD"])
    summary = {"pipeline_cpu_seconds": pipeline_cpu, "teacher_cpu_seconds": teacher["cpu_seconds"],
               "lmd_cpu_seconds": lmd["cpu_seconds"], "lsd_cpu_seconds": lsd["cpu_seconds"],
               "lsd_steps": lsd_steps}
    for name in ("teacher+LMD", "LSD"):
        summary[name] = {"kl": rows_by(result, name, "kl"), "w2": rows_by(result, name, "w2")}
    a, b = summary["LSD"], summary["teacher+LMD"]
    summary["target_lsd_no_worse_at_equal_or_less_time"] = {
        "w2": a["w2"][1] <= b["w2"][1], "kl": a["kl"][1] <= b["kl"][1],
        "time": summary["lsd_cpu_seconds"] <= pipeline_cpu}
    return summary


# --- the Gaussian mixture: every objective, several seeds ------------------------------------------

GMM_OBJECTIVES = {
    "LSD": ["objective.name=lsd"], "LSD-v": ["objective.name=lsd", "objective.form=v"],
    "ESD": ["objective.name=esd"], "PSD-M": ["objective.name=psd", "objective.psd_gamma=midpoint"],
    "PSD-U": ["objective.name=psd", "objective.psd_gamma=uniform"], "MeanFlow": ["objective.name=meanflow"],
    "iMF": ["objective.name=imf"], "AlphaFlow": ["objective.name=alphaflow"],
    "Shortcut": ["objective.name=shortcut"], "CT": ["objective.name=ct"], "sCT": ["objective.name=sct"],
}


def gmm(args) -> dict:
    out = ROOT / ("gmm" if args.preset == "gmm" else f"gmm-{args.preset}")
    names = args.methods.split(",") if args.methods else list(GMM_OBJECTIVES)
    summary = {}
    for name in names:
        errors, w2 = [], []
        for seed in range(args.seeds):
            run = train(args.preset, out / f"{name.lower()}-{seed}", GMM_OBJECTIVES[name] + budget(
                args.steps, args.scale) + [f"train.seed={seed}"], label=f"{name} seed {seed}")
            result = evaluate_runs([final(run)], "exact", out / f"eval-{name.lower()}-{seed}", True,
                                   [1, 2, 4, 8, 16], 4000, False, names=[name], progress=False)
            errors.append(rows_by(result, name, "map_error"))
            w2.append(rows_by(result, name, "w2"))
            euler = {r.steps: r.map_error for r in result["rows"] if r.sampler == "euler"}
        summary[name] = {str(k): [e[k] for e in errors] for k in STEPS}
        # sCT's k > 1 samples are γ = 1 draws, not a map of the base point: compare them by W2
        summary[name]["w2"] = {str(k): [w[k] for w in w2] for k in STEPS}
        summary[name]["below_euler16_at_1_step"] = [e[1] < euler[16] for e in errors]
        summary["exact_euler"] = euler
    return summary


# --- digits: equal CPU time against the teacher + LMD pipeline --------------------------------------

DIGITS_PIPELINE = {"velocity": 6000, "lmd": 10000}
DIGITS_METHODS = {"LSD": ["objective.name=lsd"], "MeanFlow": ["objective.name=meanflow"],
                  "iMF": ["objective.name=imf"],
                  "AlphaFlow": ["objective.name=alphaflow"], "Shortcut": ["objective.name=shortcut"],
                  "sCT": ["objective.name=sct"]}
# AlphaFlow's step is calibrated in its costliest phase, α = 0 (a MeanFlow step: one JVP pass), so its
# budget is at most the pipeline's CPU time (α = 1 is one plain pass, 0 < α < 1 one more forward).
CALIBRATION_OVERRIDES = {"alphaflow": ["objective.alpha_end=0"]}


def calibrate_digits(args) -> dict:
    """CPU seconds per step of every step type, measured in interleaved rounds in this process."""
    from flowmaps.runs import experiment as ex
    from flowmaps.runs.models import build_interpolant, build_model
    from flowmaps.train.trainer import Trainer

    kinds = {"velocity": ["objective.name=velocity"], "lmd": ["objective.name=lmd"],
             **{name.lower(): over for name, over in DIGITS_METHODS.items()}}
    trainers = {}
    for kind, over in kinds.items():
        cfg = load_config("digits", None, over + CALIBRATION_OVERRIDES.get(kind, []))
        bundle = ex.build_data(cfg)
        scales = ex.resolve_scales(cfg, bundle)
        interpolant = build_interpolant(cfg, scales)
        teacher = None
        if kind == "lmd":  # a teacher network of the preset's architecture (its cost, not its quality)
            teacher = build_model(cfg, scales).requires_grad_(False)
        torch.manual_seed(0)
        model = build_model(cfg, scales)
        t = cfg.train
        trainers[kind] = Trainer(model, ex.build_objective(cfg, interpolant, teacher), bundle.train,
                                 batch_size=t.batch_size, lr=t.lr, grad_clip=t.grad_clip,
                                 ema_decay=t.ema_decay, seed=0)
    times = {kind: [] for kind in trainers}
    for _ in range(args.rounds):
        for kind, trainer in trainers.items():
            start = cpu_seconds()
            for _ in range(10):
                trainer.step()
            times[kind].append((cpu_seconds() - start) / 10)
    per_step = {kind: sorted(v)[len(v) // 2] for kind, v in times.items()}
    pipeline = sum(per_step[k] * n for k, n in DIGITS_PIPELINE.items())
    summary = {"cpu_seconds_per_step": per_step, "pipeline_steps": DIGITS_PIPELINE,
               "pipeline_cpu_seconds": pipeline,
               "steps_within_pipeline_cpu": {name: int(0.97 * pipeline / per_step[name.lower()])
                                             for name in DIGITS_METHODS},
               "ratio_to_velocity": {k: v / per_step["velocity"] for k, v in per_step.items()}}
    return summary


def read_results(part: str) -> dict:
    path = ROOT / part / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the {part} part first")
    return json.loads(path.read_text())["results"]


def train_digits(args) -> dict:
    calibration = read_results("calibrate-digits")
    name = args.method
    if name not in calibration["steps_within_pipeline_cpu"]:
        raise SystemExit(f"train-digits: {name} is not in the calibration; run calibrate-digits again")
    over = DIGITS_METHODS[name] + budget(calibration["steps_within_pipeline_cpu"][name], args.scale,
                                         checkpoints=True, log_every=100)
    return train("digits", ROOT / "digits" / name.lower(), over, label=name)


def reference_statistics(folder: Path, recorded: Path) -> Path:
    """The digits reference statistics (``flowmaps fid-stats``), checked to use the very classifier of
    the recorded teacher + LMD evaluation, so that the Fréchet distances are comparable."""
    from safetensors.torch import load_file

    from flowmaps.cli import main as flowmaps_main

    if not (folder / "reference.json").is_file():
        if flowmaps_main(["fid-stats", "--preset", "digits", "--out", str(folder), "--overwrite",
                          "--quiet"]) != 0:
            raise SystemExit("fid-stats failed")
    ours, theirs = (load_file(str(f / "classifier.safetensors")) for f in (folder, recorded))
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"{folder}: the feature classifier differs from {recorded}'s: FDs would not "
                         "be comparable")
    return folder


def evaluate_digits(args) -> dict:
    folder = ROOT / "digits"
    recorded_run = Path(__file__).resolve().parent / "results" / "images_digits"
    stats = reference_statistics(folder / "reference", recorded_run / "reference")
    names = [n for n in DIGITS_METHODS if (folder / n.lower() / "checkpoints" / "final.json").is_file()]
    if not names:
        raise SystemExit(f"evaluate-digits: no trained run under {folder}; run train-digits first")
    result = evaluate_runs([final(folder / n.lower()) for n in names], None, folder / "eval", True, STEPS,
                           2000, False, names=names, overrides=[f"eval.fid_stats={stats}"])
    recorded = json.loads((recorded_run / "summary.json").read_text())
    calibration = read_results("calibrate-digits")
    summary = {"teacher+LMD (images_digits.py)": {"fd": recorded["LMD"]["fd"],
                                                   "cpu_seconds": calibration["pipeline_cpu_seconds"]}}
    per_step = calibration["cpu_seconds_per_step"]
    for name in names:
        run = folder / name.lower()
        steps = load_config(None, run / "config.yaml", []).train.steps
        # The budget in the calibration's CPU seconds (steps × the step cost measured side by side), and
        # the run's own CPU seconds when it ran in one process (a resumed run has no single figure).
        measured = run / "cpu.json"
        summary[name] = {"fd": rows_by(result, name, "fd"), "steps": steps,
                         "calibrated_cpu_seconds": round(steps * per_step[name.lower()], 1),
                         "cpu_seconds": (json.loads(measured.read_text())["cpu_seconds"]
                                         if measured.is_file() else None)}
    if "LSD" in summary:
        summary["target_lsd_1step_fd_le_14.2"] = summary["LSD"]["fd"][1] <= 14.2
        summary["target_lsd_cpu_le_pipeline"] = (summary["LSD"]["calibrated_cpu_seconds"]
                                                 <= calibration["pipeline_cpu_seconds"])
    return summary


PARTS = {"table1": table1, "table1-budget": table1_budget, "compute": compute, "gmm": gmm, "calibrate-digits": calibrate_digits,
         "train-digits": train_digits, "evaluate-digits": evaluate_digits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("method", nargs="?", help="train-digits: LSD, MeanFlow, AlphaFlow, Shortcut "
                        "or sCT")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    parser.add_argument("--steps", type=int, default=20000, help="table1/gmm: steps per run")
    parser.add_argument("--budgets", default="5000,10000,20000,40000",
                        help="table1-budget: comma-separated step counts (20000 reuses table1's LSD run "
                             "with --reuse)")
    parser.add_argument("--methods", help="table1/gmm: comma-separated subset")
    parser.add_argument("--seeds", type=int, default=3, help="gmm: seeds per objective")
    parser.add_argument("--preset", default="gmm", choices=["gmm", "gmm_hard"],
                        help="gmm: the mixture (gmm: spec §6.3; gmm_hard: ten narrow components)")
    parser.add_argument("--teacher-steps", type=int, default=20000)
    parser.add_argument("--lmd-steps", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7, help="calibrate-digits: interleaved rounds")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs of the same configuration (final checkpoint and "
                             "cpu.json present) instead of training them again")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    summary = PARTS[args.part](args)
    summary = {"results": summary, "meta": {
        "command": " ".join(["self_distillation.py"] + sys.argv[1:]), "threads": args.threads,
        "seconds": round(time.time() - start), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "torch": torch.__version__}}
    folder = ROOT / (args.part if args.part != "train-digits" else f"digits/{args.method.lower()}")
    if args.part == "gmm" and args.preset != "gmm":
        folder = ROOT / f"gmm-{args.preset}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
