"""Stochastic interpolants ``I_t = α_t x0 + β_t x1`` between a Gaussian base and the data.

Time convention: ``t = 0`` is the base, ``x0 ~ N(0, σ0² I)``; ``t = 1`` is the data, ``x1 ~ ρ1``.
Boundary conditions ``α_0 = 1, α_1 = 0, β_0 = 0, β_1 = 1`` are checked when an interpolant is built.
The coupling is independent (``x0 ⟂ x1``), as in every experiment of the papers (spec §1.1).

The velocity of the probability flow is ``b_t(x) = E[İ_t | I_t = x]`` with ``İ_t = α̇_t x0 + β̇_t x1``;
it is the minimiser of the flow-matching loss ``E|b̂_t(I_t) − İ_t|²`` (spec §1.3).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._tensor import expand_as_data

ScalarFn = Callable[[Tensor], Tensor]

__all__ = ["Interpolant", "Linear", "Trigonometric", "Custom"]


class Interpolant:
    """Base class: subclasses define ``alpha``, ``beta`` and their derivatives ``dalpha``, ``dbeta``.

    Args:
        sigma0: standard deviation of the Gaussian base ``x0 ~ N(0, σ0² I)``; a scalar, or a tensor that
            broadcasts against one sample (e.g. shape ``(d,)`` for per-dimension scales, spec Q17).
    """

    name = "interpolant"

    def __init__(self, sigma0: float | Tensor = 1.0):
        sigma0 = torch.as_tensor(sigma0, dtype=torch.float64)
        if not torch.isfinite(sigma0).all() or (sigma0 <= 0).any():
            raise ValueError(f"sigma0 must be finite and positive, got {sigma0.tolist()}")
        self.sigma0 = sigma0
        self._check_boundary_conditions()

    # --- schedule -------------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def beta(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dbeta(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # --- sampling -------------------------------------------------------------------------------
    def base_scale(self, like: Tensor) -> Tensor:
        """``σ0`` with the dtype and device of ``like``, shaped to broadcast against a batch."""
        # Copied once per dtype and device, not every step: a copy from host memory makes the host wait.
        cached = getattr(self, "_base_scale", None)
        if cached is None or cached[0] is not self.sigma0 or cached[1] != (like.dtype, like.device):
            cached = (self.sigma0, (like.dtype, like.device),
                      self.sigma0.to(dtype=like.dtype, device=like.device))
            self._base_scale = cached
        return cached[2]

    def sample_base(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x0 ~ N(0, σ0² I)`` with the shape, dtype and device of ``like``."""
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        return noise * self.base_scale(like)

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``I_t = α_t x0 + β_t x1`` for per-sample times ``t`` of shape ``(B,)``."""
        return expand_as_data(self.alpha(t), x0) * x0 + expand_as_data(self.beta(t), x1) * x1

    def time_derivative(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``İ_t = α̇_t x0 + β̇_t x1`` for per-sample times ``t`` of shape ``(B,)``."""
        return expand_as_data(self.dalpha(t), x0) * x0 + expand_as_data(self.dbeta(t), x1) * x1

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(I_t, İ_t)``."""
        return self.interpolate(x0, x1, t), self.time_derivative(x0, x1, t)

    # --- description ----------------------------------------------------------------------------
    def config(self) -> dict:
        """A JSON-able description (used in checkpoints and run configs)."""
        s = self.sigma0
        return {"name": self.name, "sigma0": s.item() if s.ndim == 0 else s.tolist()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma0={self.config()['sigma0']})"

    def _check_boundary_conditions(self, atol: float = 1e-6) -> None:
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        a, b = self.alpha(ends), self.beta(ends)
        expected = {"alpha(0)": (a[0], 1.0), "alpha(1)": (a[1], 0.0),
                    "beta(0)": (b[0], 0.0), "beta(1)": (b[1], 1.0)}
        for label, (got, want) in expected.items():
            if not math.isclose(float(got), want, abs_tol=atol):
                raise ValueError(f"interpolant violates the boundary condition {label} = {want} "
                                 f"(got {float(got):.6g}); t=0 must be the base and t=1 the data")
        grid = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
        if (self.alpha(grid) ** 2 + self.beta(grid) ** 2 <= 0).any():
            raise ValueError("interpolant is degenerate: alpha_t = beta_t = 0 for some t")


class Linear(Interpolant):
    """Linear interpolant ``α_t = 1 − t``, ``β_t = t`` (all [P2] experiments)."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def beta(self, t):
        return t

    def dalpha(self, t):
        return -torch.ones_like(t)

    def dbeta(self, t):
        return torch.ones_like(t)


class Trigonometric(Interpolant):
    """Trigonometric interpolant ``α_t = cos(πt/2)``, ``β_t = sin(πt/2)`` (variance preserving)."""

    name = "trigonometric"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def beta(self, t):
        return torch.sin(0.5 * math.pi * t)

    def dalpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def dbeta(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


class Custom(Interpolant):
    """User-defined interpolant from torch-differentiable functions ``alpha(t)`` and ``beta(t)``.

    The derivatives may be given; otherwise they are computed by forward-mode autodiff
    (``torch.func.jvp``, exact, elementwise). Given derivatives are checked against central differences
    at construction, so a wrong formula is caught before training.

    Example: ``Custom(lambda t: (1 - t) ** 2, lambda t: 1 - (1 - t) ** 2)``.
    """

    name = "custom"

    def __init__(self, alpha: ScalarFn, beta: ScalarFn, dalpha: ScalarFn | None = None,
                 dbeta: ScalarFn | None = None, sigma0: float | Tensor = 1.0):
        self._alpha, self._beta = alpha, beta
        self._dalpha, self._dbeta = dalpha, dbeta
        super().__init__(sigma0)
        self._check_derivatives()

    def alpha(self, t):
        return self._alpha(t)

    def beta(self, t):
        return self._beta(t)

    def dalpha(self, t):
        return self._dalpha(t) if self._dalpha is not None else _derivative(self._alpha, t)

    def dbeta(self, t):
        return self._dbeta(t) if self._dbeta is not None else _derivative(self._beta, t)

    def _check_derivatives(self, h: float = 1e-5, rtol: float = 1e-4) -> None:
        t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        for name, f, df in (("alpha", self.alpha, self.dalpha), ("beta", self.beta, self.dbeta)):
            fd = (f(t + h) - f(t - h)) / (2 * h)
            got = df(t)
            if not torch.allclose(got, fd, rtol=rtol, atol=rtol):
                worst = (got - fd).abs().max().item()
                raise ValueError(f"d{name} does not match the derivative of {name} "
                                 f"(max difference {worst:.3g} against central differences)")


def _derivative(f: ScalarFn, t: Tensor) -> Tensor:
    """Elementwise ``f'(t)`` by one forward-mode JVP with tangent 1."""
    return torch.func.jvp(f, (t,), (torch.ones_like(t),))[1]


def make_interpolant(name: str, sigma0: float | Tensor = 1.0) -> Interpolant:
    """Build a named interpolant: ``"linear"`` or ``"trigonometric"`` (alias ``"trig"``)."""
    table = {"linear": Linear, "trigonometric": Trigonometric, "trig": Trigonometric}
    if name not in table:
        raise ValueError(f"unknown interpolant {name!r}; choose one of {sorted(table)}")
    return table[name](sigma0)
