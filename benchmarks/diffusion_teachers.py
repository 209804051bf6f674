"""Diffusion teachers judged against their own samplers (issue 17, part 2).

A user's 2-D DDPM, trained the diffusers way (``benchmarks/diffusion_client.py``: ``add_noise`` on the
gmm preset's mixture, a small MLP on (x, timestep)), is brought to flowmaps with
``teacher.factory=diffusion_client:make teacher.adapter=diffusers_vp``.

* ``teachers``: for ε- and v-prediction with the linear and ``squaredcos_cap_v2`` betas, W2 to held-out
  data of the teacher's dopri5 under each noise end (``exact``: the whole schedule; ``gaussian`` /
  ``clamp`` below ``tau_start``), and of the client's own samplers (diffusers DDIMScheduler, leading
  spacing; DDPMScheduler) and our DDIM / DPM-Solver++(2M) at 1, 2, 4, 8 steps.
* ``target``: the ε / ``squaredcos_cap_v2`` client, distilled with ``flowmaps distill`` (LMD, the gmm
  preset, ``train.steps`` small) with ``teacher.noise_end=exact`` (before) and the default (after), and
  evaluated by ``flowmaps evaluate`` with ``eval.schedulers=[own,DDIMScheduler]``: the map at k steps
  against the client's DDIM at 2k steps, k = 1, 2.

* ``why``: for each target run, the mean distance (same base points) of the map at k steps to its
  teacher's dopri5 endpoint and to the exact flow of the mixture, and the teacher's own distance.

Usage:  OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/diffusion_teachers.py \
            teachers|target|why|table [--seeds 0,1,2] [--steps 2000] [--noise-ends exact,auto]
(the results: ``teachers --seeds 0``, ``target --seeds 0,1,2 --steps 2000``, ``why --seeds 0,1,2``).
Writes benchmarks/results/diffusion_teachers/{teachers,target,why}.{json,md} (runs and the clients'
weights under runs/, not committed). ``target`` keeps the rows of other seeds / noise ends in
target.json; ``table`` rewrites target.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import diffusion_client as dc  # noqa: E402
import flowmaps as fm  # noqa: E402
from flowmaps.metrics.points import wasserstein2  # noqa: E402
from flowmaps.runs.config import load_config  # noqa: E402
from flowmaps.solvers import solve_ode  # noqa: E402
from flowmaps.teachers import samplers as S  # noqa: E402

ROOT = HERE / "results" / "diffusion_teachers"
MIXTURE = dict(means=[[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]],
               covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]], [[0.1, 0.0], [0.0, 0.1]]],
               weights=[0.5, 0.3, 0.2])
CLIENTS = [("squaredcos_cap_v2", "epsilon"), ("linear", "epsilon"), ("squaredcos_cap_v2", "v_prediction"),
           ("linear", "v_prediction")]
N, W2_SAMPLES = 4000, 2000


def mixture():
    return fm.exact.GaussianMixture(MIXTURE["means"], covs=MIXTURE["covs"], weights=MIXTURE["weights"])


def client(betas: str, prediction: str, seed: int, steps: int = 4000) -> Path:
    """Train (once) and save the client's network; returns its .safetensors."""
    from safetensors.torch import save_file

    path = ROOT / "runs" / "clients" / f"{prediction}-{betas}-seed{seed}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = mixture().sample(200_000, torch.Generator().manual_seed(100 + seed))
        start = time.perf_counter()
        model, _ = dc.train(data, betas, prediction, steps=steps, seed=seed)
        save_file(model.state_dict(), str(path))
        print(f"trained {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def load_client(betas, prediction, seed):
    from safetensors.torch import load_file

    model, scheduler = dc.make(betas, prediction)
    model.load_state_dict(load_file(str(client(betas, prediction, seed))))
    return model.eval().requires_grad_(False), scheduler


def w2(x, held):
    return wasserstein2(x, held, max_samples=W2_SAMPLES, generator=torch.Generator().manual_seed(0))


def teachers_stage(seeds):
    held = mixture().sample(N, torch.Generator().manual_seed(1))
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(5))
    rows = []
    ends = [("exact", None), ("gaussian", 0.01), ("gaussian", 0.05), ("gaussian", 0.1), ("gaussian", 0.2),
            ("clamp", 0.05)]
    # the bias of each noise end alone: the exact velocity of the mixture (a perfect model) with the
    # noise end applied, against the exact flow's samples
    from flowmaps.teachers.adapters import gaussian_velocity

    gm = mixture()
    perfect = dict(betas="-", prediction="perfect model", seed="-")
    exact_x = solve_ode(gm.velocity, x0.double(), "dopri5", rtol=1e-7, atol=1e-7).x.float()
    for end, start in ends:
        def velocity(x, t, end=end, start=start):
            if end == "exact":
                return gm.velocity(x, t)
            low = (t < start)[:, None]
            held = gm.velocity(x, t.clamp(min=start))
            return torch.where(low, gaussian_velocity(x, t, 1.0) if end == "gaussian" else held, held)
        name = end if start is None else f"{end} {start:g}"
        x = solve_ode(velocity, x0.double(), "dopri5", rtol=1e-6, atol=1e-6).x.float()
        perfect[f"dopri5 [{name}]"] = w2(x, held)
        perfect[f"mean |x - exact flow| [{name}]"] = float((x - exact_x).norm(dim=1).mean())
    rows.append(perfect)
    print(json.dumps(perfect), flush=True)
    for seed in seeds:
        for betas, prediction in CLIENTS:
            model, scheduler = load_client(betas, prediction, seed)
            row = dict(betas=betas, prediction=prediction, seed=seed)
            plain = fm.teachers.diffusers_vp(model, scheduler, noise_end="exact")
            for k in (1, 2, 4, 8):
                ddim = S.scheduler_sample(plain, x0, k, "DDIMScheduler")[0]
                row[f"diffusers DDIM {k}"] = w2(ddim, held)
                row[f"diffusers DDIM {k}: mean |x - exact flow|"] = float((ddim - exact_x).norm(dim=1).mean())
                row[f"diffusers DPM++ {k}"] = w2(S.scheduler_sample(
                    plain, x0, k, "DPMSolverMultistepScheduler")[0], held)
            for end, start in ends:
                teacher = fm.teachers.diffusers_vp(model, scheduler, noise_end=end, tau_start=start)
                name = end if start is None else f"{end} {start:g}"
                sol = solve_ode(teacher, x0, "dopri5", rtol=1e-4, atol=1e-4)
                row[f"dopri5 [{name}]"] = w2(sol.x, held)
                row[f"mean |x - exact flow| [{name}]"] = float((sol.x - exact_x).norm(dim=1).mean())
                row[f"dopri5 NFE [{name}]"] = sol.nfe
                for k in (4, 8):
                    row[f"DPM++ uniform_lambda {k} [{name}]"] = w2(
                        S.sample(teacher, x0, "dpmpp_2m", k, "uniform_lambda"), held)
                row[f"euler 16 [{name}]"] = w2(solve_ode(teacher, x0, "euler", steps=16).x, held)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write("teachers", rows, teachers_table(rows))


