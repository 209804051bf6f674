"""The two-time DiT against the two-time U-Net on the 8×8 digits, at equal CPU time, for LMD and LSD.

One U-Net teacher velocity (flow matching, the digits preset) is trained first. Then four flow maps: LMD
distilled from that teacher and LSD trained from the images alone, each with the digits U-Net and with a
DiT of about the same cost per step (width 64, 6 blocks, 4 heads, patch 2: 16 tokens of 2×2 pixels; about
twice the U-Net's parameters). Every map gets the same CPU time (``--budget`` seconds): the CPU seconds per
step of the four step types are measured side by side in interleaved rounds in this process, and each run's
step count is the budget over its step cost.
All runs share the digits preset's settings, except the learning rate (1e-3 for all four) and the length.
FD (Fréchet distance on the digits classifier's features, `flowmaps fid-stats`) at 1, 2 and 4 steps.

    OMP_NUM_THREADS=1 python benchmarks/dit_digits.py [--budget 300] [--teacher-steps 2000] [--n 1000]

Writes benchmarks/results/dit_digits/ (runs, reference statistics, eval, results.json, table.md). The
budgets are small (this machine is shared): the table compares the two networks, not the best FD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flowmaps.cli import main as flowmaps_main
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_interpolant, build_model
from flowmaps.runs.config import load_config
from flowmaps.runs.evaluate import evaluate_runs
from flowmaps.runs.training import run_training
from flowmaps.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent / "results" / "dit_digits"
STEPS = [1, 2, 4]
DIT = ["model.name=dit", "model.dit_width=64", "model.dit_depth=6", "model.heads=4", "model.patch=2"]
COMMON = ["train.lr=1e-3"]
RUNS = {
    "U-Net LMD": ["objective.name=lmd"],
    "DiT LMD": ["objective.name=lmd", *DIT],
    "U-Net LSD": ["objective.name=lsd"],
    "DiT LSD": ["objective.name=lsd", *DIT],
}


def folder(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "")


def budget(steps: int) -> list[str]:
    n = max(20, int(steps))
    return [f"train.steps={n}", f"train.lr_decay_start={max(1, n // 4)}", f"train.checkpoint_every={n}",
            "train.log_every=100"]


def calibrate(rounds: int, teacher_cfg: list[str]) -> dict[str, float]:
    """CPU seconds per step of each run's step type, the median of interleaved rounds of 5 steps."""
    trainers = {}
    for name, over in RUNS.items():
        cfg = load_config("digits", None, over + COMMON)
        bundle = ex.build_data(cfg)
        scales = ex.resolve_scales(cfg, bundle)
        teacher = None
        if ex.needs_teacher(cfg):  # a U-Net teacher network (its cost, not its quality)
            teacher = build_model(load_config("digits", None, teacher_cfg), scales).requires_grad_(False)
        torch.manual_seed(0)
        model = build_model(cfg, scales)
        t = cfg.train
        trainers[name] = Trainer(model, ex.build_objective(cfg, build_interpolant(cfg, scales), teacher),
                                 bundle.train, batch_size=t.batch_size, lr=t.lr, grad_clip=t.grad_clip,
                                 ema_decay=t.ema_decay, seed=0)
    for trainer in trainers.values():  # warm-up
        trainer.step()
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.process_time()
            for _ in range(5):
                trainer.step()
            times[name].append((time.process_time() - start) / 5)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="CPU seconds of training per flow map")
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--n", type=int, default=1000, help="samples per FD")
    p.add_argument("--rounds", type=int, default=5, help="interleaved calibration rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT))
    args = p.parse_args()
    root = Path(args.out)
    torch.set_num_threads(args.threads)
    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    stats = root / "reference"
    if not (stats / "reference.json").is_file():
        if flowmaps_main(["fid-stats", "--preset", "digits", "--out", str(stats), "--overwrite",
                          "--quiet"]) != 0:
            return 1
    teacher_over = ["objective.name=velocity", *budget(args.teacher_steps)]
    teacher = root / "teacher"
    if not (teacher / "checkpoints" / "final.json").is_file():
        run_training(load_config("digits", None, teacher_over), teacher, overwrite=True, distill=False,
                     progress=False, label="teacher")
    ckpt = str(teacher / "checkpoints" / "final")
    per_step = calibrate(args.rounds, teacher_over)
    print("CPU s/step:", json.dumps(per_step), file=sys.stderr)
    cpu, steps = {}, {}
    for name, over in RUNS.items():
        steps[name] = int(args.budget / per_step[name])
        extra = [f"teacher.checkpoint={ckpt}"] if "LMD" in name else []
        cfg = load_config("digits", None, over + COMMON + extra + budget(steps[name]))
        began = time.process_time()
        run_training(cfg, root / folder(name), overwrite=True,
                     distill="LMD" in name, label=name, progress=False)
        cpu[name] = round(time.process_time() - began, 1)
    result = evaluate_runs([str(root / folder(n) / "checkpoints" / "final") for n in RUNS], ckpt,
                           root / "eval", True, STEPS, args.n, False, names=list(RUNS),
                           overrides=[f"eval.fid_stats={stats}"], progress=False)
    fd = {name: {r.steps: r.fd for r in result["rows"] if r.method == name} for name in RUNS}
    teacher_rows = {f"{r.sampler} {r.nfe}": r.fd for r in result["rows"] if r.method == "teacher"}
    params = {}
    for name, over in RUNS.items():
        cfg = load_config("digits", None, over + COMMON)
        scales = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 64, "shape": [1, 8, 8], "num_classes": 0}
        params[name] = sum(q.numel() for q in build_model(cfg, scales).parameters())
    summary = {"fd": fd, "teacher_fd": teacher_rows, "cpu_seconds_per_step": per_step, "steps": steps,
               "cpu_seconds_training": cpu, "parameters": params,
               "meta": {"command": " ".join(["dit_digits.py", *sys.argv[1:]]), "budget": args.budget,
                        "teacher_steps": args.teacher_steps, "n": args.n, "threads": args.threads,
                        "torch": torch.__version__, "wall_seconds": round(time.time() - start)}}
    (root / "results.json").write_text(json.dumps(summary, indent=1))
    lines = ["| network, method | parameters | steps | CPU s/step | FD 1 step | FD 2 steps | FD 4 steps |",
             "|---|---|---|---|---|---|---|"]
    for name in RUNS:
        lines.append(f"| {name} | {params[name] / 1e3:.0f}k | {steps[name]} | {per_step[name]:.3f} | "
                     + " | ".join(f"{fd[name][k]:.1f}" for k in STEPS) + " |")
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
