"""Warm start against scratch on the 8×8 digits (issue 17, part 1): LMD from a fresh U-Net (``model.init=
scratch``) and LMD from the teacher's own U-Net made two-time (``model.init=teacher``, exactly the teacher
at step 0: ``X_{s,t}`` is one Euler step of it), same recipe otherwise (the digits preset, lr 1e-3, batch
128, inverse-sqrt decay from step 2500, EMA 0.999), one run each.

Reported at 1000 / 3000 / 10000 steps (the checkpoints of one 10000-step run; the learning-rate schedule
does not depend on ``train.steps``, so a run stopped early is the same run): FD (the library's digits
classifier features, 2000 samples, ``flowmaps evaluate``) of the map at 1 and 4 steps; the warm start's
step 0 is the teacher's Euler at 1 and 4 NFE. And the CPU time (user + system of the training process,
single thread) each run needs to reach the scratch run's final 1-step FD (warm start: the first
checkpoint, every 250 steps, at or below it).

The teacher is a digits velocity U-Net trained 6000 steps (``--teacher`` reuses one).

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/warm_start_digits.py [--teacher RUN] [--steps 10000]
  .venv/bin/python benchmarks/warm_start_digits.py --evaluate-only --runs DIR [--cpu-log FILE]
Writes benchmarks/results/warm_start/ (summary.json, table.md, the evaluation folder); the runs go to
``--runs`` (default: benchmarks/results/warm_start/runs, not committed: checkpoints are large).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "warm_start"
REPORT = (1000, 3000, 10000)
RUNS = {"scratch": "model.init=scratch", "warm": "model.init=teacher"}


def flowmaps_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "flowmaps", *map(str, args)]


def recipe(steps: int, threads: int) -> list[str]:
    return ["objective.name=lmd", "train.lr=1e-3", f"train.steps={steps}", "train.lr_decay_start=2500",
            "train.checkpoint_every=250", f"train.keep_checkpoints={steps // 250 + 2}", "train.log_every=100",
            f"train.threads={threads}"]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def train(runs: Path, teacher: Path, steps: int, threads: int, cpu_log: Path) -> None:
    """Both runs in parallel (one thread each), their CPU time sampled every 10 s into ``cpu_log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = {name: subprocess.Popen(flowmaps_cmd("distill", "--preset", "digits", "--out", runs / f"lmd_{name}",
                                                 "--overwrite", "--quiet", f"teacher.checkpoint={teacher}", init,
                                                 *recipe(steps, threads)), env=env)
             for name, init in RUNS.items()}
    with cpu_log.open("a") as log:
        while any(p.poll() is None for p in procs.values()):
            for name, p in procs.items():
                cpu = cpu_seconds(p.pid) if p.poll() is None else None
                if cpu is not None:
                    log.write(f"{time.time():.3f} lmd_{name} {cpu:.2f}\n")
            log.flush()
            time.sleep(10)
    bad = [name for name, p in procs.items() if p.returncode]
    if bad:
        raise SystemExit(f"warm_start_digits: the {', '.join(bad)} run failed")


def checkpoints(run: Path) -> dict[int, Path]:
    found = {}
    for meta in [*sorted((run / "checkpoints").glob("step-*.json")), run / "checkpoints" / "final.json"]:
        if not meta.is_file():
            continue
        step = int(json.loads(meta.read_text())["step"])
        if step % 250 == 0:   # the schedule's checkpoints (not one written by a stop signal)
            found[step] = meta.with_suffix("")
    return found