def teachers_table(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("betas", "prediction", "seed")))
    names = [f"{r['prediction']} {r['betas']} s{r['seed']}" for r in rows]
    lines = ["| quantity | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(rows)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(r.get(key, "–")) for r in rows) + " |")
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def target_stage(seeds, steps, noise_ends, eval_steps=(1, 2, 4, 8)):
    from flowmaps.runs.evaluate import evaluate_runs
    from flowmaps.runs.training import run_training

    previous = ROOT / "target.json"  # runs of other seeds / noise ends are kept
    results = json.loads(previous.read_text())["results"] if previous.exists() else []
    for seed in seeds:
        weights = client("squaredcos_cap_v2", "epsilon", seed)
        for end in noise_ends:
            out = ROOT / "runs" / f"lmd-{end}-seed{seed}"
            overrides = ["teacher.factory=diffusion_client:make", f"teacher.weights={weights}",
                         "teacher.adapter=diffusers_vp", f"teacher.noise_end={end}",
                         f"train.steps={steps}", f"train.seed={seed}", "train.log_every=500",
                         f"train.checkpoint_every={steps}"]
            cfg = load_config("gmm", None, ["objective.name=lmd"] + overrides)
            start = time.perf_counter()
            if not (out / "checkpoints" / "final.json").exists():
                run_training(cfg, out, overwrite=True, distill=True, label="lmd")
            seconds = time.perf_counter() - start
            ev = evaluate_runs([str(out)], None, ROOT / "runs" / f"eval-{end}-seed{seed}", True,
                               list(eval_steps), N, False, progress=False,
                               overrides=["eval.schedulers=[own,DDIMScheduler]", "eval.solvers=[euler]"])
            rows = [r.as_dict() for r in ev["rows"]]
            results = [r for r in results if (r["seed"], r["noise_end"]) != (seed, end)]
            results.append(dict(seed=seed, noise_end=end, train_steps=steps, train_seconds=seconds,
                                command=" ".join(["flowmaps distill --preset gmm --objective lmd"] + overrides),
                                rows=rows))
            summary = {(r["sampler"], r["steps"]): r["w2"] for r in rows}
            print(f"seed {seed} noise_end={end}: " + ", ".join(
                f"map@{k} {summary.get(('flow map', k), float('nan')):.3f} vs DDIM@{2 * k} "
                f"{summary.get(('DDIMScheduler', 2 * k), float('nan')):.3f}" for k in (1, 2, 4)), flush=True)
            write("target", sorted(results, key=lambda r: (r["noise_end"], r["seed"])),
                  target_table(sorted(results, key=lambda r: (r["noise_end"], r["seed"]))))


def target_table(results):
    """W2 to held-out data (and, after the slash, the mean distance to the exact flow of the mixture
    from the same base point): the map at k steps against the client's DDIM at 2k."""
    head = ["map 1", "DDIM 2", "map 2", "DDIM 4", "map 4", "DDIM 8", "DDPM 8 (own)", "DPM++ 8 (ours)"]
    lines = ["| seed | noise_end | " + " | ".join(head) + " | train s (wall) |",
             "|---|---|" + "---|" * (len(head) + 1)]
    for res in results:
        rows = {(r["sampler"], r["steps"]): r for r in res["rows"]}
        dpm = next((r for (s, k), r in rows.items() if s.startswith("dpmpp_2m") and k == 8), None)
        cells = [rows.get(key) for key in (("flow map", 1), ("DDIMScheduler", 2), ("flow map", 2),
                                           ("DDIMScheduler", 4), ("flow map", 4), ("DDIMScheduler", 8),
                                           ("DDPMScheduler", 8))] + [dpm]
        text = ["–" if c is None else f"{c['w2']:.3f} / {c['map_error']:.3f}"
                if c.get("map_error") is not None else f"{c['w2']:.3f}" for c in cells]
        lines.append(f"| {res['seed']} | {res['noise_end']} | " + " | ".join(text) +
                     f" | {res['train_seconds']:.0f} |")
    return "\n".join(lines)


def why_stage(seeds, noise_ends):
    """Where the distilled map's error comes from: for each target run, the mean distance from the same
    base points of the map at k steps to the exact flow of the mixture, to its teacher's dopri5
    endpoint (the teacher it was distilled from, same noise end), and the teacher's own distance to the
    exact flow."""
    from flowmaps.runs.models import load_model

    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(5))
    exact_x = solve_ode(mixture().velocity, x0.double(), "dopri5", rtol=1e-7, atol=1e-7).x.float()
    dist = lambda a, b: float((a - b).norm(dim=1).mean())  # noqa: E731
    rows = []
    for seed in seeds:
        model, scheduler = load_client("squaredcos_cap_v2", "epsilon", seed)
        for end in noise_ends:
            run = ROOT / "runs" / f"lmd-{end}-seed{seed}"
            if not (run / "checkpoints" / "final.json").exists():
                continue
            teacher = fm.teachers.diffusers_vp(model, scheduler, noise_end=end)
            ref = solve_ode(teacher, x0, "dopri5", rtol=1e-5, atol=1e-5).x
            flow_map = load_model(str(run)).model.eval()
            row = dict(seed=seed, noise_end=end, teacher_to_exact=dist(ref, exact_x))
            with torch.no_grad():
                for k in (1, 2, 4, 8):
                    x = flow_map.sample(x0, steps=k)
                    row[f"map{k}_to_exact"], row[f"map{k}_to_teacher"] = dist(x, exact_x), dist(x, ref)
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = ["teacher→exact"] + [f"map {k}→teacher / →exact" for k in (1, 2, 4, 8)]
    lines = ["| seed | noise_end | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['noise_end']} | {r['teacher_to_exact']:.4f} | " + " | ".join(
            f"{r[f'map{k}_to_teacher']:.4f} / {r[f'map{k}_to_exact']:.4f}" for k in (1, 2, 4, 8)) + " |")
    write("why", rows, "\n".join(lines))


def write(name, payload, table):
    ROOT.mkdir(parents=True, exist_ok=True)
    meta = dict(torch_threads=torch.get_num_threads(), load_average=os.getloadavg(), n_samples=N,
                w2_samples=W2_SAMPLES)
    (ROOT / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=payload), indent=2))
    (ROOT / f"{name}.md").write_text(table + "\n")
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["teachers", "target", "table", "why"])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=int, default=3000, help="LMD steps of the target stage")
    parser.add_argument("--noise-ends", default="exact,auto", help="target stage: teacher.noise_end values")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage == "table":  # rewrite target.md from target.json
        results = json.loads((ROOT / "target.json").read_text())["results"]
        (ROOT / "target.md").write_text(target_table(results) + "\n")
        print(target_table(results))
    elif args.stage == "teachers":
        teachers_stage(seeds)
    elif args.stage == "why":
        why_stage(seeds, args.noise_ends.split(","))
    else:
        target_stage(seeds, args.steps, args.noise_ends.split(","))


if __name__ == "__main__":
    main()
