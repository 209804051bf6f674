"""Benchmark — why a map's k-step error stops falling: the error of each jump, where it sits, and how the
jumps compose.

On ``gmm_hard`` (the preset's ten narrow components; exact flow map known) an LMD map is trained with
``fm.fit``'s defaults (the ``library`` row of ``quality_per_budget.py``), then measured against the exact
map on 4000 held-out base points carried exactly to each time ``s``:

* **jump errors** ``e(s, h) = mean |X̂_{s,s+h}(x_s) − X_{s,s+h}(x_s)|`` for the jumps of the uniform
  grids with ``k = 1, 2, 4, 8, 16`` steps (``h = 1/k``, ``s = i/k``), and their sum over a grid;
* **the composition**: the k-step error ``E_k = mean |X̂ ∘ … ∘ X̂(x_0) − X_{0,1}(x_0)|`` beside the sum of
  its jump errors (``E_k`` is at most that sum times the maps' Lipschitz growth);
* **the diagonal**: the velocity error ``mean |v̂_{s,s}(x_s) − b_s(x_s)|`` along the exact trajectories,
  which bounds what the short jumps can learn from a teacher they only see through their own ends;
* the same for the raw weights and the EMA, so the EMA's part is visible.

``--problem checkerboard`` does the same on the checkerboard, whose flow map has no closed form: the
reference is the teacher's own ODE (the 20000-step flow-matching velocity of ``quality_per_budget.py``,
solved by dopri5 at rtol = atol = 1e-7), so every error is a distance to the map LMD is asked to learn,
and the composed maps' KL to the board is printed beside it.

Each figure is over ``--seeds``; the table prints the mean. Usage:
  OMP_NUM_THREADS=1 python benchmarks/jump_errors.py --steps 4000 --seeds 0,1,2 [--recipe key=value ...]
  OMP_NUM_THREADS=1 python benchmarks/jump_errors.py --problem checkerboard --steps 4000 --seeds 0,1
Writes benchmarks/results/jump_errors/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import flowmaps as fm
from flowmaps.objectives import LMD
from flowmaps.runs.config import load_config
from flowmaps.runs.experiment import _gmm_reference

RESULTS = Path(__file__).resolve().parent / "results" / "jump_errors"
GRIDS = (1, 2, 4, 8, 16)


class TeacherReference:
    """A learned teacher as the reference: ``velocity`` is the network, ``flow`` its ODE by dopri5
    (float64 states, rtol = atol = 1e-7), ``sample`` the training data."""

    def __init__(self, problem):
        self.problem, self.net = problem, problem.teacher_net
        self.sigma_data = problem.sigma_data

    def velocity(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        return self.net.velocity(x.float(), t.float()).double()

    def flow(self, x0, s, t):
        if s == t:
            return x0
        return fm.solve_ode(self.velocity, x0.double(), method="dopri5", t0=s, t1=t, rtol=1e-7,
                            atol=1e-7).x

    def sample(self, n, generator=None):
        return self.problem.draw(n, generator)


def train(reference, interpolant, steps: int, seed: int, objective_options: dict):
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(2, sigma_data=getattr(reference, "sigma_data", 1.0)))
    result = fm.fit(model, LMD(interpolant, reference.velocity, **objective_options),
                    lambda n, generator=None: reference.sample(n, generator=generator),
                    steps=steps, batch_size=512, seed=seed)
    return {"raw": model.eval(), "ema": result.ema.eval()}


@torch.no_grad()
def measure(model, reference, x0: torch.Tensor, kl=None) -> dict:
    out: dict = {"jump": {}, "composed": {}, "jump_sum": {}}
    points = {}
    for k in GRIDS:  # exact points at every grid time
        for i in range(k + 1):
            s = i / k
            if s not in points:
                points[s] = x0 if s == 0 else reference.flow(x0, 0.0, s)
    for k in GRIDS:
        h, errors = 1.0 / k, []
        x = x0.float()
        for i in range(k):
            s = i / k
            exact_end = points[round(s + h, 12)] if round(s + h, 12) in points else \
                reference.flow(x0, 0.0, s + h)
            jump = model(points[s].float(), s, s + h)
            errors.append(float((jump.double() - exact_end).norm(dim=1).mean()))
            x = model(x, s, s + h)
        out["jump"][k] = errors
        out["jump_sum"][k] = sum(errors)
        out["composed"][k] = float((x.double() - points[1.0]).norm(dim=1).mean())
        if kl is not None:  # the composed map's law on its own 64,000 base points
            kl_fn, x0_kl = kl
            y = x0_kl.float()
            for i in range(k):
                y = model(y, i / k, (i + 1) / k)
            out.setdefault("kl", {})[k] = float(kl_fn(y))
    diag = {}
    for s in (0.0, 0.25, 0.5, 0.75, 0.875, 0.9375):
        xs = points.get(s, None)
        xs = reference.flow(x0, 0.0, s) if xs is None else xs
        t = torch.full((xs.shape[0],), s)
        diag[s] = float((model.velocity(xs.float(), t).double() - reference.velocity(xs, t.double()))
                        .norm(dim=1).mean())
    out["diagonal"] = diag
    return out


def mean_over(runs: list[dict], *path):
    vals = []
    for r in runs:
        v = r
        for key in path:
            v = v[key]
        vals.append(v)
    if isinstance(vals[0], list):
        return [statistics.fmean(col) for col in zip(*vals)]
    return statistics.fmean(vals)


def markdown(results: dict, argv: list[str], load: tuple) -> str:
    lines = [f"`benchmarks/jump_errors.py {' '.join(argv)}`", "",
             f"load average {load[0]} → {load[1]}", ""]
    for weights in ("ema", "raw"):
        runs = [r[weights] for r in results["runs"]]
        lines += [f"**{weights} weights** (mean over seeds {results['seeds']})", "",
                  "| k | composed E_k | Σ jump errors | jump errors e(i/k, 1/k), i = 0..k−1 |",
                  "|---|---|---|---|"]
        for k in GRIDS:
            jumps = mean_over(runs, "jump", k)
            kl = f" (KL {mean_over(runs, 'kl', k):.3f})" if "kl" in runs[0] else ""
            lines.append(f"| {k} | {mean_over(runs, 'composed', k):.4f}{kl} | "
                         f"{mean_over(runs, 'jump_sum', k):.4f} | "
                         + " ".join(f"{e:.4f}" for e in jumps) + " |")
        lines += ["", "diagonal velocity error |v̂_{s,s} − b_s| along the exact trajectories: "
                  + ", ".join(f"s={s}: {mean_over(runs, 'diagonal', s):.3f}"
                              for s in runs[0]["diagonal"]), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipe", nargs="*", default=[], help="LMD options key=value (Python literals)")
    p.add_argument("--problem", choices=["gmm_hard", "checkerboard"], default="gmm_hard")
    p.add_argument("--name", help="results file stem (default: PROBLEM_lmd)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    options = {}
    for item in args.recipe:
        key, _, raw = item.partition("=")
        try:
            options[key] = eval(raw, {"__builtins__": {}}, {})
        except Exception:
            options[key] = raw
    kl = None
    if args.problem == "gmm_hard":
        interpolant = fm.Linear()
        reference = _gmm_reference(load_config("gmm_hard"), interpolant)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality_per_budget import Checkerboard
        problem = Checkerboard(n_eval=4000)
        interpolant, reference = problem.interpolant, TeacherReference(problem)
        kl = (problem.kl, problem.interpolant.sample_base(torch.empty(64000, 2),
                                                          torch.Generator().manual_seed(54321)))
    x0 = interpolant.sample_base(torch.empty(4000, 2), torch.Generator().manual_seed(12345)).double()
    name = args.name or f"{args.problem}_lmd"
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"seeds": seeds, "steps": args.steps, "options": options, "runs": []}
    for seed in seeds:
        models = train(reference, interpolant, args.steps, seed, options)
        run = {w: measure(m, reference, x0, kl) for w, m in models.items()}
        results["runs"].append(run)
        print(f"seed {seed}: composed (ema) " + " ".join(
            f"{k}:{run['ema']['composed'][k]:.4f}" for k in GRIDS), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = markdown(results, sys.argv[1:], (load_start, os.getloadavg()))
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
