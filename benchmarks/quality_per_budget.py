"""Benchmark — map quality per training budget: what a flow map is worth after N steps × 512.

Problems:
* ``gmm_hard`` (the preset: ten narrow components, exact velocity as teacher): the exact-map error
  ``mean |X̂_{0,1}(x) − X_{0,1}(x)|`` on 4000 held-out base points (seed 12345, never used in training)
  at 1, 2, 4, 8, 16 steps;
* ``checkerboard`` (the preset; the teacher is a velocity trained by flow matching, 20000 × 512, lr 2e-3
  as in ``benchmarks/quality_vs_cost.py``, trained once and cached): histogram KL against the exact
  density on 64000 samples at 1, 2, 4, 8, 16 steps.

Every row is a training recipe run over several seeds *in this one process*, side by side: ``library``
is ``fm.fit`` with its own defaults (``FlowMap(MLP(2))``, ``LMD(interpolant, teacher)``, 512 per batch,
sampled with the EMA it returns); ``fit-defaults`` is what ``fit`` did before this benchmark (no EMA,
constant lr 1e-3, no clipping, MLP with 8 Fourier time frequencies); ``fit`` is ``fit``'s present
defaults through the Trainer (the ``library`` row's training); ``fit-defaults+key=value+…`` and
``fit+key=value+…`` change one option at a time (``flowmaps.Trainer``, ``MLP`` and ``LMD`` options;
sampled with the EMA weights when the recipe keeps an EMA); and, as the reference rows, ``plain``: a
40-line LMD loop written here (a plain MLP on ``(x, s, t)``, ``torch.func.jvp``, Adam 1e-3, no EMA,
nothing else), and ``plain-ema``: the same loop keeping an EMA of its weights (decay 0.999 with the usual
warm-up), sampled with the EMA, as most training loops are: the fair reference, since an EMA alone is
worth a lot here. Reported per row: mean, min, max and max/min over seeds at each step count, the ratio
of the mean 1-step error to each plain loop's, and the CPU seconds of training (``time.process_time``,
one thread). The load average is recorded.

Usage (one thread; a recipe list, a budget list and the seeds):
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/quality_per_budget.py --problem gmm_hard \
      --budgets 1000,4000,16000 --seeds 0,1,2 --recipes plain,fit-defaults,library
Writes benchmarks/results/quality_per_budget/<name>.json and .md (``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import flowmaps as fm
from flowmaps.objectives import LMD
from flowmaps.runs.config import load_config
from flowmaps.runs.experiment import _gmm_reference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality_per_budget"
STEPS = (1, 2, 4, 8, 16)


# --- the reference row: a plain LMD loop, as a new user writes it --------------------------------

class PlainNet(nn.Module):
    def __init__(self, dim=2, width=256, depth=4):
        super().__init__()
        layers, fan = [], dim + 2
        for _ in range(depth):
            layers += [nn.Linear(fan, width), nn.GELU()]
            fan = width
        self.net = nn.Sequential(*layers, nn.Linear(fan, dim))

    def forward(self, x, s, t):
        return self.net(torch.cat([x, s[:, None], t[:, None]], dim=1))


class PlainMap(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, s, t):
        return x + (t - s)[:, None] * self.net(x, s, t)

    def sample(self, x0, steps=1, grid=None):
        grid = torch.linspace(0, 1, steps + 1) if grid is None else grid
        x = x0
        for a, b in zip(grid[:-1], grid[1:]):
            x = self(x, a.expand(len(x)), b.expand(len(x)))
        return x


def plain_lmd(problem, steps, batch, seed, ema_decay=None):
    """The plain loop; with ``ema_decay`` it keeps an exponential moving average of the weights, as most
    training loops do (decay ``min(ema_decay, (1 + k)/(10 + k))`` after ``k`` updates: the usual
    warm-up), and returns it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = PlainMap(PlainNet(problem.dim))
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for k in range(steps):
        x1 = problem.draw(batch, g)
        x0 = problem.interpolant.sample_base(x1, g)
        a, b = torch.rand(batch, generator=g), torch.rand(batch, generator=g)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        x_s = problem.interpolant.interpolate(x0, x1, s)
        x_t, dx_t = torch.func.jvp(lambda tt: model(x_s, s, tt), (t,), (torch.ones_like(t),))
        with torch.no_grad():
            target = problem.teacher(x_t, t)
        loss = (dx_t - target).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            decay = min(ema_decay, (1 + k) / (10 + k))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
    return (ema if ema is not None else model).eval()


# --- the library's rows ---------------------------------------------------------------------------

# Each recipe: options of MLP (model), LMD (objective) and Trainer (train). "fit-defaults" is what
# fm.fit(FlowMap(MLP(2)), LMD(interp, teacher), data, steps=N, batch_size=512) did before this work.
OLD_FIT = dict(model=dict(n_frequencies=8), objective=dict(weighting="none"),
               train=dict(lr=1e-3, grad_clip=None, lr_decay_start=None, ema_decay=None))
