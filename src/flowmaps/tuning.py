"""Time grids tuned after training: the interior times of a k-step grid chosen so that the k-step
composition of a trained flow map matches a reference endpoint.

A flow map composes jumps ``x ← X̂_{t_i, t_{i+1}}(x)`` on any grid ``0 = t_0 < … < t_k = 1`` (spec §4); for
the exact map every grid gives the same endpoint, for a learned one the error depends on where the jumps
fall. :func:`tune_grid` parametrises the grid by the softmax of ``k`` logits (the increments), so the
endpoints stay 0 and 1 and the order is kept whatever the logits, starts from the uniform grid (logits 0)
and minimises the mean distance ``mean |X̂_grid(x0) − reference(x0)|`` over the given base points by Adam,
differentiating through the map with respect to its times (the network's weights are left alone). The
reference is the teacher's endpoint (its dopri5 solution, or the exact map) where there is a teacher, or
the map's own fine composition (:func:`self_reference`). The grid returned is the best one met on the
base points, the uniform grid included, so it is never worse than uniform there; measure it on other
base points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flowmap import FlowMap
from .solvers import uniform_grid

__all__ = ["tune_grid", "self_reference", "grid_from_logits", "composition_error"]


def grid_from_logits(logits: Tensor) -> Tensor:
    """``[0, cumsum(softmax(logits))]`` with the last time exactly 1: a strictly increasing grid of
    ``len(logits)`` steps from 0 to 1."""
    inc = torch.softmax(logits, dim=0)
    inner = torch.cumsum(inc, dim=0)[:-1]
    return torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])


def _compose(model: FlowMap, x0: Tensor, grid: Tensor, cond: Tensor | None) -> Tensor:
    x = x0
    for i in range(grid.numel() - 1):
        x = model(x, grid[i].expand(x.shape[0]), grid[i + 1].expand(x.shape[0]), cond)
    return x


def composition_error(model: FlowMap, x0: Tensor, reference: Tensor, grid: Tensor,
                      cond: Tensor | None = None, batch_size: int = 4096) -> float:
    """``mean |X̂_grid(x0) − reference|`` (Euclidean norm over each sample's features), no gradient."""
    total, n = 0.0, x0.shape[0]
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            c = None if cond is None else cond[lo:hi]
            x = _compose(model, x0[lo:hi], grid.to(x0), c)
            total += float((x - reference[lo:hi].to(x)).flatten(1).norm(dim=1).sum())
    return total / n


@torch.no_grad()
def self_reference(model: FlowMap, x0: Tensor, steps: int = 64, cond: Tensor | None = None,
                   batch_size: int = 4096) -> Tensor:
    """The map's own fine composition ``X̂`` on a uniform grid of ``steps`` jumps: the reference of a
    run without a teacher."""
    return torch.cat([model.sample(x0[lo:lo + batch_size], steps=steps,
                                   cond=None if cond is None else cond[lo:lo + batch_size])
                      for lo in range(0, x0.shape[0], batch_size)])


def tune_grid(model: FlowMap, steps: int, x0: Tensor, reference: Tensor, cond: Tensor | None = None,
              iters: int = 150, lr: float = 0.05, batch_size: int = 1024,
              generator: torch.Generator | None = None) -> Tensor:
    """The ``steps``-step time grid (a tensor ``0 = t_0 < … < t_k = 1``, float64) whose composition of
    ``model`` best matches ``reference`` on the base points ``x0``.

    Args:
        model: a trained :class:`FlowMap` (left unchanged; used in its current mode, usually eval).
        steps: the number of jumps ``k``; ``k = 1`` has no interior time and returns ``[0, 1]``.
        x0: base points ``(N, ...)`` from the training distribution of the base.
        reference: the endpoints to match, ``(N, ...)`` (the teacher's ODE endpoint of ``x0``, the exact
            map, or :func:`self_reference`).
        cond: class labels of ``x0`` for a class-conditional map.
        iters: Adam steps on the ``k`` logits of the grid.
        lr: Adam's learning rate.
        batch_size: points per minibatch, drawn from ``x0`` with ``generator``.
        generator: the random generator of the minibatches.

    The returned grid is the one with the lowest error on all of ``x0`` among the uniform grid and the
    iterates checked every few steps.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if reference.shape != x0.shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)}, the base points "
                         f"{tuple(x0.shape)}")
    uniform = uniform_grid(steps)
    if steps == 1:
        return uniform
    logits = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    n = x0.shape[0]
    best = (composition_error(model, x0, reference, uniform, cond), uniform)
    check_every = max(1, iters // 10)
    try:
        for it in range(iters):
            idx = torch.randperm(n, generator=generator)[:batch_size] if n > batch_size else \
                torch.arange(n)
            grid = grid_from_logits(logits).to(x0.dtype)
            c = None if cond is None else cond[idx]
            x = _compose(model, x0[idx], grid, c)
            loss = (x - reference[idx]).flatten(1).norm(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (it + 1) % check_every == 0 or it + 1 == iters:
                candidate = grid_from_logits(logits.detach())
                err = composition_error(model, x0, reference, candidate, cond)
                if err < best[0]:
                    best = (err, candidate)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return best[1].detach().clone()
