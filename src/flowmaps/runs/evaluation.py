"""Quality versus cost: flow maps at k jumps against their teacher's ODE solvers at the same NFE.

For each flow map and each step count ``k`` (NFE = k) and for the teacher's Euler / Heun / RK4 at the same
NFE (``k``, ``k/2`` and ``k/4`` steps, where whole) plus adaptive dopri5, one :class:`Row` records:
NFE, wall time per 10k samples, exact W2 to held-out data (POT, subsampled), energy distance, a
histogram KL against the exact density (checkerboard, gmm), and, where the target is an exact
reference, the mean error ``|X̂_{0,1}(x) − X_{0,1}(x)|`` against the exact map. All samplers start from
the *same* base points, so differences are the samplers', not the noise's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from ..flowmap import FlowMap
from ..metrics.points import energy_distance, mean_map_error, wasserstein2
from ..solvers import solve_ode

__all__ = ["Row", "evaluate", "markdown_table"]


@dataclass
class Row:
    """One sampler at one step count. Vector data fill ``w2``/``energy`` (and ``kl``, ``map_error``
    where known); images fill ``fd`` (Fréchet distance on the evaluation features) and
    ``precision``/``recall`` (k-NN manifold estimates)."""

    method: str
    sampler: str
    steps: int | None
    nfe: int
    ms_per_10k: float
    w2: float | None = None
    energy: float | None = None
    kl: float | None = None
    map_error: float | None = None
    fd: float | None = None
    precision: float | None = None
    recall: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Evaluation:
    rows: list[Row]
    samples: dict[tuple[str, str, int | None], Tensor]  # (method, sampler, steps) -> data units
    paths: dict[str, Tensor]


def _timed(fn: Callable[[], Tensor], repeats: int = 2) -> tuple[Tensor, float]:
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


@torch.no_grad()
def evaluate(flow_maps: dict[str, FlowMap], teacher: Callable | None, x0: Tensor, held_out: Tensor,
             to_data_units: Callable[[Tensor], Tensor] = lambda x: x, steps=(1, 2, 4, 8, 16),
             solvers=("euler", "heun", "rk4"), dopri5: bool = True, rtol: float = 1e-5,
             exact_map: Tensor | None = None, kl: Callable[[Tensor], float] | None = None,
             w2_samples: int = 2000, energy_samples: int = 4000, seed: int = 0,
             teacher_name: str = "teacher", progress: Callable[[str], None] | None = None,
             n_paths: int = 64, quality: Callable[[Tensor], dict] | None = None,
             cond: Tensor | None = None) -> Evaluation:
    """Evaluate every flow map at every step count, and the teacher's solvers at the same NFE.

    ``x0``: base samples in model space (shared by all samplers); ``held_out``: data units;
    ``exact_map``: ``X_{0,1}(x0)`` in model space, when known. ``quality(x) -> {field: value}``
    replaces the vector metrics (W2, energy, KL) — images use it for the Fréchet distance and
    precision/recall. ``cond``: class labels of the base points (class-conditional models and
    teachers get them).
    """
    rows: list[Row] = []
    samples: dict = {}
    paths: dict = {}
    scale = 10_000 / x0.shape[0]

    def score(method, sampler, k, nfe, x, seconds):
        xd = to_data_units(x)
        samples[(method, sampler, k)] = xd
        if quality is not None:
            metrics = quality(xd)
        else:
            g = torch.Generator().manual_seed(seed)
            metrics = dict(w2=wasserstein2(xd, held_out, max_samples=w2_samples, generator=g),
                           energy=energy_distance(xd, held_out, max_samples=energy_samples),
                           kl=kl(xd) if kl is not None else None)
        rows.append(Row(method=method, sampler=sampler, steps=k, nfe=nfe,
                        ms_per_10k=1e3 * seconds * scale,
                        map_error=mean_map_error(x, exact_map) if exact_map is not None else None,
                        **metrics))
        if progress:
            progress(f"{method} {sampler} steps={k} nfe={nfe}")

    def sub(c, n):
        return None if c is None else c[:n]

    for name, model in flow_maps.items():
        model.eval()
        for k in steps:
            x, seconds = _timed(lambda: model.sample(x0, steps=k, cond=cond))
            score(name, "flow map", k, k, x, seconds)
        paths[name] = model.sample(x0[:n_paths], steps=max(steps), cond=sub(cond, n_paths),
                                   return_path=True)[1]
    if teacher is not None:
        field = teacher if cond is None else (lambda c: lambda x, t: teacher(x, t, c))
        b = field if cond is None else field(cond)
        for k in steps:
            for solver in solvers:
                per = {"euler": 1, "heun": 2, "rk4": 4}[solver]
                if k % per:
                    continue
                sol, seconds = _timed(lambda: solve_ode(b, x0, solver, steps=k // per))
                score(teacher_name, solver, k // per, sol.nfe, sol.x, seconds)
        if dopri5:
            sol, seconds = _timed(lambda: solve_ode(b, x0, "dopri5", rtol=rtol, atol=rtol),
                                  repeats=1)
            score(teacher_name, "dopri5", None, sol.nfe, sol.x, seconds)
        b_paths = field if cond is None else field(sub(cond, n_paths))
        paths[teacher_name] = solve_ode(b_paths, x0[:n_paths], "rk4", steps=16, return_path=True).path
    return Evaluation(rows, samples, paths)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


METRIC_COLUMNS = (("w2", "W2"), ("energy", "energy"), ("kl", "KL"), ("map_error", "map error"),
                  ("fd", "FD"), ("precision", "precision"), ("recall", "recall"))


def markdown_table(rows: list[Row]) -> str:
    """The quality-versus-cost table, one row per (method, sampler, steps); metric columns appear when
    some row has them."""
    shown = [(key, title) for key, title in METRIC_COLUMNS
             if any(getattr(r, key) is not None for r in rows)]
    head = ["method", "sampler", "steps", "NFE", "ms / 10k"] + [title for _, title in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, r.sampler, _fmt(r.steps), str(r.nfe), f"{r.ms_per_10k:.1f}"]
        cells += [_fmt(getattr(r, key)) for key, _ in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