def cpu_at(cpu_log: Path, name: str, when: float) -> float | None:
    """CPU seconds of run ``name`` at wall time ``when`` (linear between the samples around it), summed
    over the processes of a run that was stopped and resumed (the CPU between a process's last sample
    and its end, at most one sampling interval, is not counted)."""
    if not cpu_log.is_file():
        return None
    raw = sorted((float(a), float(c)) for a, n, c in (line.split() for line in cpu_log.read_text().splitlines())
                 if n == name)
    samples, offset, last = [], 0.0, 0.0
    for when_, cpu in raw:   # a resumed run is a new process: its CPU counter restarts from 0
        if cpu < last:
            offset += last
        samples.append((when_, offset + cpu))
        last = cpu
    before = [s for s in samples if s[0] <= when]
    after = [s for s in samples if s[0] >= when]
    if before and not after and when - before[-1][0] <= 30:  # the run's last checkpoint: its process
        return before[-1][1]                                  # ended within one sampling interval
    if not before or not after:
        return None
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def evaluate(runs: Path, teacher: Path, n: int, cpu_log: Path, out: Path) -> dict:
    from flowmaps.runs.evaluate import evaluate_runs

    stats = out / "reference"
    if not (stats / "reference.json").is_file():
        from flowmaps.cli import main as flowmaps_main

        if flowmaps_main(["fid-stats", "--preset", "digits", "--out", str(stats), "--overwrite", "--quiet"]):
            raise SystemExit("warm_start_digits: fid-stats failed")
    found = {name: checkpoints(runs / f"lmd_{name}") for name in RUNS}
    paths, names = [], []
    for name, ckpts in found.items():
        for step, path in sorted(ckpts.items()):
            if name == "warm" or step <= 1000 or step in REPORT or step == max(ckpts):
                paths.append(str(path))
                names.append(f"{name}@{step}")
    result = evaluate_runs(paths, str(teacher), out / "eval", True, [1, 4], n, False, names=names,
                           progress=False, overrides=[f"eval.fid_stats={stats}"])
    fd = {}
    for row in result["rows"]:
        if "@" in row.method:
            name, step = row.method.split("@")
            fd.setdefault(name, {}).setdefault(int(step), {})[row.steps] = row.fd
        elif row.sampler == "euler":
            fd.setdefault("teacher_euler", {})[row.nfe] = row.fd
    fd.setdefault("warm", {})[0] = {k: fd["teacher_euler"].get(k) for k in (1, 4)}
    return finish({"fd": fd}, found, cpu_log)


def finish(summary: dict, found: dict, cpu_log: Path, carry: dict | None = None) -> dict:
    """CPU seconds at every checkpoint on disk, FD rows carried from an earlier evaluation of the same
    runs (``carry``: its summary) for checkpoints since overwritten (a resumed run rewrites ``final``),
    and the CPU time each run needs to reach the scratch run's 1-step FD at each of its report steps."""
    fd = {name: {int(k): ({int(j): v for j, v in row.items()} if name in RUNS else row)
                 for k, row in rows.items()} for name, rows in summary["fd"].items()}
    cpu = {name: {step: cpu_at(cpu_log, f"lmd_{name}", path.with_suffix(".json").stat().st_mtime)
                  for step, path in ckpts.items()} for name, ckpts in found.items()}
    carried = {name: list(steps) for name, steps in (summary.get("carried") or {}).items()}
    for name, rows in ((carry or {}).get("fd") or {}).items():
        for k, row in rows.items():
            if name in RUNS and int(k) not in fd.get(name, {}):
                fd.setdefault(name, {})[int(k)] = {int(j): v for j, v in row.items()}
                carried.setdefault(name, []).append(int(k))
        for k, v in ((carry or {}).get("cpu_seconds") or {}).get(name, {}).items():
            if name in RUNS and v is not None and cpu.get(name, {}).get(int(k)) is None:
                cpu.setdefault(name, {})[int(k)] = v
    reach = {}  # "<k>-step FD of scratch@<step>" -> the first checkpoint of each run at or below it
    for k_steps in (1, 4):
        for target_step in sorted(s for s in fd["scratch"] if s in REPORT or s == max(fd["scratch"])):
            target = fd["scratch"][target_step][k_steps]
            key = f"{k_steps}@{target_step}"
            reach[key] = {"k": k_steps, "scratch_step": target_step, "fd": target}
            for name in RUNS:
                hit = sorted(j for j, row in fd[name].items()
                             if row.get(k_steps) is not None and row[k_steps] <= target)
                first = hit[0] if hit else None
                reach[key][name] = {"step": first, "cpu_seconds": 0.0 if first == 0 else
                                    cpu[name].get(first) if first is not None else None}
    best = {name: min(((row[1], k) for k, row in fd[name].items() if k and row.get(1) is not None))
            for name in RUNS}
    return {"fd": fd, "cpu_seconds": cpu, "reach": reach, "carried": carried,
            "best_1step": {name: {"fd": v, "step": k} for name, (v, k) in best.items()}}


