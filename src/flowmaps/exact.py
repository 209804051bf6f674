"""Exact references: closed-form velocities and flow maps for Gaussian and Gaussian-mixture targets.

Setting (spec §6): ``I_t = α_t x0 + β_t x1``, independent coupling, base ``x0 ~ N(0, Σ0)`` with
``Σ0 = diag(σ0²)`` from the interpolant, target ``x1 ~ Σ_k w_k N(m_k, S_k)``. Conditional on component
``k``, ``(I_t, İ_t)`` is jointly Gaussian, so

    b_t(x) = Σ_k π_k(t, x) [ β̇_t m_k + Γ_k(t) C_k(t)⁻¹ (x − β_t m_k) ],
    C_k = α_t² Σ0 + β_t² S_k,   Γ_k = α_t α̇_t Σ0 + β_t β̇_t S_k,
    π_k ∝ w_k N(x; β_t m_k, C_k),   ρ_t(x) = Σ_k w_k N(x; β_t m_k, C_k(t)).

Implementation: in the coordinates ``z = U_kᵀ Σ0^{-1/2}(x − β_t m_k)``, where ``U_k`` diagonalises the
whitened covariance ``Σ0^{-1/2} S_k Σ0^{-1/2} = U_k Λ_k U_kᵀ``, both ``C_k`` and ``Γ_k`` are diagonal, so no
matrix is factorised per call. Every object here is usable as a teacher (``velocity``), as ground truth
(``flow``), as a dataset (``sample``) and as a density oracle (``log_prob``). Times are per-sample;
``t = 0`` is the base and ``t = 1`` the data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ._tensor import batch_times, expand_as_data
from .flowmap import FlowMap
from .interpolants import Interpolant, Linear

__all__ = ["Gaussian", "GaussianMixture", "ExactReference"]


class ExactReference:
    """Common interface: ``velocity(x, t)``, ``mean_velocity(x, s, t)``, ``flow(x, s, t)``,
    ``sample(n)``, ``log_prob(x, t)`` and ``as_flow_map()``."""

    interpolant: Interpolant
    dim: int

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        raise NotImplementedError

    def mean_velocity(self, x: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        """``v_{s,t}(x) = (X_{s,t}(x) − x)/(t − s)``, and ``b_s(x)`` on the diagonal."""
        raise NotImplementedError

    def flow(self, x: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        """The exact flow map ``X_{s,t}(x) = x + (t − s) v_{s,t}(x)``, either direction."""
        s, t = batch_times(s, x), batch_times(t, x)
        return x + expand_as_data(t - s, x) * self.mean_velocity(x, s, t)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor, t: float | Tensor = 1.0) -> Tensor:
        raise NotImplementedError

    def as_network(self) -> nn.Module:
        """A network ``net(x, s, t) = v_{s,t}(x)``, so ``FlowMap(net)`` is the exact flow map."""
        return _ExactNetwork(self)

    def as_flow_map(self) -> FlowMap:
        """The exact flow map wrapped as a :class:`FlowMap` (for tests and baselines)."""
        return FlowMap(self.as_network())

    def _schedule(self, x: Tensor, t: Tensor):
        t = batch_times(t, x)
        it = self.interpolant
        return t, it.alpha(t), it.beta(t), it.dalpha(t), it.dbeta(t)


class _ExactNetwork(nn.Module):
    def __init__(self, reference: ExactReference):
        super().__init__()
        self.reference = reference

    def forward(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return self.reference.mean_velocity(x, s, t)


class Gaussian(ExactReference):
    """Target ``N(m, diag(σ²))``; velocity and flow map in closed form, per dimension:

        c_t² = α_t² σ0² + β_t² σ²,
        b_t(x) = β̇_t m + (ċ_t / c_t)(x − β_t m),
        X_{s,t}(x) = β_t m + (c_t / c_s)(x − β_s m).

    Args:
        mean: shape ``(d,)``.
        std: scalar or ``(d,)``, positive.
        interpolant: defines ``α, β`` and the base scale ``σ0`` (default :class:`Linear` with σ0 = 1).
    """

    def __init__(self, mean: Tensor | Sequence[float], std: float | Tensor | Sequence[float] = 1.0,
                 interpolant: Interpolant | None = None):
        self.interpolant = interpolant or Linear()
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.dim = self.mean.numel()
        self.std = torch.as_tensor(std, dtype=torch.float64).reshape(-1).expand(self.dim).clone()
        if not torch.isfinite(self.mean).all() or not (self.std > 0).all():
            raise ValueError("Gaussian needs a finite mean and positive standard deviations")
        self.sigma0 = self.interpolant.sigma0.reshape(-1).expand(self.dim).clone()

    def _params(self, x: Tensor):
        cast = lambda v: v.to(dtype=x.dtype, device=x.device)  # noqa: E731
        return cast(self.mean), cast(self.std) ** 2, cast(self.sigma0) ** 2

    def _scale(self, x: Tensor, t: Tensor) -> Tensor:
        """``c_t`` per sample and dimension, shape ``(B, d)``."""
        _, var, var0 = self._params(x)
        _, a, b, _, _ = self._schedule(x, t)
        return (a[:, None] ** 2 * var0 + b[:, None] ** 2 * var).sqrt()

    def velocity(self, x, t):
        m, var, var0 = self._params(x)
        t, a, b, da, db = self._schedule(x, t)
        c2 = a[:, None] ** 2 * var0 + b[:, None] ** 2 * var
        gain = (a * da)[:, None] * var0 + (b * db)[:, None] * var
        return db[:, None] * m + gain / c2 * (x - b[:, None] * m)

    def flow(self, x, s, t):
        m = self._params(x)[0]
        s, t = batch_times(s, x), batch_times(t, x)
        bs, bt = self.interpolant.beta(s)[:, None], self.interpolant.beta(t)[:, None]
        return bt * m + self._scale(x, t) / self._scale(x, s) * (x - bs * m)

    def mean_velocity(self, x, s, t, eps: float = 1e-9):
        """``v_{s,t}(x) = A m + K (x − β_s m)`` with ``A = (β_t − β_s)/(t − s)`` and
        ``K = (c_t/c_s − 1)/(t − s)``. The time coefficients are formed in float64 (and replaced by their
        limits ``β̇_s``, ``ċ_s/c_s`` for ``|t − s| ≤ eps``), so a float32 ``x`` suffers no cancellation."""
        s, t = batch_times(s, x), batch_times(t, x)
        s64, t64 = s.double(), t.double()
        m = self.mean.to(device=x.device)
        var, var0 = self.std.to(device=x.device) ** 2, self.sigma0.to(device=x.device) ** 2
        it = self.interpolant
        a_s, b_s, da_s, db_s = it.alpha(s64), it.beta(s64), it.dalpha(s64), it.dbeta(s64)
        a_t, b_t = it.alpha(t64), it.beta(t64)
        c_s = (a_s[:, None] ** 2 * var0 + b_s[:, None] ** 2 * var).sqrt()
        c_t = (a_t[:, None] ** 2 * var0 + b_t[:, None] ** 2 * var).sqrt()
        gap = t64 - s64
        far = gap.abs() > eps
        safe = torch.where(far, gap, torch.ones_like(gap))
        slope_a = torch.where(far, (b_t - b_s) / safe, db_s)
        gain_s = ((a_s * da_s)[:, None] * var0 + (b_s * db_s)[:, None] * var) / c_s**2
        slope_k = torch.where(far[:, None], (c_t / c_s - 1.0) / safe[:, None], gain_s)
        a_x, k_x = slope_a[:, None].to(x.dtype), slope_k.to(x.dtype)
        m_x, b_sx = m.to(x.dtype), b_s[:, None].to(x.dtype)
        return a_x * m_x + k_x * (x - b_sx * m_x)

    def sample(self, n, generator=None, dtype=torch.float32, device=None):
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + self.std * z).to(dtype=dtype, device=device)

    def log_prob(self, x, t=1.0):
        m, _, _ = self._params(x)
        t = batch_times(t, x)
        c = self._scale(x, t)
        mu = self.interpolant.beta(t)[:, None] * m
        return (-0.5 * ((x - mu) / c) ** 2 - c.log() - 0.5 * math.log(2 * math.pi)).sum(1)

    def config(self) -> dict:
        return {"kind": "gaussian", "mean": self.mean.tolist(), "std": self.std.tolist()}


class GaussianMixture(ExactReference):
    """Target ``Σ_k w_k N(m_k, S_k)`` with the closed-form velocity of spec §6.1.

    The flow map has no closed form; ``flow``/``mean_velocity`` integrate the velocity with classical
    RK4 on ``steps`` uniform steps, accumulating the chord slope ``v_{s,t} = ∫_0^1 b(x_{s+u(t−s)}) du``
    directly, so ``v_{t,t} = b_t`` holds exactly and the result is differentiable (forward and reverse
    mode) in ``x``, ``s`` and ``t``. Accuracy is fourth order in ``1/steps`` (measured in the tests).

    Args:
        means: ``(K, d)``.
        covs: ``(K, d, d)`` full covariances (give one of ``covs`` and ``stds``).
        stds: ``(K,)`` isotropic or ``(K, d)`` diagonal standard deviations.
        weights: ``(K,)`` positive, normalised here (default uniform).
        interpolant: defines ``α, β`` and the base scale (default :class:`Linear`, σ0 = 1).
        steps: RK4 steps used by ``flow`` (default 200).
    """

    def __init__(self, means: Tensor | Sequence, covs: Tensor | Sequence | None = None,
                 stds: Tensor | Sequence | None = None, weights: Tensor | Sequence[float] | None = None,
                 interpolant: Interpolant | None = None, steps: int = 200):
        self.interpolant = interpolant or Linear()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError("means must have shape (K, d)")
        k, d = self.means.shape
        self.dim, self.steps = d, int(steps)
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, d, d) or stds (K,) / (K, d)")
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {tuple(covs.shape)}")
            if not torch.allclose(covs, covs.transpose(1, 2)):
                raise ValueError("covariances must be symmetric")
        else:
            stds = torch.as_tensor(stds, dtype=torch.float64)
            stds = stds[:, None].expand(k, d) if stds.ndim == 1 else stds
            if stds.shape != (k, d) or not (stds > 0).all():
                raise ValueError("stds must be positive with shape (K,) or (K, d)")
            covs = torch.diag_embed(stds**2)
        self.covs = covs
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not (weights > 0).all():
            raise ValueError(f"weights must be {k} positive numbers")
        self.weights = weights / weights.sum()
        try:
            self._chol = torch.linalg.cholesky(covs)
        except RuntimeError as err:
            raise ValueError("every covariance must be positive definite") from err
        # Whitened eigenbasis: S̃_k = D⁻¹ S_k D⁻¹ = U Λ Uᵀ with D = diag(σ0).
        self.sigma0 = self.interpolant.sigma0.reshape(-1).expand(d).clone()
        inv_d = 1.0 / self.sigma0
        lam, u = torch.linalg.eigh(inv_d[:, None] * covs * inv_d[None, :])
        self._lam = lam                                      # (K, d)
        self._to_white = u.transpose(1, 2) * inv_d[None, None, :]  # Uᵀ D⁻¹, (K, d, d)
        self._from_white = self.sigma0[None, :, None] * u          # D U, (K, d, d)

    def _cast(self, x: Tensor):
        c = lambda v: v.to(dtype=x.dtype, device=x.device)  # noqa: E731
        return c(self.means), c(self._lam), c(self._to_white), c(self._from_white), c(self.weights)

    def _components(self, x: Tensor, t: Tensor):
        """Per-component log-densities ``log w_k N(x; β m_k, C_k)`` and conditional velocities, with
        autocast off (an exact teacher stays exact under bf16 training: its einsums would round to
        bf16; spec E.12)."""
        with torch.autocast(x.device.type, enabled=False):
            return self._components_exact(x, t)

    def _components_exact(self, x: Tensor, t: Tensor):
        means, lam, to_white, from_white, weights = self._cast(x)
        t, a, b, da, db = self._schedule(x, t)
        resid = x[:, None, :] - b[:, None, None] * means[None]            # (B, K, d)
        z = torch.einsum("kij,bkj->bki", to_white, resid)
        c = a[:, None, None] ** 2 + b[:, None, None] ** 2 * lam[None]        # (B, K, d)
        gain = ((a * da)[:, None, None] + (b * db)[:, None, None] * lam[None]) / c
        cond = db[:, None, None] * means[None] + torch.einsum("kij,bkj->bki", from_white, gain * z)
        log_det = c.log().sum(-1) + 2 * self.sigma0.to(x).log().sum()
        logp = (weights.log()[None] - 0.5 * (z**2 / c).sum(-1) - 0.5 * log_det
                - 0.5 * self.dim * math.log(2 * math.pi))
        return logp, cond

    def velocity(self, x, t):
        logp, cond = self._components(x, t)
        return (torch.softmax(logp, dim=1)[..., None] * cond).sum(1)

    def log_prob(self, x, t=1.0):
        logp, _ = self._components(x, t)
        return torch.logsumexp(logp, dim=1)

    def mean_velocity(self, x, s, t, steps: int | None = None):
        s, t = batch_times(s, x), batch_times(t, x)
        n = self.steps if steps is None else int(steps)
        h = (t - s) / n
        hx = h[:, None]
        y, total = x, torch.zeros_like(x)
        for i in range(n):
            tau = s + i * h
            k1 = self.velocity(y, tau)
            k2 = self.velocity(y + 0.5 * hx * k1, tau + 0.5 * h)
            k3 = self.velocity(y + 0.5 * hx * k2, tau + 0.5 * h)
            k4 = self.velocity(y + hx * k3, tau + h)
            slope = (k1 + 2 * k2 + 2 * k3 + k4) / 6
            y = y + hx * slope
            total = total + slope
        return total / n

    def sample(self, n, generator=None, dtype=torch.float32, device=None):
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[idx] + torch.einsum("nij,nj->ni", self._chol[idx], z)
        return x.to(dtype=dtype, device=device)

    def config(self) -> dict:
        return {"kind": "gmm", "means": self.means.tolist(), "covs": self.covs.tolist(),
                "weights": self.weights.tolist()}
