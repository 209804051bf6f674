"""Distillation without data (issue 17 part 3): LMD on the teacher's ODE paths (``data.name=none``)
against LMD on the data, at equal CPU time, the teacher's ODE cost included.

* ``gmm``: gmm_hard with its exact teacher and the CLI's LMD settings (the preset: MLP 256×4, batch
  512, lr 1e-3 decayed from step 1000, clip 1, EMA 0.999). Per seed, data-based LMD runs ``--steps``
  steps (4000, as ``quality_per_budget.py``) and its CPU time is the budget; data-free LMD runs until
  its own CPU time (first solve and refreshes of the teacher's paths included) reaches that budget,
  and once more for the same number of steps. Mean exact-map error ``|X̂_{0,1}(x0) − X_{0,1}(x0)|`` at
  1, 2, 4, 8 steps on 4000 fixed base points (the EMA weights), mean over seeds.
* ``digits``: the digits preset's LMD from a velocity teacher (``--teacher``, a run or checkpoint of
  ``flowmaps train --preset digits``), one ``--mode`` (``data`` or ``free``) per process, each stopped
  at ``--budget`` CPU seconds (the two modes may run side by side: each counts its own CPU time); then
  ``digits-eval`` writes FD at 1 and 4 steps (digits classifier features, the reference statistics of
  ``benchmarks/results/images_digits/reference``).

Usage:
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_free.py gmm --seeds 0 1 2
  (or one process per seed: gmm --seeds S --part, for S in 0 1 2; then gmm-table)
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_free.py digits --mode data --teacher T --budget 900
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_free.py digits --mode free --teacher T --budget 900
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_free.py digits-eval
Writes benchmarks/results/data_free/ (gmm.json, gmm.md, digits runs, digits.json, digits.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from flowmaps.runs import experiment as ex
from flowmaps.runs.models import save_model
from flowmaps.runs.config import dump_config, load_config
from flowmaps.runs.training import _assemble
from flowmaps.train import Trainer

ROOT = Path(__file__).resolve().parent / "results" / "data_free"
STEPS = (1, 2, 4, 8)


def make_trainer(cfg, parts, free: bool, progress: bool) -> Trainer:
    """The Trainer ``flowmaps distill`` builds for this config (TrainingRun._make_trainer)."""
    t, d = cfg.train, cfg.data
    paths = (dict(paths=d.teacher_paths, steps=d.teacher_steps, refresh_every=d.refresh_every,
                  refresh_paths=d.refresh_paths) if free else None)
    return Trainer(parts.model, parts.objective, None if free else parts.bundle.train,
                   teacher_paths=paths, sample_shape=parts.bundle.sample_shape if free else None,
                   progress=progress, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                   weight_decay=t.weight_decay, grad_clip=t.grad_clip, lr_decay_start=t.lr_decay_start,
                   ema_decay=t.ema_decay, seed=t.seed, lr_schedule=t.lr_schedule,
                   warmup_steps=t.warmup_steps, total_steps=t.steps, lr_final=t.lr_final)


def train(cfg, free: bool, steps: int, budget: float | None, progress: bool):
    """``(parts, trainer, cpu seconds, steps taken)``; stops at ``steps`` or at ``budget`` CPU seconds
    (measured from the first step, so the first solve of the teacher's paths is counted)."""
    parts = _assemble(cfg, True, torch.device("cpu"))
    trainer = make_trainer(cfg, parts, free, progress)
    start = time.process_time()
    stop = (lambda: time.process_time() - start >= budget) if budget else None
    trainer.run(steps, progress=progress, should_stop=stop, sync_every=50)
    return parts, trainer, time.process_time() - start, trainer.step_count


# --- gmm_hard --------------------------------------------------------------------------------------

def gmm(args) -> int:
    base = load_config("gmm_hard", None, ["objective.name=lmd"])
    ref = ex._gmm_reference(base, None)
    g = torch.Generator().manual_seed(12345)
    x0 = torch.randn(4000, 2, generator=g)
    exact = ref.flow(x0.double(), 0.0, 1.0)

    def errors(model):
        with torch.no_grad():
            return {k: float((model.sample(x0, steps=k).double() - exact).norm(dim=1).mean())
                    for k in STEPS}

    rows = []
    for seed in args.seeds:
        over = ["objective.name=lmd", f"train.seed={seed}", f"train.steps={args.steps}"]
        data_cfg = load_config("gmm_hard", None, over)
        free_cfg = load_config("gmm_hard", None, over + ["data.name=none", *args.free])
        tag = f" ({' '.join(args.free)})" if args.free else ""
        if args.budget is None:
            _, tr, cpu, n = train(data_cfg, False, args.steps, None, args.progress)
            rows.append(dict(seed=seed, method="data-based LMD", steps=n, cpu=cpu, teacher_cpu=0.0,
                             error=errors(tr.ema)))
            budget = cpu
        else:  # the budget of a data-based run measured before (its CPU seconds)
            budget = args.budget
        runs = [(f"data-free LMD{tag}, equal CPU", 10 * args.steps, budget)]
        if args.equal_steps:
            runs.append((f"data-free LMD{tag}, equal steps", args.steps, None))
        for label, steps, limit in runs:
            parts, tr, cpu, n = train(free_cfg, True, steps, limit, args.progress)
            cost = parts.objective.points.cost()
            rows.append(dict(seed=seed, method=label, steps=n, cpu=cpu,
                             teacher_cpu=cost["teacher_seconds"], teacher_nfe=cost["teacher_nfe"],
                             paths=cost["teacher_paths_solved"], error=errors(tr.ema)))
        for r in rows[-len(runs) - (args.budget is None):]:
            print(f"seed {seed} {r['method']:28s} steps {r['steps']:5d} cpu {r['cpu']:6.1f}s "
                  f"(teacher {r['teacher_cpu']:.1f}s) " +
                  " ".join(f"{k}:{r['error'][k]:.4f}" for k in STEPS), flush=True)
    if args.part:  # one process per seed: gmm-seed<S>.json, merged by `gmm-table`
        ROOT.mkdir(parents=True, exist_ok=True)
        name = "-".join(map(str, args.seeds)) + ("-" + "-".join(args.free) if args.free else "")
        (ROOT / f"gmm-seed{name}.json").write_text(json.dumps(rows, indent=2))
        return 0
    return _write("gmm", rows, args, "exact-map error at k steps")


def gmm_table(args) -> int:
    rows = [r for f in sorted(ROOT.glob("gmm-seed*.json")) for r in json.loads(f.read_text())]
    for r in rows:  # JSON keys are strings
        r["error"] = {int(k): v for k, v in r["error"].items()}
    return _write("gmm", rows, args, "exact-map error at k steps")


# --- digits ----------------------------------------------------------------------------------------

def digits_config(args, free: bool):
    n = int(args.max_steps)
    over = ["objective.name=lmd", f"teacher.checkpoint={args.teacher}", f"train.steps={n}",
            f"train.lr_decay_start={args.decay}", f"train.seed={args.seed}"]
    if free:
        over += ["data.name=none", f"data.teacher_steps={args.teacher_steps}",
                 f"data.refresh_every={args.refresh_every}", f"data.teacher_paths={args.paths}"]
    return load_config("digits", None, over)


def digits(args) -> int:
    free = args.mode == "free"
    cfg = digits_config(args, free)
    parts, tr, cpu, n = train(cfg, free, cfg.train.steps, args.budget, args.progress)
    out = ROOT / f"{args.name}-{args.mode}"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg.train.steps = n
    (out / "config.yaml").write_text(dump_config(cfg))
    save_model(out / "checkpoints" / "final", parts.model, tr.ema, cfg, parts.scales,
                  parts.bundle.standardizer, n)
    cost = parts.objective.points.cost() if free else {}
    info = dict(mode=args.mode, steps=n, cpu=cpu, budget=args.budget, **cost,
                teacher=str(args.teacher), threads=torch.get_num_threads(),
                load_average=os.getloadavg())
    (out / "budget.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    return 0


def digits_eval(args) -> int:
    from flowmaps.runs.evaluate import evaluate_runs

    stats = ROOT / "reference"  # `flowmaps fid-stats --preset digits --out` this folder
    rows = []
    for mode, label in (("data", "data-based LMD"), ("free", "data-free LMD")):
        run = ROOT / f"{args.name}-{mode}"
        info = json.loads((run / "budget.json").read_text())
        result = evaluate_runs([str(run)], None, ROOT / f"{args.name}-eval-{mode}", True, [1, 4], args.n,
                               False, names=[label], progress=False,
                               overrides=[f"eval.fid_stats={stats}", "eval.solvers=[euler]"])
        fd = {r.steps: r.fd for r in result["rows"] if r.method == label}
        rows.append(dict(method=label, steps=info["steps"], cpu=info["cpu"],
                         teacher_cpu=info.get("teacher_seconds", 0.0), fd=fd))
        print(rows[-1], flush=True)
    return _write(args.name, rows, args, "FD at k steps", ks=(1, 4))


def _write(name, rows, args, metric, ks=STEPS) -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    key = "error" if name == "gmm" else "fd"
    gmm_like = name == "gmm"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"| method | seeds | steps | CPU s (teacher ODE s) | " + " | ".join(f"{k} step{'s' * (k > 1)}"
                                                                       for k in ks) + " |",
             "|---|---|---|---|" + "---|" * len(ks)]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        mean = lambda f: sum(f(r) for r in sel) / len(sel)  # noqa: E731
        cells = [f"{mean(lambda r: r[key][k]):.4f}" if gmm_like else f"{mean(lambda r: r[key][k]):.2f}"
                 for k in ks]
        lines.append(f"| {m} | {len(sel)} | {mean(lambda r: r['steps']):.0f} | {mean(lambda r: r['cpu']):.0f} "
                     f"({mean(lambda r: r['teacher_cpu']):.1f}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_free.py " + " ".join(sys.argv[1:])
    (ROOT / f"{name}.md").write_text(f"{metric}, mean over the seeds of each row\n\n{table}\n\n"
                                     f"`{command}`\n")
    (ROOT / f"{name}.json").write_text(json.dumps({"rows": rows, "command": command,
                                                   "load_average": os.getloadavg()}, indent=2))
    print(table)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("gmm")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--steps", type=int, default=4000)
    a.add_argument("--progress", action="store_true")
    a.add_argument("--equal-steps", action="store_true", help="also data-free LMD at the same steps")
    a.add_argument("--part", action="store_true", help="write gmm-seed<S>.json only (then gmm-table)")
    a.add_argument("--free", nargs="*", default=[], help="data.* overrides of the data-free runs")
    a.add_argument("--budget", type=float, help="CPU seconds of a data-based run measured before "
                   "(skips the data-based run)")
    sub.add_parser("gmm-table")
    b = sub.add_parser("digits")
    b.add_argument("--mode", choices=["data", "free"], required=True)
    b.add_argument("--teacher", required=True)
    b.add_argument("--budget", type=float, default=900.0, help="CPU seconds")
    b.add_argument("--max-steps", type=int, default=20000)
    b.add_argument("--decay", type=int, default=750, help="train.lr_decay_start")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--teacher-steps", type=int, default=16)
    b.add_argument("--refresh-every", type=int, default=200)
    b.add_argument("--paths", type=int, default=4096)
    b.add_argument("--progress", action="store_true")
    b.add_argument("--name", default="digits", help="results prefix (runs NAME-data, NAME-free)")
    c = sub.add_parser("digits-eval")
    c.add_argument("--name", default="digits")
    c.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    return {"gmm": gmm, "gmm-table": gmm_table, "digits": digits,
            "digits-eval": digits_eval}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
