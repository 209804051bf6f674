"""Benchmark — the spread of the training tests' metrics over seeds and CPU kernel paths.

A test that trains a model and asserts its quality against a bar passes only if the bar holds wherever
the run lands, and a trained model lands wherever the machine's floating-point path takes it: the same
6000-step MeanFlow run gave a 1-step error of 0.517 on an AVX2 machine, 0.590 under the default kernels
and below its bar (0.408) here. So every such test case is run here as its test runs it — the cases are
imported from the test modules (loaded by path), so test and benchmark cannot drift — over seeds 0, 1, 2
(initialisation and trainer seed) under ``ATEN_CPU_CAPABILITY`` = default, avx2 and avx512 (one
subprocess per capability and case, since the variable must be set before torch is imported; one
thread each, at most ``--jobs`` at once). Recorded per run: every metric the test asserts, at the test's
budget and at intermediate step counts of the same run (``--evaluate-at``, fractions of the budget), so
a shorter budget can be read off; ``--scale`` multiplies every budget (the schedule follows it).

Printed: a table case × metric → the value per capability and seed, the min–max, the bar and the margin
``bar / worst`` (≥ 1.25 wanted), and the worst value at each intermediate step count. Written:
``benchmarks/results/training_test_spread.json`` (``--out``) with the load average before and after, the
torch version and the capability torch reports in each subprocess.

Modules measured (``MODULES``): a module either has ``CASES`` of ``test_training.Case`` (trained by
``train_case``; bars from the problem's exact-velocity Euler errors), or a ``SPREAD`` dict of
``name -> function(seed) -> (metrics, bars)`` for tests whose training is not a ``Case``.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_test_spread.py
            [--caps default,avx2,avx512] [--seeds 0,1,2] [--cases lsd,lmd,...] [--modules ...]
            [--scale 1.0] [--evaluate-at 0.25,0.5,0.75] [--jobs 2] [--out PATH] [--update]

``--update`` reruns only the cases asked and keeps the others' results in ``--out`` (the earlier runs'
metadata under ``meta.earlier_runs``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
OUT = ROOT / "benchmarks" / "results" / "training_test_spread.json"
MODULES = ["test_self_distillation_training", "test_training", "test_teacher_factory", "test_image_metrics",
           "test_images", "test_data_free"]
CAPS = ["default", "avx2", "avx512"]


def load(name: str):
    """A test module by path (``tests/`` on ``sys.path`` for the modules it imports itself)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def case_names(module) -> list[str]:
    return list(getattr(module, "CASES", None) or getattr(module, "SPREAD", {}))


# --- worker: one capability, the cases asked of one module × seeds --------------------------------------------

def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    module = load(args.module)
    names = args.cases.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.evaluate_at.split(",") if f]
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cases": {}}
    problem = None
    for name in names:
        record = out["cases"][name] = {"runs": {}}
        for seed in seeds:
            start, cpu = time.perf_counter(), time.process_time()
            if hasattr(module, "CASES"):
                if problem is None:
                    problem = load("test_training").spec_mixture()
                case = module.CASES[name]
                steps = max(1, round(case.steps * args.scale))
                trainer, metrics = load("test_training").train_case(
                    problem, case, seed=seed, steps=steps, evaluate_at=[round(f * steps) for f in fractions])
                record["bars"] = case.bars(problem)
                record["steps"] = steps
                runs = {str(k): v for k, v in metrics.items()}
                runs["bad_steps"] = trainer.bad_steps
            else:
                metrics, bars = module.SPREAD[name](seed)
                record["bars"], record["steps"] = bars, None
                runs = {"final": metrics}
            runs["seconds"] = round(time.perf_counter() - start, 2)
            runs["cpu_seconds"] = round(time.process_time() - cpu, 2)
            record["runs"][str(seed)] = runs
            print(f"{name} seed {seed} done", file=sys.stderr, flush=True)
    print(json.dumps(out))


# --- parent: jobs, table, JSON ------------------------------------------------------------------------

