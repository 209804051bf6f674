"""Exact conversion of a model trained on any Gaussian path into the velocity of our linear interpolant.

**Ours.** ``I_τ = (1 − τ) x0 + τ x1`` with ``x0 = σ0 ε``, ``ε ~ N(0, I)``, so a state is
``x = τ x1 + (1 − τ) σ0 ε`` and the velocity is ``b_τ(x) = E[x1 − σ0 ε | I_τ = x]`` (``τ = 0`` noise,
``τ = 1`` data; ``σ0`` a scalar, ``flowmaps.Linear(sigma0)``).

**Theirs.** Every teacher library trains a network on a Gaussian path of its own, in its own time ``u``:
``z = A_u x1 + S_u ε`` (``A`` the signal, ``S`` the noise coefficient; torchcfm and flow_matching's
``CondOTScheduler``: ``A = u, S = 1 − u``; diffusers flow matching, ``u = σ``: ``A = 1 − σ, S = σ``;
diffusers DDPM/DDIM: ``A = √ᾱ, S = √(1 − ᾱ)``). The network predicts one linear function of the two
posterior means ``x̂1 = E[x1 | z]``, ``ε̂ = E[ε | z]``.

**Step 1: the same state.** Pick ``u`` with the same signal-to-noise ratio,
``A_u / S_u = τ / ((1 − τ) σ0)``. Then ``A_u = k τ`` and ``S_u = k (1 − τ) σ0`` for
``k = (A_u + S_u) / (τ + (1 − τ) σ0)``, and ``z = k x`` holds for the random variables themselves (same
``x1``, same ``ε``). Conditioning on ``z = k x`` is conditioning on ``I_τ = x``: the teacher's posterior
means at ``(k x, u)`` *are* ours at ``(x, τ)``. (DDPM: ``z = a x1 + σ ε`` is the linear interpolant at
``τ = a / (a + σ)`` scaled by ``a + σ``, for σ0 = 1.) This is the only place where a schedule enters, and
it is exact whenever the teacher's schedule can be evaluated at the continuous ``u`` (see
:class:`VPSchedule` for the discrete DDPM one).

**Step 2: the posterior means from the prediction,** using ``z = A x̂1 + S ε̂`` (the conditional mean of
``z = A x1 + S ε`` given ``z``):

    ε-prediction      ε̂ given:             x̂1 = (z − S ε̂) / A
    x1-prediction     x̂1 given:            ε̂  = (z − A x̂1) / S
    v-prediction      v̂ = A ε̂ − S x̂1:      x̂1 = (A z − S v̂) / (A² + S²),  ε̂ = (S z + A v̂) / (A² + S²)
    velocity          û = Ȧ x̂1 + Ṡ ε̂:      x̂1 = (S û − Ṡ z) / D,          ε̂ = (Ȧ z − A û) / D,
                      (d/du in its own time)  D = Ȧ S − Ṡ A.

**Step 3: our velocity** ``b_τ(x) = x̂1 − σ0 ε̂``. With ``x = τ x̂1 + (1 − τ) σ0 ε̂`` this equals
``(x̂1 − x) / (1 − τ)`` and ``(x − σ0 ε̂) / τ``: an ε-model gives ``b_τ(x) = (x − σ0 ε̂(k x, u)) / τ``.

Every step is linear in ``(z, prediction)``, so ``b_τ(x) = P x + Q · prediction(k x, u)`` with per-sample
scalars ``P, Q`` formed in float64 (:func:`linear_velocity`). A flow-matching teacher whose path is ours
(σ0 = 1, ``A = u``, ``S = 1 − u``) gets ``P = 0``, ``Q = 1``: its output is passed through unchanged.
Division by ``A`` (ε-prediction at ``τ → 0``) or ``S`` (x1-prediction at ``τ → 1``) is inherent to those
parametrisations: they carry no information there, and errors of the network are amplified by ``S/A``
(resp. ``A/S``). v-prediction and velocity prediction divide by nothing that vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PathPoint", "PREDICTIONS", "linear_velocity", "linear_path", "teacher_state", "VPSchedule",
           "tau_of_ratio"]

PREDICTIONS = ("velocity", "epsilon", "x1", "v")


@dataclass
class PathPoint:
    """Where the teacher is queried for our ``(x, τ)``: its time ``u`` (per sample, float64), its path
    coefficients ``A, S`` there (and ``dA, dS = d/du``, for velocity predictions), and our time ``τ``
    actually used (the requested one, or the end of the teacher's range it was clamped to)."""

    u: Tensor
    A: Tensor
    S: Tensor
    tau: Tensor
    dA: Tensor | None = None
    dS: Tensor | None = None


def tau_of_ratio(ratio: Tensor, sigma0: float) -> Tensor:
    """Our time ``τ`` whose signal-to-noise ratio ``τ / ((1 − τ) σ0)`` is ``ratio`` (0 and ∞ allowed)."""
    return 1.0 / (1.0 + 1.0 / (ratio * sigma0))


def linear_path(tau: Tensor, sigma0: float, reverse: bool = False) -> PathPoint:
    """The teacher time of a linear (rectified-flow) path at our ``τ``: ``u = τ / (τ + (1 − τ) σ0)``
    with ``A = u, S = 1 − u`` (torchcfm, flow_matching's CondOT). ``reverse``: diffusers' flow matching,
    whose time is the noise level ``σ = 1 − u`` with ``A = 1 − σ, S = σ`` (so ``dA = −1, dS = 1``)."""
    u = tau / (tau + (1.0 - tau) * sigma0)
    one = torch.ones_like(u)
    if reverse:
        return PathPoint(u=1.0 - u, A=u, S=1.0 - u, tau=tau, dA=-one, dS=one)
    return PathPoint(u=u, A=u, S=1.0 - u, tau=tau, dA=one, dS=-one)


def linear_velocity(prediction: Tensor, x: Tensor, point: PathPoint, sigma0: float, kind: str) -> Tensor:
    """``b_τ(x) = P x + Q · prediction`` (module docstring), for a teacher queried at ``z = k x`` and its
    time ``point.u``; ``kind`` is one of :data:`PREDICTIONS`."""
    tau, A, S = point.tau, point.A, point.S
    k = (A + S) / (tau + (1.0 - tau) * sigma0)
    if kind == "epsilon":          # x̂1 = (z − S ε̂)/A,  ε̂ = ε̂
        a1, a2, e1, e2 = 1.0 / A, -S / A, torch.zeros_like(A), torch.ones_like(A)
    elif kind == "x1":             # x̂1 = x̂1,  ε̂ = (z − A x̂1)/S
        a1, a2, e1, e2 = torch.zeros_like(A), torch.ones_like(A), 1.0 / S, -A / S
    elif kind == "v":              # v = A ε − S x1
        n = A * A + S * S
        a1, a2, e1, e2 = A / n, -S / n, S / n, A / n
    elif kind == "velocity":       # û = Ȧ x̂1 + Ṡ ε̂
        D = point.dA * S - point.dS * A
        a1, a2, e1, e2 = -point.dS / D, S / D, point.dA / D, -A / D
    else:
        raise ValueError(f"unknown prediction {kind!r}; one of {', '.join(PREDICTIONS)}")
    # b = x̂1 − σ0 ε̂ with x̂1 = a1 z + a2 p, ε̂ = e1 z + e2 p and z = k x.
    P = k * (a1 - sigma0 * e1)
    Q = a2 - sigma0 * e2
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (P.to(x.dtype).reshape(shape) * x + Q.to(prediction.dtype).reshape(shape) * prediction)


def teacher_state(x: Tensor, point: PathPoint, sigma0: float) -> Tensor:
    """``z = k x``: our state at ``τ`` as the teacher's state at ``u`` (the same random variable)."""
    k = (point.A + point.S) / (point.tau + (1.0 - point.tau) * sigma0)  # 1 for a linear path with σ0 = 1
    return k.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * x


class VPSchedule:
    """The discrete VP schedule of a DDPM/DDIM model, ``ᾱ_n`` for timesteps ``n = 0 … N−1``, in continuous
    time. The log-SNR ``λ_n = log(ᾱ_n / (1 − ᾱ_n))`` is interpolated piecewise linearly in the timestep:
    ``λ(u) = λ_n + (u − n)(λ_{n+1} − λ_n)`` for ``n ≤ u ≤ n + 1``, and ``A = √sigmoid(λ)``,
    ``S = √sigmoid(−λ)``. At every integer timestep this is the scheduler's ``ᾱ_n`` exactly; in between it
    is the choice of this library (a network trained at integer timesteps only is then asked at
    fractional ones, which its time embedding interpolates). For our ``τ`` the timestep is found by
    inverting this interpolant exactly (``λ = 2 log(τ / ((1 − τ) σ0))``, the segment by a sorted search,
    the fraction by the linear formula): the state handed to the model has precisely the SNR of its
    timestep, so the conversion is exact for every ``τ`` in the schedule's range ``[τ_min, τ_max]``
    (``λ_{N−1} ≤ λ ≤ λ_0``). Outside it the model was never trained; ``τ`` is clamped to the range, i.e.
    ``b_τ(x) := b_{τ_min}(x)`` for ``τ < τ_min`` (and likewise above ``τ_max``)."""

    def __init__(self, alphas_cumprod, sigma0: float = 1.0):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1).cpu()
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must hold at least two values strictly between 0 and 1")
        lam = abar.log() - torch.log1p(-abar)
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly with the timestep")
        self.lam, self.sigma0 = lam, float(sigma0)
        self.num_timesteps = abar.numel()
        ends = torch.stack([lam[-1], lam[0]])
        self.tau_range = tuple(tau_of_ratio(torch.exp(ends / 2), self.sigma0).tolist())

    def tau_of_timesteps(self, timesteps) -> Tensor:
        """Our times (float64) of the integer timesteps ``n``: ``τ/((1 − τ) σ0) = √(ᾱ_n/(1 − ᾱ_n))``."""
        n = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
        if bool(((n < 0) | (n >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps - 1}], got {n.tolist()}")
        return torch.sigmoid(self.lam[n] / 2 + math.log(self.sigma0))

    def state_scale(self, tau: Tensor) -> Tensor:
        """``k`` of ``z = k x`` at our times: the VP state is ours scaled by
        ``k = 1/√(τ² + σ0² (1 − τ)²)`` (``A = k τ``, ``S = k σ0 (1 − τ)``, ``A² + S² = 1``); 1 at ``τ = 1``."""
        tau = torch.as_tensor(tau, dtype=torch.float64)
        return 1.0 / torch.sqrt(tau ** 2 + self.sigma0 ** 2 * (1.0 - tau) ** 2)

    def at(self, tau: Tensor) -> PathPoint:
        """The continuous timestep ``u`` and ``A, S`` for our times ``tau`` (float64, on ``tau``'s device)."""
        lam_all = self.lam.to(tau.device)
        lam = 2.0 * (torch.log(tau) - torch.log1p(-tau) - math.log(self.sigma0))
        lam = lam.clamp(float(lam_all[-1]), float(lam_all[0]))
        # λ decreases with the timestep: search the increasing −λ_n.
        n = torch.searchsorted(-lam_all, -lam, right=True).clamp(1, self.num_timesteps - 1) - 1
        lo, hi = lam_all[n], lam_all[n + 1]
        u = n.to(torch.float64) + (lo - lam) / (lo - hi)
        return PathPoint(u=u, A=torch.sigmoid(lam).sqrt(), S=torch.sigmoid(-lam).sqrt(),
                         tau=torch.sigmoid(lam / 2 + math.log(self.sigma0)))