# "fit" is fm.fit's present defaults through the Trainer (the ``library`` row's training), the base of
# one-option variants of today's defaults, e.g. ``fit+objective.form=v`` (the v-form of LMD).
FIT = dict(model={}, objective={}, train=dict(lr=1e-3, ema_decay=0.999))
RECIPES: dict[str, dict] = {"fit-defaults": OLD_FIT, "fit": FIT}


def fit_defaults(problem, steps, batch, seed):
    """The ``library`` row: ``fm.fit`` with its own defaults on ``FlowMap(MLP(d))`` and ``LMD``,
    sampled with the EMA when fit keeps one (``.ema`` of its result)."""
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(problem.dim, sigma_data=problem.sigma_data))
    result = fm.fit(model, LMD(problem.interpolant, problem.teacher), problem.draw_fn, steps=steps,
                    batch_size=batch, seed=seed)
    ema = getattr(result, "ema", None)
    return (ema if ema is not None else model).eval()


def recipe(name: str) -> dict:
    """A named recipe, or ``base+key=value+key=value`` on top of one (keys ``model.*``,
    ``objective.*``, ``train.*``, and ``batch`` / ``steps`` (this row's batch size, or its step count
    instead of the budget's, e.g. for a comparison at equal CPU time); values parsed as Python literals where possible)."""
    parts = name.split("+")
    base = RECIPES[parts[0]] if parts[0] in RECIPES else RECIPES["fit-defaults"]
    out = {k: dict(v) for k, v in base.items()}
    for item in parts[1:] if parts[0] in RECIPES else parts:
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".") if "." in key else ("run", "", key)
        try:
            value = eval(raw, {"__builtins__": {}}, {"None": None})  # numbers, None, tuples
        except Exception:
            value = raw
        out.setdefault(section, {})[field] = value
    return out


def library_lmd(problem, steps, batch, seed, spec):
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(problem.dim, sigma_data=problem.sigma_data, **spec["model"]))
    objective = LMD(problem.interpolant, problem.teacher, **spec["objective"])
    trainer = fm.Trainer(model, objective, problem.draw_fn, batch_size=batch, seed=seed,
                         **dict(dict(total_steps=steps), **spec["train"]))
    trainer.run(steps, progress=False)
    return (trainer.ema if trainer.ema is not None else model).eval()


# --- problems -------------------------------------------------------------------------------------

class GMMHard:
    name = "gmm_hard"
    metric = "map_error"

    def __init__(self, n_eval=4000):
        cfg = load_config("gmm_hard")
        self.interpolant = fm.Linear()
        self.reference = _gmm_reference(cfg, self.interpolant)
        self.dim, self.sigma_data = 2, 1.0
        self.teacher = self.reference.velocity
        g = torch.Generator().manual_seed(12345)
        self.x0 = self.interpolant.sample_base(torch.empty(n_eval, 2), g)
        self.x1 = self.reference.flow(self.x0.double(), 0.0, 1.0)

    def draw(self, n, g):
        return self.reference.sample(n, generator=g)

    def draw_fn(self, n, generator=None):
        return self.reference.sample(n, generator=generator)

    def score(self, x):
        return float((x.double() - self.x1).norm(dim=1).mean())


class Checkerboard:
    name = "checkerboard"
    metric = "kl"

    def __init__(self, n_eval=64000, teacher_steps=20000):
        from flowmaps.data.points import make_dataset
        from flowmaps.metrics.points import checkerboard_kl

        self.make, self.kl = make_dataset, checkerboard_kl
        data = make_dataset("checkerboard", 200_000, torch.Generator().manual_seed(1234))
        self.data = data
        std = data.std(dim=0)
        self.interpolant, self.dim, self.sigma_data = fm.Linear(std), 2, std
        self.teacher_net = self._teacher(teacher_steps)
        self.teacher = self.teacher_net.velocity
        g = torch.Generator().manual_seed(12345)
        self.x0 = self.interpolant.sample_base(torch.empty(n_eval, 2), g)

    def _teacher(self, steps):
        from flowmaps.checkpoint import load_checkpoint, save_checkpoint
        from flowmaps.objectives import Velocity

        stem = RESULTS / "checkpoints" / f"checkerboard_teacher_{steps}"
        # 8 Fourier time frequencies, as the CLI's velocity runs (MLP's own default, raw times, is
        # LMD's); fixed here so the cached teacher stays loadable whatever that default is.
        net = fm.FlowMap(fm.MLP(2, sigma_data=self.sigma_data, n_frequencies=8))
        if stem.with_suffix(".json").exists():
            groups, _ = load_checkpoint(stem, check=lambda where, meta: None)
            net.load_state_dict(groups["ema"])
        else:
            print(f"training the checkerboard teacher ({steps} steps) ...", flush=True)
            tr = fm.Trainer(net, Velocity(self.interpolant), self.data, batch_size=512, lr=2e-3,
                            grad_clip=10.0, lr_decay_start=steps // 4, ema_decay=0.999, seed=0)
            tr.run(steps, progress=False)
            stem.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(stem, {"ema": tr.ema.state_dict()}, {"steps": steps})
            net.load_state_dict(tr.ema.state_dict())
        net.eval().requires_grad_(False)
        return net

    def draw(self, n, g):
        return self.data[torch.randint(len(self.data), (n,), generator=g)]

    @property
    def draw_fn(self):
        return self.data

    def score(self, x):
        return float(self.kl(x))


PROBLEMS = {"gmm_hard": GMMHard, "checkerboard": Checkerboard}


# --- the run --------------------------------------------------------------------------------------

@torch.no_grad()
def scores(problem, model) -> dict:
    return {k: problem.score(model.sample(problem.x0, steps=k)) for k in STEPS}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in STEPS:
        vals = [r["scores"][k] for r in runs]
        out[k] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                  "spread": max(vals) / min(vals) if min(vals) > 0 else float("inf")}
    out["cpu_s"] = statistics.fmean(r["cpu_s"] for r in runs)
    return out