def run_job(cap: str, module: str, cases: list[str], args) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", "--module", module, "--cases", ",".join(cases),
           "--seeds", args.seeds, "--scale", str(args.scale), "--evaluate-at", args.evaluate_at]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cap} {module} {cases}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict) -> tuple[list[str], dict]:
    """Table lines and the per-case summary: for each bar, min/max/worst and margin bar/worst, at the
    budget and at each intermediate step count."""
    lines, summary = [], {}
    for module, cases in results.items():
        for name, by_cap in cases.items():
            any_cap = next(iter(by_cap.values()))
            bars = any_cap["bars"]
            entry = summary.setdefault(module, {}).setdefault(name, {"steps": any_cap["steps"], "bars": {}})
            keys = sorted({k for rec in by_cap.values() for run in rec["runs"].values() for k in run
                           if k.isdigit() or k == "final"}, key=lambda k: int(k) if k.isdigit() else 1 << 62)
            final = keys[-1]
            for metric, bar in bars.items():
                values = {f"{cap}/{seed}": run[final][metric] for cap, rec in by_cap.items()
                          for seed, run in rec["runs"].items()}
                worst = max(values.values())
                per_step = {}
                for k in keys:
                    vs = [run[k][metric] for rec in by_cap.values() for run in rec["runs"].values() if k in run]
                    per_step[k] = {"min": min(vs), "max": max(vs), "margin": bar / max(vs) if max(vs) > 0 else None}
                entry["bars"][metric] = {"bar": bar, "min": min(values.values()), "max": worst,
                                         "margin": bar / worst if worst > 0 else float("inf"),
                                         "values": values, "per_step": per_step}
                cells = "  ".join(f"{cap}: " + " ".join(f"{rec['runs'][s][final][metric]:.3f}" for s in rec["runs"])
                                  for cap, rec in by_cap.items())
                flag = "" if bar / worst >= 1.25 else "  <-- margin < 1.25"
                lines.append(f"{module[5:]:>29} {name:>10} {metric:>10} @{final:>6}: {cells}  "
                             f"| {min(values.values()):.3f}–{worst:.3f} bar {bar:.3f} margin {bar / worst:.2f}{flag}")
                inter = ", ".join(f"{k}: {per_step[k]['max']:.3f} ({per_step[k]['margin']:.2f})"
                                  for k in keys[:-1])
                if inter:
                    lines.append(f"{'':>29} {'':>10} {'':>10}  worst (margin) at {inter}")
    return lines, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--module", help=argparse.SUPPRESS)
    p.add_argument("--caps", default=",".join(CAPS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modules", default=",".join(MODULES))
    p.add_argument("--cases", default="", help="comma list of case names (default: every case)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    p.add_argument("--evaluate-at", default="0.25,0.5,0.75", help="fractions of the budget")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--update", action="store_true",
                   help="keep the other cases' results of an existing --out file (rerun only those asked)")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from tqdm import tqdm

    wanted = set(filter(None, args.cases.split(",")))
    jobs = []
    for module in args.modules.split(","):
        mod = load(module)
        for name in case_names(mod):
            if not wanted or name in wanted:
                for cap in args.caps.split(","):
                    jobs.append((cap, module, [name]))
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "load_average_start": os.getloadavg(),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": args.seeds, "scale": args.scale,
            "evaluate_at": args.evaluate_at}
    results: dict = {}
    if args.update and args.out.is_file():
        old = json.loads(args.out.read_text())
        results = old["results"]
        for module, cases in {m: {n for _, mm, ns in jobs if mm == m for n in ns} for _, m, _ in jobs}.items():
            for name in cases:
                results.get(module, {}).pop(name, None)
        meta["earlier_runs"] = old["meta"].get("earlier_runs", []) + [
            {k: v for k, v in old["meta"].items() if k != "earlier_runs"}]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="training runs", unit="job") as bar:
        futures = {pool.submit(run_job, cap, module, cases, args): (cap, module, cases)
                   for cap, module, cases in jobs}
        for future in as_completed(futures):
            cap, module, cases = futures[future]
            try:
                out = future.result()
            except RuntimeError as err:  # the other jobs go on; the failure is reported and recorded
                tqdm.write(str(err))
                meta.setdefault("failed", []).append(str(err)[-3000:])
                bar.update(1)
                continue
            meta.setdefault("reported_capability", {})[cap] = out["capability"]
            meta.setdefault("cases_run", []).append(f"{module}:{','.join(cases)}@{cap}")
            meta["torch"] = out["torch"]
            for name, record in out["cases"].items():
                results.setdefault(module, {}).setdefault(name, {})[cap] = record
            bar.set_postfix_str(f"{module[5:]}:{','.join(cases)}@{cap}")
            bar.update(1)
            partial = args.out.with_suffix(".partial.json")  # what has finished, should a job fail later
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"meta": meta, "results": results}))
    # the table in the order of the job list, capabilities in the order asked
    order = [c for c in args.caps.split(",")]
    results = {m: {n: {c: results[m][n][c] for c in order if c in results[m][n]}
                   for n in case_names(load(m)) if n in results.get(m, {})} for m in results}
    meta.update(load_average_end=os.getloadavg(), wall_seconds=round(time.perf_counter() - start))
    lines, summary = summarise(results)
    header = (f"values per capability (seeds {args.seeds}); min–max; bar; margin = bar / worst.  "
              f"load average {meta['load_average_start'][0]:.2f} → {meta['load_average_end'][0]:.2f}, "
              f"{meta['wall_seconds']} s, torch {meta.get('torch')}, capabilities {meta.get('reported_capability')}")
    print(header)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
