"""Benchmark — bf16 against fp32 on the CPU, for every objective (issue 18, parts 3 and 7; spec E.12).

``train.precision=bf16`` autocasts the plain forward passes and keeps the JVPs in full fp32
(:mod:`flowmaps.precision`). Measured side by side in this one process, one thread:

(a) **loss and gradient** — for every objective of the config on the gmm_hard preset (its MLP 256×4 and its
    objective blocks), the relative difference of the bf16 loss from the fp32 loss, the relative error
    and cosine of the bf16 gradient (model and learned loss weight), on ``--batches`` batches, each drawn
    once and given to both precisions with the same generator: at initialisation and at the fp32 run's
    trained weights of (b) (seed 0);
(b) **the k-step error after a short run** — each objective trained ``--steps`` steps × ``--batch`` in
    fp32 and in bf16 from the same seed (same initial weights, batches and times), for each of
    ``--seeds``; the exact-map error ``mean |X̂_{0,1}(x) − X_{0,1}(x)|`` of the EMA weights at k = 1, 2, 4,
    8 jumps on quality_per_budget's 4000 held-out base points (``GMMHard``, reused). The velocity
    objective is scored with k Euler steps of its diagonal; sCT with one jump (its map is ``X_{s,1}``
    only). The distillations use the preset's exact teacher (no network pass) and, as ``lmd (net)``
    and ``emd (net)``, a velocity MLP trained here (fp32, ``--teacher-steps``), whose forward autocasts;
    ``pfmm (bf16 residual)`` is PFMM with its residual autocast like any plain pass, as it was before its
    residual was kept in fp32 (the evidence for that rule);
(c) **step time** — CPU seconds (``time.process_time``) of one training step in fp32 and in bf16 for the
    gmm_hard MLP, the digits U-Net and a digits DiT (width 64, 6 blocks, 4 heads, patch 2, as
    ``benchmarks/dit_digits.py``) on ``velocity`` (plain passes only) and ``lsd`` (a plain diagonal and a
    fp32 JVP), measured round-robin (every configuration once per round, ``--reps`` rounds after 3 warm-up
    steps each): median per configuration and the median of the per-round bf16/fp32 ratios.

The load average is recorded at the start and the end (the machine is shared). No GPU figure exists.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/precision.py [--steps 500] [--batch 256] \\
        [--seeds 0,1] [--batches 8] [--reps 15] [--teacher-steps 2000]

Writes benchmarks/results/precision/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_per_budget import GMMHard  # noqa: E402  (the exact-map error of quality_per_budget)

from flowmaps.precision import PRECISIONS  # noqa: E402
from flowmaps.runs import experiment as ex  # noqa: E402
from flowmaps.runs import models  # noqa: E402
from flowmaps.runs.config import load_config  # noqa: E402
from flowmaps.runs.validation import CHOICES  # noqa: E402
from flowmaps.solvers import solve_ode  # noqa: E402
from flowmaps.train.trainer import Trainer  # noqa: E402

RESULTS = HERE / "results" / "precision"
K_STEPS = (1, 2, 4, 8)
DIT = ["model.name=dit", "model.dit_width=64", "model.dit_depth=6", "model.heads=4", "model.patch=2"]


# --- building a run from the presets --------------------------------------------------------------

def build(preset: str, name: str, seed: int, steps: int, batch: int, precision: str, extra=(),
          teacher=None) -> Trainer:
    """A Trainer as a run of ``preset`` with ``objective.name=name`` builds it (the preset's objective
    block, lr, clipping, EMA), ``steps`` long, ``batch`` per step, in ``precision``; ``teacher``
    replaces the preset's (exact) teacher."""
    cfg = load_config(preset, overrides=[f"objective.name={name}", f"train.steps={steps}", *extra])
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    interpolant = models.build_interpolant(cfg, scales)
    ex.attach_reference(cfg, bundle, interpolant)
    if teacher is None and ex.needs_teacher(cfg):
        teacher = ex.build_teacher(cfg, bundle, scales, "cpu")
    torch.manual_seed(seed)
    model = models.build_model(cfg, scales)
    t = cfg.train
    return Trainer(model, ex.build_objective(cfg, interpolant, teacher), bundle.train, batch_size=batch,
                   lr=t.lr, grad_clip=t.grad_clip, lr_decay_start=t.lr_decay_start, ema_decay=t.ema_decay,
                   seed=seed, precision=precision, total_steps=steps)


