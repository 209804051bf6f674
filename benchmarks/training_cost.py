"""Benchmark — training cost: time per training step of each objective relative to a velocity step.

Every row is a full ``flowmaps.Trainer.step()`` (draw a batch, objective, backward, gradient clip, Adam,
schedule) on the same student ``FlowMap(MLP(2, width, depth))`` and the same batch size, measured in one
process. The methods are interleaved round-robin (one step of each, in a freshly shuffled order every
round), so load drift on a shared machine hits every row alike. Reported per row: median wall-clock and
median CPU time per step, their ratios to the velocity step, the per-round wall ratio, minor page faults
per step, and the cost-model predictions below. On a machine shared with other work the CPU-time ratio is
the robust number (preemption inflates wall-clock steps at random); ``os.getloadavg()`` before/after and
the torch thread count are recorded.

Self-distillation rows (LSD, its v-form, ESD, PSD, MeanFlow, shortcut) train from data alone at
``η = 0.75`` with their papers' other defaults (the learned loss weight of LSD/ESD/PSD included).

Teachers (LMD, EMD, PFMM):
* ``net``: a second ``FlowMap(MLP)`` of the same size, used through ``.velocity`` (the realistic,
  expensive case: a distillation teacher is a trained network), with a random non-zero output layer;
* ``gmm``: the analytic 3-component Gaussian-mixture velocity ``flowmaps.exact.GaussianMixture``
  (nearly free), as a secondary row.
PFMM stays in stage 0 (teacher = one Euler step of the teacher velocity); from stage 1 on its teacher is
a frozen copy of the student, a network of the same size, so the ``net`` row also prices later stages.

Cost model, in units of one forward pass ``F`` of the network (teacher ``T = 1`` for ``net``, ``0`` for
``gmm``; optimizer, data and small layers ignored). Forward+JVP costs ``C``; backward through a
differentiated forward costs ``2×`` that forward (two matmuls per matmul), so backward through
forward+JVP (reverse-over-forward) costs ``2C``:
  velocity ``1 + 2``; LMD ``C + 2C + T`` (LMD v-form ``C + 2 + T``: gradient through the primal only);
  EMD semigradient ``C + C + 2C + T`` as two JVPs (spec §3.9) or
  ``(2C − 1) + 2C + T`` when one pass carries both tangents; EMD full ``C + 2C + T``; EMD v-form
  ``C + 2 + T`` (gradient through the primal only); FMM ``1 + C + 2 + 2C``; PFMM ``2T + 1 + 2``;
  self-distillation ``3η + (1 − η)·off`` with ``off`` = LSD ``C + 2C + 1``, LSD-v ``C + 2 + 1``,
  MeanFlow ``C + 2``, ESD as EMD semigradient with ``T = 1``, PSD/shortcut ``2 + 1 + 2``.
Two columns: the spec's ``C ≈ 1.5`` ([P2] F.3), and ``C = 2``, the matmul FLOP count of an MLP (the
tangent needs one matmul per layer, like the primal), which is the floor the eager code approaches.

Options: ``--compile`` turns on the opt-in ``MLP.compile_jvp()`` for the students; ``--compile-forward``
also compiles every network's plain forward (velocity baseline and teacher included), the fair baseline
for ``--compile``; ``--malloc-tune`` is an experiment that keeps glibc from returning freed memory to the
OS (the page-fault column). Nothing is downloaded. Run: ``.venv/bin/python benchmarks/training_cost.py``.
To time another checkout of the library, put its ``src`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import flowmaps as fm
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import EMD, ESD, FMM, LMD, LSD, PFMM, PSD, MeanFlow, Shortcut, Velocity

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "training_cost.json"
C_JVP = 1.5  # spec §3.9: forward + JVP relative to one forward pass
TARGETS = {"lmd": 2.0, "emd": 2.5, "fmm": 2.5, "lsd": 1.36, "meanflow": 1.4}  # step / velocity step
ETA = 0.75  # diagonal fraction of the self-distillation rows ([P2] Table 2)
SELF_DISTILLATION = ("lsd", "lsd-split", "lsd-unweighted", "lsd-v", "esd", "psd", "meanflow", "shortcut")


def model_cost(method: str, teacher: str | None, c: float = C_JVP, fused_two_tangents: bool = False
               ) -> float:
    """Spec §3.9 cost model of one training step, in forward passes (see the module docstring)."""
    tc = {"net": 1.0, "gmm": 0.0, None: 0.0}[teacher]
    if method == "velocity":
        return 1 + 2
    if method == "lmd":
        return c + 2 * c + tc
    if method == "lmd-v":
        return c + 2 + tc
    if method == "emd-semigradient":
        no_grad_jvp = (c - 1) if fused_two_tangents else c
        return no_grad_jvp + c + 2 * c + tc
    if method == "emd-full":
        return c + 2 * c + tc
    if method == "emd-v":
        return c + 2 + tc
    if method == "fmm":
        return 1 + c + 2 + 2 * c
    if method == "pfmm":
        return 2 * tc + 1 + 2
    # Self-distillation: flow matching (1 + 2) on a fraction η, the off-diagonal residual on the rest,
    # its teacher the network itself (one forward without gradient where there is one).
    off = {"lsd": c + 2 * c + 1, "lsd-split": c + 2 * c + 1, "lsd-unweighted": c + 2 * c + 1,
           "lsd-v": c + 2 + 1, "meanflow": c + 2,
           "esd": ((c - 1) if fused_two_tangents else c) + c + 2 * c + 1,
           "psd": 2 + 1 + 2, "shortcut": 2 + 1 + 2}
    if method in off:
        return ETA * 3 + (1 - ETA) * off[method]
    raise ValueError(method)


def build_problem():
    interp = fm.Linear()
    gmm = GaussianMixture(
        means=[[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]],
        covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]], [[0.1, 0.0], [0.0, 0.1]]],
        weights=[0.5, 0.3, 0.2], interpolant=interp)
    data = gmm.sample(65536, generator=torch.Generator().manual_seed(0)).float()
    return interp, gmm, data


def make_network(width: int, depth: int, seed: int, random_output: bool = False) -> fm.FlowMap:
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(2, width=width, depth=depth))
    if random_output:  # a teacher with a non-trivial velocity (the MLP's output layer starts at zero)
        torch.nn.init.normal_(model.net.out.weight, std=0.5 / width**0.5)
        torch.nn.init.normal_(model.net.out.bias, std=0.1)
    return model


class _Row:
    def __init__(self, method: str, teacher: str | None, trainer: fm.Trainer):
        self.method, self.teacher, self.trainer = method, teacher, trainer
        self.times: list[float] = []      # wall clock per step
        self.cpu_times: list[float] = []  # CPU time of this process per step
        self.faults: list[int] = []       # minor page faults per step (fresh memory from the OS)
        self.skipped = 0

    @property
    def key(self) -> str:
        return self.method if self.teacher is None else f"{self.method} [{self.teacher}]"

    def step(self) -> tuple[float, float, int]:
        before = self.trainer.bad_steps
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, start = time.process_time(), time.perf_counter()
        self.trainer.step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.skipped += self.trainer.bad_steps > before
        return elapsed, cpu, faults


def build_rows(args, interp, gmm, data) -> list[_Row]:
    teachers = {"net": make_network(args.width, args.depth, seed=123, random_output=True)}
    teachers["net"].requires_grad_(False)
    if args.compile_forward:
        teachers["net"].net.compile()
    if not args.no_gmm:
        teachers["gmm"] = gmm
    specs: list[tuple[str, str | None]] = [("velocity", None), ("fmm", None)]
    for teacher in teachers:
        specs += [("lmd", teacher), ("lmd-v", teacher), ("emd-semigradient", teacher),
                  ("emd-full", teacher), ("emd-v", teacher), ("pfmm", teacher)]
    specs += [(name, None) for name in SELF_DISTILLATION]
    if args.only:
        keep = set(args.only.split(","))
        specs = [sp for sp in specs if sp[0] in keep or sp[0] == "velocity"]
    rows = []
    for method, teacher in specs:
        b = teachers.get(teacher)
        if method == "velocity":
            objective = Velocity(interp)
        elif method == "fmm":
            objective = FMM(interp)
        elif method == "lmd":
            objective = LMD(interp, b, form="map")
        elif method == "lmd-v":
            objective = LMD(interp, b, form="v")
        elif method.startswith("emd-"):
            objective = EMD(interp, b, form=method.split("-", 1)[1])
        elif method in SELF_DISTILLATION:  # the papers' defaults at η = 0.75
            objective = {"lsd": lambda: LSD(interp, eta=ETA), "lsd-split": lambda: _split(LSD(interp, eta=ETA)),
                         "lsd-unweighted": lambda: LSD(interp, eta=ETA, weighting="none"),
                         "lsd-v": lambda: LSD(interp, form="v", eta=ETA),
                         "esd": lambda: ESD(interp, eta=ETA), "psd": lambda: PSD(interp, eta=ETA),
                         "meanflow": lambda: MeanFlow(interp, eta=ETA),
                         "shortcut": lambda: Shortcut(interp, eta=ETA)}[method]()
        else:  # stays in stage 0 for the whole run: teacher = Euler step of b
            objective = PFMM(interp, b, stage_steps=10**9)
        model = make_network(args.width, args.depth, seed=0)
        if args.compile:
            model.net.compile_jvp()
        if args.compile_forward:  # plain forward of every network, so the baseline is compiled too
            model.net.compile()
        trainer = fm.Trainer(model, objective, data, batch_size=args.batch, lr=1e-4, grad_clip=1.0,
                             seed=1)
        rows.append(_Row(method, teacher, trainer))
    return rows


def _split(objective):
    """LSD with its diagonal and off-diagonal rows in two passes, as before the fused pass (the A/B
    reference of the ``lsd`` row)."""
    objective.fuse_passes = False
    return objective


def breakdown_step(row: _Row, parts: dict[str, list[float]]) -> None:
    """One step split into objective (forward), backward and clip+optimizer (mirrors Trainer.step)."""
    tr = row.trainer
    t0 = time.perf_counter()
    tr.objective.begin_step(tr.model, tr.step_count)
    out = tr.objective(tr.model, tr.draw(tr.batch_size), generator=tr.generator)
    t1 = time.perf_counter()
    tr.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
    tr.optimizer.step()
    tr.step_count += 1
    t3 = time.perf_counter()
    for name, dt in zip(("objective", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2)):
        parts.setdefault(name, []).append(dt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=150, help="timed rounds (one step of every row each)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-gmm", action="store_true", help="skip the analytic-teacher rows")
    p.add_argument("--only", default="", help="comma-separated methods to run (velocity always runs)")
    p.add_argument("--breakdown", type=int, default=0,
                   help="after the timing, N more steps per row split into objective/backward/optimizer")
    p.add_argument("--compile", action="store_true",
                   help="opt-in torch.compile of the network's forward+JVP (MLP.compile_jvp)")
    p.add_argument("--compile-forward", action="store_true",
                   help="also torch.compile the plain forward of every network (nn.Module.compile), "
                        "including the velocity baseline and the teacher: the fair baseline for --compile")
    p.add_argument("--malloc-tune", action="store_true",
                   help="experiment: stop glibc from returning freed memory to the OS (mallopt), which "
                        "removes the per-step page faults; not how a user's process runs by default")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0, help="seed of the round-robin order")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.malloc_tune:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_mmap_threshold, 1 << 30)
    interp, gmm, data = build_problem()
    rows = build_rows(args, interp, gmm, data)
    load_before = os.getloadavg()
    order_rng = random.Random(args.seed)

    start = time.perf_counter()
    for _ in range(args.warmup):
        for row in rows:
            row.step()
    for _ in range(args.repeats):
        order = rows[:]
        order_rng.shuffle(order)
        for row in order:
            wall, cpu, faults = row.step()
            row.times.append(wall)
            row.cpu_times.append(cpu)
            row.faults.append(faults)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()

    base = next(r for r in rows if r.method == "velocity")
    base_med = statistics.median(base.times)
    base_cpu = statistics.median(base.cpu_times)
    has_fused = hasattr(base.trainer.model.net, "forward_and_jvp")
    results = []
    for row in rows:
        med, cpu = statistics.median(row.times), statistics.median(row.cpu_times)
        q1, _, q3 = statistics.quantiles(row.times, n=4)
        per_round = [a / b for a, b in zip(row.times, base.times)]
        results.append(dict(
            method=row.method, teacher=row.teacher, median_ms=1e3 * med, q1_ms=1e3 * q1,
            q3_ms=1e3 * q3, cpu_median_ms=1e3 * cpu, ratio=med / base_med,
            cpu_ratio=cpu / base_cpu, ratio_per_round_median=statistics.median(per_round),
            page_faults_per_step=statistics.median(row.faults),
            model_ratio=model_cost(row.method, row.teacher) / model_cost("velocity", None),
            model_ratio_fused=model_cost(row.method, row.teacher, fused_two_tangents=True)
            / model_cost("velocity", None),
            flop_model_ratio=model_cost(row.method, row.teacher, c=2.0, fused_two_tangents=True)
            / model_cost("velocity", None),
            skipped_steps=row.skipped, steps=len(row.times)))
    if args.breakdown:  # interleaved like the timing
        parts: dict[str, dict[str, list[float]]] = {row.key: {} for row in rows}
        for _ in range(args.breakdown):
            order = rows[:]
            order_rng.shuffle(order)
            for row in order:
                breakdown_step(row, parts[row.key])
        for row, res in zip(rows, results):
            res["breakdown_ms"] = {k: 1e3 * statistics.median(v) for k, v in parts[row.key].items()}

    info = dict(
        width=args.width, depth=args.depth, batch=args.batch, repeats=args.repeats,
        warmup=args.warmup, torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(), torch=torch.__version__,
        python=sys.version.split()[0], machine=platform.machine(), cpu_count=os.cpu_count(),
        loadavg_before=load_before, loadavg_after=load_after, wall_seconds=wall,
        fused_jvp=has_fused, compile=args.compile, compile_forward=args.compile_forward,
        malloc_tune=args.malloc_tune, cost_model_C=C_JVP,
        flowmaps_source=str(Path(fm.__file__).parent))
    lines = [
        f"Training cost per step: MLP(2, width={args.width}, depth={args.depth}), batch {args.batch}, "
        f"{args.repeats} interleaved rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); loadavg {load_before[0]:.2f} -> {load_after[0]:.2f}; "
        f"flowmaps from {info['flowmaps_source']}; network forward+JVP fused: {has_fused}; "
        f"compile JVP: {args.compile}; compile forward: {args.compile_forward}; "
        f"malloc tuned: {args.malloc_tune}",
        "",
        "| method | teacher | median ms/step (wall) | IQR ms (wall) | ratio (wall) "
        "| per-round ratio (wall) | median CPU ms/step | **ratio (CPU time)** | target "
        "| spec §3.9 model (C=1.5) | MLP FLOP model (C=2, one pass) | page faults/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        model = f"{r['model_ratio']:.2f}×"
        if r["model_ratio_fused"] != r["model_ratio"]:
            model += f" ({r['model_ratio_fused']:.2f}× one pass)"
        target = TARGETS.get(r["method"].split("-")[0])
        lines.append(
            f"| {r['method']} | {r['teacher'] or '—'} | {r['median_ms']:.2f} | "
            f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f} | {r['ratio']:.2f}× | "
            f"{r['ratio_per_round_median']:.2f}× | {r['cpu_median_ms']:.2f} | "
            f"**{r['cpu_ratio']:.2f}×** | {f'≤ {target}×' if target else ''} | {model} | "
            f"{r['flop_model_ratio']:.2f}× | {r['page_faults_per_step']:.0f} |")
    lines += ["", "Ratios are to the velocity step of the same run. CPU time (this process, per step) is "
              "immune to preemption by other work on a shared machine; the wall-clock median is not "
              "(compare the per-round ratio, which pairs steps of the same round)."]
    if args.breakdown:
        lines += ["", "| method | teacher | objective ms | backward ms | clip+optimizer ms |",
                  "|---|---|---:|---:|---:|"]
        for r in results:
            b = r["breakdown_ms"]
            lines.append(f"| {r['method']} | {r['teacher'] or '—'} | {b['objective']:.2f} | "
                         f"{b['backward']:.2f} | {b['optimizer']:.2f} |")
    if any(r["skipped_steps"] for r in results):
        lines += ["", "warning: some steps were skipped (non-finite loss): "
                  + str({f"{r['method']}/{r['teacher']}": r["skipped_steps"] for r in results})]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(info=info, results=results), indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name} ({wall:.0f} s of timing)")


if __name__ == "__main__":
    main()
