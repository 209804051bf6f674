"""Benchmark 4 — images on this machine: scikit-learn's 8×8 digits (offline).

A teacher velocity (two-time U-Net, flow matching), a flow map distilled from it with LMD and one trained
directly with FMM; all evaluated at 1, 2, 4, 8, 16 steps beside the teacher's Euler / Heun / RK4 at equal
NFE and dopri5, by the Fréchet distance on the features of a small digits classifier (offline; reference
statistics over the 1797 images, made by `flowmaps fid-stats`), with k-NN precision / recall.

Targets (issue 5), printed as measured in this one run:
  * the 1-step map's FD below the teacher's Euler FD at 8 NFE;
  * the 4-step map's FD within 20% of the teacher's dopri5 FD.

Usage:  .venv/bin/python benchmarks/images_digits.py [--scale 1.0] [--threads 2]
Writes benchmarks/results/images_digits/ (runs, reference statistics, eval table, plots, summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from flowmaps.cli import main as flowmaps_main
from flowmaps.runs.config import load_config
from flowmaps.runs.evaluate import evaluate_runs
from flowmaps.runs.training import run_training

ROOT = Path(__file__).resolve().parent / "results" / "images_digits"


def budget(steps: int, scale: float) -> list[str]:
    n = max(20, int(steps * scale))
    return [f"train.steps={n}", f"train.lr_decay_start={max(1, n // 4)}",
            f"train.checkpoint_every={max(1, n // 4)}", "train.log_every=100"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=2000, help="samples per row of the table")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the runs already in the results folder (e.g. after "
                             "`flowmaps distill --resume --out .../lmd train.steps=N` extended one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    stats = ROOT / "reference"
    if not args.evaluate_only and flowmaps_main(["fid-stats", "--preset", "digits", "--out",
                                                 str(stats), "--overwrite", "--quiet"]) != 0:
        return 1

    def train(out, overrides, distill, label):
        if args.evaluate_only:
            return out
        cfg = load_config("digits", None, overrides)
        return run_training(cfg, out, overwrite=True, distill=distill, label=label)

    teacher = train(ROOT / "teacher", budget(6000, args.scale) + ["objective.name=velocity"], False,
                    "teacher velocity")
    ckpt = str(teacher / "checkpoints" / "final")
    runs = {
        "LMD": train(ROOT / "lmd", budget(2500, args.scale) + [
            "objective.name=lmd", f"teacher.checkpoint={ckpt}", "train.lr=1e-3"], True, "LMD"),
        "FMM": train(ROOT / "fmm", budget(2500, args.scale) + ["objective.name=fmm"], False, "FMM"),
    }
    steps_trained = {name: json.loads((p / "checkpoints" / "final.json").read_text())["step"]
                     for name, p in runs.items()}
    result = evaluate_runs([str(p / "checkpoints" / "final") for p in runs.values()], ckpt,
                           ROOT / "eval", True, [1, 2, 4, 8, 16], args.n, True, names=list(runs),
                           overrides=[f"eval.fid_stats={stats}"])
    rows = result["rows"]
    dopri = next(r for r in rows if r.sampler == "dopri5")
    euler8 = next(r for r in rows if r.sampler == "euler" and r.nfe == 8)
    summary = {"teacher_dopri5": {"fd": dopri.fd, "nfe": dopri.nfe}, "teacher_euler8": {"fd": euler8.fd}}
    for name in runs:
        fd = {r.steps: r.fd for r in rows if r.method == name}
        summary[name] = {"fd": fd,
                         "target_1step_below_euler8": fd[1] < euler8.fd,
                         "ratio_4step_to_dopri5": fd[4] / dopri.fd,
                         "target_4step_within_20pct_of_dopri5": fd[4] <= 1.2 * dopri.fd}
    summary["meta"] = {"command": " ".join(["images_digits.py"] + sys.argv[1:]), "threads": args.threads,
                       "steps_trained": steps_trained,
                       "scale": args.scale, "seconds": round(time.time() - start),
                       "load_average_start": load_start, "load_average_end": os.getloadavg(),
                       "classifier": json.loads((stats / "reference.json").read_text())}
    (ROOT / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