def short_run_options(name: str, steps: int) -> list[str]:
    """Schedules of the preset stated in steps, scaled to the short run: sCT's tangent warm-up (a quarter
    of the run, as its preset block) and PFMM's stages (four in the run, so its frozen teacher, a plain
    pass, takes over)."""
    if name == "sct":
        return [f"objective.tangent_warmup={steps // 4}"]
    if name == "pfmm":
        return [f"objective.stage_steps={steps // 4}"]
    return []


# --- (a) loss and gradient ------------------------------------------------------------------------

def loss_and_grad(trainer: Trainer, x1: torch.Tensor, seed: int, precision: str):
    model, objective = trainer.model, trainer.objective
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = objective(model, x1, None, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out.loss.item(), grad


def differences(trainer: Trainer, batches: int, batch: int) -> dict:
    """Mean and max over ``batches`` of the relative loss difference, the gradient's relative error and
    one minus its cosine (in float64), bf16 against fp32 at the trainer's present weights; and, as the
    yardstick, ``noise``: the mean gradient error over the batch-to-batch spread of the fp32 gradient,
    ``mean_i |g16_i − g32_i| / mean_i |g32_i − mean_j g32_j|`` (the minibatch noise SGD tolerates anyway).
    The batches come from a generator of their own: the trainer's stream (its next batches) is left
    alone."""
    trainer.model.train()
    data, g = trainer.draw.data, torch.Generator().manual_seed(999)
    rows, grads, errors = [], [], []
    for i in range(batches):
        x1 = data[torch.randint(data.shape[0], (batch,), generator=g)]
        loss32, g32 = loss_and_grad(trainer, x1, 1000 + i, "fp32")
        loss16, g16 = loss_and_grad(trainer, x1, 1000 + i, "bf16")
        g32, g16 = g32.double(), g16.double()
        grads.append(g32)
        errors.append(float((g16 - g32).norm()))
        norm = float(g32.norm())
        rows.append({"loss": abs(loss16 - loss32) / max(abs(loss32), 1e-30),
                     "grad": float((g16 - g32).norm()) / norm if norm > 0 else 0.0,
                     "one_minus_cos": 1.0 - float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
                     if norm > 0 else 0.0})
    out = {key: {"mean": statistics.fmean(r[key] for r in rows), "max": max(r[key] for r in rows)}
           for key in rows[0]}
    stacked = torch.stack(grads)
    spread = float((stacked - stacked.mean(0)).norm(dim=1).mean())
    out["noise"] = statistics.fmean(errors) / spread if spread > 0 else 0.0
    return out


# --- (b) the k-step error -------------------------------------------------------------------------

@torch.no_grad()
def k_step_errors(problem: GMMHard, name: str, model) -> dict:
    model = model.eval()
    out = {}
    for k in K_STEPS:
        if name == "velocity":
            x = solve_ode(lambda y, t: model.velocity(y, t), problem.x0, "euler", steps=k).x
        elif name == "sct" and k > 1:
            continue  # X_{s,1} only: k > 1 jumps need γ-sampling, a stochastic sampler
        else:
            x = model.sample(problem.x0, steps=k)
        out[k] = problem.score(x)
    return out


def velocity_teacher(steps: int, batch: int):
    """A velocity MLP for the distillations' network teacher: flow matching on gmm_hard, fp32, seed 0;
    its EMA, frozen."""
    trainer = build("gmm_hard", "velocity", 0, steps, batch, "fp32")
    trainer.run(steps, progress=False)
    return trainer.ema.eval().requires_grad_(False)


def quality(problem, names, seeds, steps, batch, batches, teacher) -> dict:
    rows = {}
    for label in names:
        name, _, variant = label.partition(" ")
        extra = short_run_options(name, steps)
        network_teacher = variant == "(net)"
        rows[label] = {"runs": [], "differences": {}}
        for seed in seeds:
            for precision in PRECISIONS:
                trainer = build("gmm_hard", name, seed, steps, batch, precision, extra,
                                teacher=teacher.velocity if network_teacher else None)
                if variant == "(bf16 residual)":  # PFMM's residual without its full-fp32 scope
                    trainer.objective.terms = trainer.objective._terms
                if seed == seeds[0] and precision == "fp32":
                    rows[label]["differences"]["init"] = differences(trainer, batches, batch)
                start = time.process_time()
                trainer.run(steps, progress=False)
                cpu = time.process_time() - start
                if seed == seeds[0] and precision == "fp32":
                    rows[label]["differences"]["trained"] = differences(trainer, batches, batch)
                errors = k_step_errors(problem, name, trainer.ema)
                rows[label]["runs"].append({"seed": seed, "precision": precision, "errors": errors,
                                            "cpu_s": cpu})
                print(f"{label:12s} seed {seed} {precision}: "
                      + " ".join(f"{k}:{v:.4f}" for k, v in errors.items()) + f"  ({cpu:.1f} s)", flush=True)
    return rows


# --- (c) step time --------------------------------------------------------------------------------

def step_times(reps: int, batch_mlp: int) -> dict:
    configs = {}
    for net, preset, extra, batch in (("MLP", "gmm_hard", [], batch_mlp), ("U-Net", "digits", [], 128),
                                      ("DiT", "digits", DIT, 128)):
        for name in ("velocity", "lsd"):
            for precision in PRECISIONS:
                configs[(net, name, precision)] = build(preset, name, 0, 1000, batch, precision, extra)
    times = {key: [] for key in configs}
    for trainer in configs.values():
        for _ in range(3):
            trainer.step()
    for _ in range(reps):  # round-robin: every configuration once per round
        for key, trainer in configs.items():
            start = time.process_time()
            trainer.step()
            times[key].append(time.process_time() - start)
    out = {}
    for net, name, precision in configs:
        if precision != "fp32":
            continue
        fp32, bf16 = times[(net, name, "fp32")], times[(net, name, "bf16")]
        ratios = [b / a for a, b in zip(fp32, bf16)]
        out[f"{net} {name}"] = {"fp32_ms": 1e3 * statistics.median(fp32),
                                "bf16_ms": 1e3 * statistics.median(bf16),
                                "ratio_median": statistics.median(ratios),
                                "ratio_min": min(ratios), "ratio_max": max(ratios),
                                "batch": configs[(net, name, "fp32")].batch_size}
    return out


# --- report ---------------------------------------------------------------------------------------

def summary(rows: dict) -> dict:
    """Per objective and precision: mean, min and max over seeds of the k-step error, and the mean of the
    per-seed ratios bf16/fp32."""
    out = {}
    for label, row in rows.items():
        per = {}
        for precision in PRECISIONS:
            runs = [r for r in row["runs"] if r["precision"] == precision]
            per[precision] = {k: {"mean": statistics.fmean(r["errors"][k] for r in runs),
                                  "min": min(r["errors"][k] for r in runs),
                                  "max": max(r["errors"][k] for r in runs)}
                              for k in runs[0]["errors"]}
        pairs = {}
        for r in row["runs"]:
            pairs.setdefault(r["seed"], {})[r["precision"]] = r["errors"]
        per["ratio"] = {k: statistics.fmean(p["bf16"][k] / p["fp32"][k] for p in pairs.values())
                        for k in per["fp32"]}
        per["identical"] = all(p["bf16"] == p["fp32"] for p in pairs.values())
        out[label] = per
    return out


def markdown(meta: dict, rows: dict, summ: dict, timing: dict) -> str:
    lines = [f"`{meta['command']}`", "",
             f"torch {meta['torch']}, CPU capability {meta['cpu_capability']}, 1 thread; load average "
             f"{meta['load_average_start']} → {meta['load_average_end']}; {meta['cpu_s']:.0f} CPU s in all.", "",
             f"## (a) bf16 against fp32: loss and gradient (gmm_hard, MLP 256×4, {meta['batches']} batches of "
             f"{meta['batch']})", "",
             "Relative loss difference, gradient relative error and 1 − cosine: mean [max] over the batches; "
             "at initialisation and at the fp32 run's trained weights (seed "
             f"{meta['seeds'][0]}, {meta['steps']} steps).", "",
             "Last column: the gradient error over the batch-to-batch spread of the fp32 gradient (the "
             "minibatch noise SGD tolerates anyway), at the trained weights.", "",
             "| objective | loss (init) | gradient (init) | loss (trained) | gradient (trained) "
             "| 1 − cos (trained) | gradient / batch spread |", "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        init, trained = row["differences"]["init"], row["differences"]["trained"]
        cells = [f"{d[key]['mean']:.1e} [{d[key]['max']:.1e}]" for d, key in
                 ((init, "loss"), (init, "grad"), (trained, "loss"), (trained, "grad"),
                  (trained, "one_minus_cos"))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {trained['noise']:.3f} |")
    lines += ["", f"## (b) k-step exact-map error after {meta['steps']} steps × {meta['batch']} (gmm_hard)", "",
              f"Mean [min–max] over seeds {meta['seeds']} of mean |X̂_(0,1) − X_(0,1)| (EMA weights); "
              "bf16/fp32 is the mean of the per-seed ratios (same seed: same initial weights, batches and "
              "times). ``=`` marks runs bit-identical in both precisions.", "",
              "| objective | precision | " + " | ".join(f"k={k}" for k in K_STEPS) + " |",
              "|---|---|" + "---|" * len(K_STEPS)]
    for label, per in summ.items():
        for precision in PRECISIONS:
            cells = [f"{per[precision][k]['mean']:.4f} [{per[precision][k]['min']:.3f}–"
                     f"{per[precision][k]['max']:.3f}]" if k in per[precision] else "–" for k in K_STEPS]
            lines.append(f"| {label} | {precision} | " + " | ".join(cells) + " |")
        ratio = [f"{per['ratio'][k]:.3f}" if k in per["ratio"] else "–" for k in K_STEPS]
        lines.append(f"| {label} | bf16/fp32{' =' if per['identical'] else ''} | " + " | ".join(ratio) + " |")
    lines += ["", f"## (c) step time, CPU (1 thread, round-robin, {meta['reps']} rounds)", "",
              "| network, objective | batch | fp32 ms | bf16 ms | bf16/fp32 (median [min–max] per round) |",
              "|---|---|---|---|---|"]
    for key, t in timing.items():
        lines.append(f"| {key} | {t['batch']} | {t['fp32_ms']:.1f} | {t['bf16_ms']:.1f} | "
                     f"{t['ratio_median']:.2f} [{t['ratio_min']:.2f}–{t['ratio_max']:.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--objectives", default=None,
                   help="comma-separated objective names (default: every objective, lmd/emd with a "
                        "network teacher and pfmm with a bf16 residual)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start_cpu = time.process_time()
    names = (args.objectives.split(",") if args.objectives
             else list(CHOICES["objective.name"]) + ["lmd (net)", "emd (net)", "pfmm (bf16 residual)"])
    seeds = [int(s) for s in args.seeds.split(",")]
    meta = {"command": ("OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/precision.py " + shlex.join(
                sys.argv[1:] if argv is None else argv)).rstrip(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()], "steps": args.steps,
            "batch": args.batch, "seeds": seeds, "batches": args.batches, "reps": args.reps,
            "teacher_steps": args.teacher_steps}
    problem = GMMHard()
    teacher = (velocity_teacher(args.teacher_steps, args.batch) if any(n.endswith("(net)") for n in names)
               else None)
    rows = quality(problem, names, seeds, args.steps, args.batch, args.batches, teacher)
    timing = step_times(args.reps, args.batch)
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["cpu_s"] = time.process_time() - start_cpu
    summ = summary(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(
        {"meta": meta, "objectives": rows, "summary": summ, "step_time": timing}, indent=1))
    table = markdown(meta, rows, summ, timing)
    (RESULTS / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
