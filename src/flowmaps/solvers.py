"""ODE baselines for a velocity field ``ẋ = b_t(x)``: Euler, Heun, RK4 on a fixed grid and adaptive dopri5.

A velocity is any callable ``b(x, t) -> tensor`` with per-sample times ``t`` of shape ``(B,)``.
Time convention: ``t = 0`` is the base, ``t = 1`` the data; integrating from 0 to 1 generates samples,
from 1 to 0 encodes data. Every solver reports the number of function evaluations (NFE) it used:
Euler ``k``, Heun ``2k``, RK4 ``4k`` on ``k`` steps; dopri5 counts the evaluations torchdiffeq made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._tensor import batch_times

VelocityField = Callable[[Tensor, Tensor], Tensor]

__all__ = ["ODESolution", "solve_ode", "uniform_grid", "FIXED_STEP_METHODS", "NFE_PER_STEP"]

NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}
FIXED_STEP_METHODS = tuple(NFE_PER_STEP)


@dataclass
class ODESolution:
    """Result of an ODE solve: final state ``x``, function evaluations ``nfe``, optional ``path``."""

    x: Tensor
    nfe: int
    path: Tensor | None = None  # (len(grid), B, ...) when requested


def uniform_grid(steps: int, t0: float = 0.0, t1: float = 1.0, dtype=torch.float64,
                 device=None) -> Tensor:
    """``steps + 1`` equally spaced times from ``t0`` to ``t1``."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(t0, t1, int(steps) + 1, dtype=dtype, device=device)


def _step(method: str, b: VelocityField, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
    if method == "euler":
        return x + h * b(x, batch_times(t, x))
    if method == "heun":
        k1 = b(x, batch_times(t, x))
        k2 = b(x + h * k1, batch_times(t + h, x))
        return x + 0.5 * h * (k1 + k2)
    if method == "rk4":
        k1 = b(x, batch_times(t, x))
        k2 = b(x + 0.5 * h * k1, batch_times(t + 0.5 * h, x))
        k3 = b(x + 0.5 * h * k2, batch_times(t + 0.5 * h, x))
        k4 = b(x + h * k3, batch_times(t + h, x))
        return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown fixed-step method {method!r}; choose one of {FIXED_STEP_METHODS}")


def solve_ode(velocity: VelocityField, x0: Tensor, method: str = "rk4", steps: int | None = None,
              grid: Tensor | None = None, t0: float = 0.0, t1: float = 1.0, rtol: float = 1e-5,
              atol: float = 1e-5, return_path: bool = False) -> ODESolution:
    """Integrate ``ẋ = b_t(x)`` from ``t0`` to ``t1`` (or along ``grid``) starting at ``x0``.

    Args:
        velocity: ``b(x, t)`` with per-sample ``t``.
        method: ``"euler"``, ``"heun"``, ``"rk4"`` (fixed steps) or ``"dopri5"`` (adaptive, torchdiffeq).
        steps: number of uniform steps for the fixed-step methods (ignored by dopri5).
        grid: explicit increasing or decreasing time grid (fixed-step methods); overrides ``steps``.
        rtol: relative tolerance of dopri5.
        atol: absolute tolerance of dopri5.
        return_path: also return the states at every grid time (dopri5: at ``t0`` and ``t1``).
    """
    if method == "dopri5":
        return _dopri5(velocity, x0, t0, t1, rtol, atol, return_path)
    if method not in NFE_PER_STEP:
        raise ValueError(f"unknown ODE method {method!r}; choose one of "
                         f"{FIXED_STEP_METHODS + ('dopri5',)}")
    if grid is None:
        grid = uniform_grid(steps if steps is not None else 1, t0, t1, device=x0.device)
    grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor with at least two times")
    x, path = x0, [x0] if return_path else None
    for i in range(grid.numel() - 1):
        x = _step(method, velocity, x, grid[i], grid[i + 1] - grid[i])
        if path is not None:
            path.append(x)
    nfe = NFE_PER_STEP[method] * (grid.numel() - 1)
    return ODESolution(x, nfe, torch.stack(path) if path is not None else None)


def _dopri5(velocity: VelocityField, x0: Tensor, t0: float, t1: float, rtol: float, atol: float,
            return_path: bool) -> ODESolution:
    from torchdiffeq import odeint

    count = 0

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        nonlocal count
        count += 1
        return velocity(x, batch_times(t, x))

    times = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
    states = odeint(rhs, x0, times, method="dopri5", rtol=rtol, atol=atol)
    return ODESolution(states[-1], count, states if return_path else None)
