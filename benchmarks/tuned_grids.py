"""Benchmark — time grids tuned after training, and γ-sampling, against the uniform grid.

For each problem one LMD flow map is trained with the library's defaults (the preset through
``flowmaps distill``), its 2-, 4- and 8-step grids are tuned (``flowmaps tune-grid``: 2048 base points of
seed 7, reference = the teacher's endpoint) and the map is evaluated on the base points of the
evaluation seed (``eval.seed`` = 99, never used in tuning) on the uniform grid, the tuned grids and with
γ-sampling (``flowmaps evaluate --grid tuned --gamma G``):

* ``gmm_hard``: exact teacher; exact-map error (and KL) on 10000 points;
* ``checkerboard``: teacher velocity trained by flow matching (20000 × 512 at scale 1); KL on 64000 points;
* ``digits``: U-Net teacher (6000 × 128 at scale 1) and LMD (2500 × 128 at scale 1); FD on 2000 images.

Reported: each metric at k = 1, 2, 4, 8 on the uniform grid, the tuned grids and γ-sampling, and the
tuned/uniform ratio per k (the target: tuned better at every k ≥ 2, by ≥ 15% on gmm_hard).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tuned_grids.py --only gmm_hard|checkerboard|digits
       [--scale 1.0] [--gammas 0.2,0.5]
Writes benchmarks/results/tuned_grids/<problem>/ (runs, eval) and summary_<problem>.{json,md}.
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
from flowmaps.runs.grid_tuning import tune_run_grids
from flowmaps.runs.training import run_training

ROOT = Path(__file__).resolve().parent / "results" / "tuned_grids"
STEPS = [1, 2, 4, 8]


def budget(steps: int, scale: float) -> list[str]:
    """As benchmarks/quality_vs_cost.py: the inverse-sqrt decay starts at a quarter of the run."""
    n = max(20, int(steps * scale))
    return [f"train.steps={n}", f"train.lr_decay_start={max(1, n // 4)}", f"train.checkpoint_every={n}",
            "train.log_every=200"]


def train(preset, out, overrides, distill, label, reuse):
    if reuse and (out / "checkpoints" / "final.json").exists():
        return out
    cfg = load_config(preset, None, overrides)
    return run_training(cfg, out, overwrite=True, distill=distill, label=label, progress=False)


def problem_runs(name: str, scale: float, reuse: bool) -> tuple[Path, list[str], str]:
    """``(LMD run, evaluation overrides, metric)`` of a problem, training what it needs."""
    out = ROOT / name
    if name == "gmm_hard":
        lmd = train("gmm_hard", out / "lmd", budget(4000, scale) + ["objective.name=lmd"], True, "LMD",
                    reuse)
        return lmd, ["eval.n_samples=10000"], "map_error"
    if name == "checkerboard":
        teacher = train("checkerboard", out / "teacher", budget(20000, scale) + [
            "objective.name=velocity", "train.lr=2e-3"],
            False, "teacher", reuse)
        lmd = train("checkerboard", out / "lmd", budget(10000, scale) + [
            "objective.name=lmd", f"teacher.checkpoint={teacher / 'checkpoints' / 'final'}"], True,
            "LMD", reuse)
        return lmd, ["eval.n_samples=64000"], "kl"
    stats = out / "reference"
    if not (reuse and (stats / "reference.json").exists()):
        if flowmaps_main(["fid-stats", "--preset", "digits", "--out", str(stats), "--overwrite",
                          "--quiet"]) != 0:
            raise SystemExit("tuned_grids: flowmaps fid-stats failed")
    teacher = train("digits", out / "teacher", budget(6000, scale) + ["objective.name=velocity"],
                    False, "teacher", reuse)
    lmd = train("digits", out / "lmd", budget(2500, scale) + [
        "objective.name=lmd", f"teacher.checkpoint={teacher / 'checkpoints' / 'final'}"], True, "LMD",
        reuse)
    return lmd, ["eval.n_samples=2000", f"eval.fid_stats={stats}"], "fd"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["gmm_hard", "checkerboard", "digits"], required=True)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    p.add_argument("--gammas", default="0.2,0.5", help="γ values to evaluate (comma-separated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse trained runs already in the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    lmd, eval_overrides, metric = problem_runs(args.only, args.scale, args.reuse)
    tuned = tune_run_grids(str(lmd), [k for k in STEPS if k > 1])
    gammas = [float(g) for g in args.gammas.split(",") if g]
    result = evaluate_runs([str(lmd)], None, ROOT / args.only / "eval", True, STEPS, None, False,
                           names=["LMD"], progress=False, overrides=eval_overrides, grid="tuned",
                           gammas=gammas)
    rows = [r for r in result["rows"] if r.method == "LMD"]
    law = "fd" if args.only == "digits" else "kl"  # a law metric: the γ rows are random samples

    def table_of(field):
        table = {r.sampler: {} for r in rows}
        for r in rows:
            table[r.sampler][r.steps] = getattr(r, field)
        return table

    table = table_of(metric)
    ratios = {k: table["tuned grid"][k] / table["flow map"][k] for k in STEPS if k > 1}
    summary = {"problem": args.only, "metric": metric, "scale": args.scale, "values": table,
               "law_metric": law, "law_values": table_of(law),
               "tuned_over_uniform": ratios, "tuning": tuned,
               "target_tuned_better_every_k": all(v < 1 for v in ratios.values()),
               "target_15pct_gmm_hard": all(v <= 0.85 for v in ratios.values())
               if args.only == "gmm_hard" else None,
               "seconds": round(time.time() - start), "load_average": [load_start, os.getloadavg()],
               "argv": sys.argv[1:]}
    lines = [f"`benchmarks/tuned_grids.py {' '.join(sys.argv[1:])}` — {args.only}, on the evaluation "
             "seed's base points (tuning used other ones)"]
    for field, values_of in ((metric, table), (law, table_of(law))):
        if field == metric and field == law and values_of is not table:
            continue
        lines += ["", f"{field}:", "", "| sampler | " + " | ".join(
            f"{k} step{'s' * (k > 1)}" for k in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
        for sampler, values in values_of.items():
            if field == metric and sampler.startswith("gamma") and metric != law:
                continue  # a random sampler's distance to the exact map says nothing
            lines.append(f"| {sampler} | " + " | ".join(
                f"{values[k]:.4g}" if values.get(k) is not None else "–" for k in STEPS) + " |")
        if field == metric:
            lines.append("| tuned / uniform | – | " + " | ".join(
                f"{ratios[k]:.3f}" for k in STEPS if k > 1) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / f"summary_{args.only}.json").write_text(json.dumps(summary, indent=2, default=str))
    (ROOT / f"summary_{args.only}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