def table(summary: dict) -> str:
    fd, cpu = summary["fd"], summary["cpu_seconds"]
    last = max(fd["scratch"])
    steps = sorted({s for s in list(fd["scratch"]) + list(fd["warm"]) if s <= 1000 or s in REPORT
                    or s == last})
    lines = ["| LMD steps | scratch FD 1 step | scratch FD 4 steps | warm FD 1 step | warm FD 4 steps | "
             "scratch CPU s | warm CPU s |", "|---|---|---|---|---|---|---|"]

    def f(v):
        return "–" if v is None else f"{v:.2f}"

    def c(v):
        return "–" if v is None else f"{v:.0f}"

    for s in steps:
        a, b = fd["scratch"].get(s, {}), fd["warm"].get(s, {})
        lines.append(f"| {s} | {f(a.get(1))} | {f(a.get(4))} | {f(b.get(1))} | {f(b.get(4))} | "
                     f"{c(cpu['scratch'].get(s))} | {c(cpu['warm'].get(s))} |")
    lines.append("")
    for r in summary["reach"].values():
        lines.append(f"CPU time to reach the scratch run's {r['scratch_step']}-step FD at {r['k']} step"
                     f"{'s' if r['k'] > 1 else ''} ({r['fd']:.2f}): "
                     + "; ".join(f"{name} " + (f"{c(r[name]['cpu_seconds'])} s (step {r[name]['step']})"
                                              if r[name]["step"] is not None else "not reached")
                                 for name in RUNS) + ".")
    lines.append("Best 1-step FD of each run over its checkpoints: " + "; ".join(
        f"{name} {b['fd']:.2f} (step {b['step']})" for name, b in summary["best_1step"].items()) + ".")
    if summary.get("carried"):
        lines.append("Rows carried from the evaluation of the same runs before they were resumed (their "
                     "checkpoints were since rewritten): " + "; ".join(
                         f"{name} {sorted(v)}" for name, v in summary["carried"].items()) + ".")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="a digits velocity checkpoint (default: train one, 6000 steps)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=2000, help="samples per FD")
    parser.add_argument("--cpu-log", type=Path, help="CPU samples 'epoch run cpu_seconds' (default: RUNS/cpu.log)")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the runs already in --runs")
    parser.add_argument("--table-only", action="store_true", help="no evaluation: recompute the CPU times and "
                        "the table from --results/summary.json and the checkpoints' times in --runs")
    parser.add_argument("--carry", type=Path, help="an earlier summary.json of the same runs: its FD rows for "
                        "checkpoints since rewritten (a resumed run rewrites final) are kept, marked carried")
    parser.add_argument("--results", type=Path, default=ROOT, help="where summary.json and table.md go")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    cpu_log = args.cpu_log or args.runs / "cpu.log"
    start = time.time()
    teacher = args.teacher
    if teacher is None:
        teacher = args.runs / "teacher" / "checkpoints" / "final"
        if not (args.evaluate_only or args.table_only):
            subprocess.run(flowmaps_cmd("train", "--preset", "digits", "--objective", "velocity", "--out",
                                        args.runs / "teacher", "--overwrite", "--quiet", "train.steps=6000",
                                        "train.lr_decay_start=1500", "train.checkpoint_every=1500",
                                        f"train.threads={args.threads}"), check=True)
    if not (args.evaluate_only or args.table_only):
        train(args.runs, teacher, args.steps, args.threads, cpu_log)
    import torch

    torch.set_num_threads(args.threads)
    if args.table_only:  # recompute CPU times, carried rows and reach from summary.json, no evaluation
        previous = json.loads((args.results / "summary.json").read_text())
        carry = json.loads(args.carry.read_text()) if args.carry else None
        found = {name: checkpoints(args.runs / f"lmd_{name}") for name in RUNS}
        summary = finish(previous, found, cpu_log, carry)
    else:
        summary = evaluate(args.runs, teacher, args.n, cpu_log, args.results)
    commands = (previous.get("meta", {}).get("commands") or [previous.get("meta", {}).get("command")]
                if args.table_only else [])
    summary["meta"] = {"command": " ".join(["warm_start_digits.py"] + sys.argv[1:]), "teacher": str(teacher),
                       "commands": [c for c in commands if c] + [" ".join(["warm_start_digits.py"] + sys.argv[1:])],
                       "recipe": recipe(args.steps, args.threads), "seconds": round(time.time() - start),
                       "load_average_end": os.getloadavg()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    (args.results / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