def markdown(results: dict, problem, budgets) -> str:
    lines = []
    for steps in budgets:
        block = results[str(steps)]
        plain, plain_ema = block.get("plain"), block["rows"].get("plain-ema")
        lines.append(f"\n{problem.name}, {steps} steps × {block['batch']}, {problem.metric} "
                     "(mean over seeds [min–max]; max/min at 1 step; mean 1-step / each plain loop's)\n")
        lines.append("| recipe | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in STEPS)
                     + " | max/min (1) | / plain (1) | / plain-ema (1) | CPU s |")
        lines.append("|---|" + "---|" * (len(STEPS) + 4))
        for name, row in block["rows"].items():
            if "summary" not in row:
                continue
            s = row["summary"]
            cells = [f"{s[k]['mean']:.4f} [{s[k]['min']:.3f}–{s[k]['max']:.3f}]" for k in STEPS]
            ratios = [f"{s[1]['mean'] / ref['summary'][1]['mean']:.2f}"
                      if ref and "summary" in ref else "–" for ref in (plain, plain_ema)]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {s[1]['spread']:.2f} | {' | '.join(ratios)} | {s['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write(stem: Path, meta: dict, results: dict, problem) -> str:
    """Write ``stem.json`` and ``stem.md`` with every row so far; returns the table."""
    meta = dict(meta, load_average_end=os.getloadavg())
    budgets = [int(k) for k in results]
    table = markdown({k: dict(v, plain=v["rows"].get("plain")) for k, v in results.items()},
                     problem, budgets)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    command = " ".join(["benchmarks/quality_per_budget.py"] + [repr(a) if "," in a or "+" in a else a
                                                               for a in meta["argv"]])
    stem.with_suffix(".md").write_text(f"`{command}`\n\nload average {meta['load_average_start']} → "
                                       f"{meta['load_average_end']}\n{table}")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="gmm_hard")
    p.add_argument("--budgets", default="4000", help="training steps, comma-separated")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", default="plain,plain-ema,library",
                   help="comma-separated: plain, plain-ema, a named recipe, or base+section.key=value+..., each "
                        "optionally as label:recipe (the label names the row)")
    p.add_argument("--name", default=None, help="results file stem (default: <problem>)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = PROBLEMS[args.problem]()
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [r for r in args.recipes.split(",") if r]
    meta = {"problem": args.problem, "batch": args.batch, "seeds": seeds, "threads": args.threads,
            "load_average_start": os.getloadavg(), "argv": sys.argv[1:]}
    results: dict = {}
    stem = RESULTS / (args.name or args.problem)
    for steps in budgets:
        block = results.setdefault(str(steps), {"batch": args.batch, "rows": {}})
        for seed in seeds:          # seeds outermost: every recipe sees the same load drift
            for item in names:
                label, _, name = item.rpartition(":")
                label = label or name
                start = time.process_time()
                if name == "plain":
                    model = plain_lmd(problem, steps, args.batch, seed)
                elif name == "plain-ema":
                    model = plain_lmd(problem, steps, args.batch, seed, ema_decay=0.999)
                elif name == "library":
                    model = fit_defaults(problem, steps, args.batch, seed)
                else:
                    spec = recipe(name)
                    batch = spec.get("run", {}).get("batch", args.batch)
                    model = library_lmd(problem, spec.get("run", {}).get("steps", steps), batch, seed,
                                        spec)
                cpu = time.process_time() - start
                sc = scores(problem, model)
                row = block["rows"].setdefault(label, {"recipe": name, "runs": []})
                row["runs"].append({"seed": seed, "scores": sc, "cpu_s": cpu})
                row["summary"] = summarise(row["runs"])
                print(f"{steps} steps seed {seed} {label}: " + " ".join(
                    f"{k}:{v:.4f}" for k, v in sc.items()) + f" ({cpu:.0f} s CPU)", flush=True)
                write(stem, meta, results, problem)  # after every run: a stopped run keeps its rows
    print(write(stem, meta, results, problem))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
