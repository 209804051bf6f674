"""Benchmark 1 — quality versus cost, on the checkerboard and on the Gaussian mixture.

Checkerboard: a teacher velocity trained by flow matching; flow maps distilled from it (LMD, EMD) and
trained directly (FMM); all evaluated at 1, 2, 4, 8, 16 steps next to the teacher's Euler / Heun / RK4
at equal NFE and dopri5 (rtol 1e-5). Gaussian mixture: the exact velocity is the teacher, so the
exact-map error ``|X̂_{0,1}(x) − X_{0,1}(x)|`` is measured; LMD, EMD, PFMM distil it, FMM learns from
samples.

Targets checked (printed as measured ratios, all from this one run):
  * checkerboard: 1-step map W2 within 10% of the teacher's dopri5 W2, with ≥ 50× fewer NFE and
    ≥ 30× less sampling wall time;
  * gmm: the 1-step map error below the 16-step Euler error of the exact velocity.

Usage:  .venv/bin/python benchmarks/quality_vs_cost.py [--scale 1.0] [--only checkerboard|gmm]
Writes benchmarks/results/quality_vs_cost/<problem>/... (runs, table.md, results.json, plots) and
summary.json / summary.md beside them.
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
from flowmaps.runs.training import run_training

ROOT = Path(__file__).resolve().parent / "results" / "quality_vs_cost"


def train(preset, out, overrides, distill, label):
    cfg = load_config(preset, None, overrides)
    return run_training(cfg, out, overwrite=True, distill=distill, label=label)


def budget(steps, scale):
    n = max(20, int(steps * scale))
    return [f"train.steps={n}", f"train.lr_decay_start={max(1, n // 4)}",
            "train.checkpoint_every=1000000", "train.log_every=200"]


def checkerboard(scale: float) -> dict:
    out = ROOT / "checkerboard"
    net = ["model.width=256", "model.depth=4"]
    teacher = train("checkerboard", out / "teacher", net + budget(20000, scale) + [
        "objective.name=velocity", "train.lr=2e-3"], False, "teacher velocity")
    ckpt = str(teacher / "checkpoints" / "final")
    runs = {
        "LMD": train("checkerboard", out / "lmd", net + budget(10000, scale) + [
            "objective.name=lmd", f"teacher.checkpoint={ckpt}"], True, "LMD"),
        "EMD-full": train("checkerboard", out / "emd", net + budget(10000, scale) + [
            "objective.name=emd", "objective.emd_form=full", f"teacher.checkpoint={ckpt}"], True,
            "EMD (full)"),
        "FMM": train("checkerboard", out / "fmm", net + budget(15000, scale) + [
            "objective.name=fmm"], False, "FMM"),
    }
    result = evaluate_runs([str(p / "checkpoints" / "final") for p in runs.values()], ckpt,
                           out / "eval", True, [1, 2, 4, 8, 16], None, True, names=list(runs))
    rows = result["rows"]
    dopri = next(r for r in rows if r.sampler == "dopri5")
    summary = {"teacher_dopri5": {"w2": dopri.w2, "nfe": dopri.nfe, "ms_per_10k": dopri.ms_per_10k,
                                  "kl": dopri.kl}}
    for name in runs:
        one = next(r for r in rows if r.method == name and r.steps == 1 and r.sampler == "flow map")
        summary[name] = {"w2_1step": one.w2, "kl_1step": one.kl,
                         "w2_ratio_to_dopri5": one.w2 / dopri.w2,
                         "nfe_ratio": dopri.nfe / one.nfe,
                         "wall_time_ratio": dopri.ms_per_10k / one.ms_per_10k,
                         "target_w2_within_10pct": one.w2 <= 1.10 * dopri.w2,
                         "target_nfe_50x": dopri.nfe / one.nfe >= 50,
                         "target_time_30x": dopri.ms_per_10k / one.ms_per_10k >= 30}
    return summary


def gmm(scale: float) -> dict:
    out = ROOT / "gmm"
    net = ["model.width=256", "model.depth=4"]
    runs = {
        "LMD": train("gmm", out / "lmd", net + budget(8000, scale) + [
            "objective.name=lmd", "teacher.exact=true"], True, "LMD"),
        "EMD": train("gmm", out / "emd", net + budget(8000, scale) + [
            "objective.name=emd", "teacher.exact=true", "train.lr=1e-4"], True, "EMD (semigradient)"),
        "EMD-full": train("gmm", out / "emd_full", net + budget(8000, scale) + [
            "objective.name=emd", "objective.emd_form=full", "teacher.exact=true"], True,
            "EMD (full)"),
        "PFMM": train("gmm", out / "pfmm", net + budget(8000, scale) + [
            "objective.name=pfmm", "teacher.exact=true",
            f"objective.stage_steps={max(1, int(8000 * scale) // 6)}"], True, "PFMM"),
        "FMM": train("gmm", out / "fmm", net + budget(12000, scale) + ["objective.name=fmm"], False,
                     "FMM"),
    }
    result = evaluate_runs([str(p / "checkpoints" / "final") for p in runs.values()], "exact",
                           out / "eval", True, [1, 2, 4, 8, 16], None, True, names=list(runs))
    rows = result["rows"]
    euler16 = next(r for r in rows if r.sampler == "euler" and r.steps == 16)
    summary = {"exact_euler": {r.steps: r.map_error for r in rows if r.sampler == "euler"}}
    for name in runs:
        errs = {r.steps: r.map_error for r in rows if r.method == name}
        summary[name] = {"map_error": errs, "target_1step_below_euler16": errs[1] < euler16.map_error}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    parser.add_argument("--only", choices=["checkerboard", "gmm"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    meta = {"load_average_start": os.getloadavg(), "threads": args.threads, "scale": args.scale,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    summary = {"meta": meta}
    if args.only in (None, "checkerboard"):
        summary["checkerboard"] = checkerboard(args.scale)
    if args.only in (None, "gmm"):
        summary["gmm"] = gmm(args.scale)
    meta["load_average_end"] = os.getloadavg()
    meta["seconds"] = round(time.time() - start)
    ROOT.mkdir(parents=True, exist_ok=True)
    name = f"summary{'_' + args.only if args.only else ''}.json"
    (ROOT / name).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
