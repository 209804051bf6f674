"""Power-function EMA, as EDM2 does it (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696, §3.1 and App. C): averaging profiles of any length, several tracked
at once, and the post-hoc reconstruction of any other length from stored snapshots.

**Profile.** The power-function average with exponent γ ≥ 0 of the weights θ(τ) at time t is

    θ̂_γ(t) = (γ+1)/t^{γ+1} ∫_0^t τ^γ θ(τ) dτ,

the average of θ against the density p_{γ,t}(τ) = (γ+1) τ^γ / t^{γ+1} on [0, t] (zero after t). Its
*length* is the relative standard deviation of that density, σ_rel = std(p_{γ,t}) / t:

    σ_rel(γ) = ((γ+1) / ((γ+2)² (γ+3)))^{1/2}                                   (EDM2 eq. 123)

which for γ ≥ 0 falls from 12^{−1/2} ≈ 0.2887 (γ = 0, the plain average of all training) to 0 (γ → ∞,
the latest weights). The inverse (:func:`std_to_gamma`) is the root γ ≥ 0 of the cubic
σ_rel² (γ+2)²(γ+3) = γ+1, i.e. γ³ + 7γ² + (16 − σ_rel⁻²) γ + 12 − σ_rel⁻² = 0; lengths above
12^{−1/2} (γ < 0, averages weighted towards the start of training) are refused.

**Per step.** Time is counted in optimisation steps. After the update of step t = 1, 2, …

    θ̂ ← β_γ(t) θ̂ + (1 − β_γ(t)) θ(t),      β_γ(t) = (1 − 1/t)^{γ+1}           (EDM2 eq. 127)

(β_γ(1) = 0: the first average is the weights). Unrolled, since Π_{j=k+1}^t β_γ(j) = (k/t)^{γ+1}
telescopes, θ̂_γ(t) = Σ_{k=1}^t w_k θ(k) with

    w_k = (k^{γ+1} − (k−1)^{γ+1}) / t^{γ+1} = ∫_{k−1}^k p_{γ,t}(τ) dτ              (:func:`power_weights`)

so the per-step update is *exactly* the profile integral of the piecewise-constant trajectory
θ(τ) = θ(⌈τ⌉) — no discretisation error — and tends to the integral of a smooth θ as O(1/t).

**Post-hoc reconstruction** (EDM2 App. C.3). A snapshot θ̂_i of profile (γ_i, t_i) is ⟨p_i, θ⟩. A target
profile p_r = p_{γ_r, t_r} is approximated in L²(0, ∞) by Σ_i x_i p_i, with x the least-squares
coefficients under the constraint Σ_i x_i = 1 (every profile has unit mass, so a constant trajectory is
reproduced exactly; EDM2 instead rescales the unconstrained solution to sum 1):

    minimise  xᵀA x − 2 bᵀx + c   subject to 1ᵀx = 1,    A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩, c = ⟨p_r, p_r⟩,

    ⟨p_{a,s}, p_{b,u}⟩ = (a+1)(b+1) m^{a+b+1} / ((a+b+1) s^{a+1} u^{b+1}),  m = min(s, u)   (EDM2 eq. 151)

(one linear solve of the KKT system). Then θ̂_r ≈ Σ_i x_i θ̂_i, whose error ∫ (Σ_i x_i p_i − p_r) θ dτ is
bounded by the profile residual ‖Σ_i x_i p_i − p_r‖ times ‖θ‖ (Cauchy–Schwarz); :func:`posthoc_coefficients`
returns that residual relative to ‖p_r‖.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["STD_MAX", "gamma_to_std", "std_to_gamma", "power_beta", "power_weights", "profile_inner",
           "posthoc_coefficients", "profile_name", "profile_group", "parse_std", "PowerEMA"]

STD_MAX = 12.0 ** -0.5  # σ_rel of γ = 0 (the uniform average); longer profiles need γ < 0


def gamma_to_std(gamma: float) -> float:
    """σ_rel(γ) = ((γ+1) / ((γ+2)² (γ+3)))^{1/2}, the relative standard deviation of the profile."""
    gamma = float(gamma)
    if not gamma >= 0 or not math.isfinite(gamma):
        raise ValueError(f"the exponent gamma must be a finite number >= 0, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent γ ≥ 0 whose profile has relative standard deviation ``std`` ∈ (0, 12^{−1/2}]: the
    root γ ≥ 0 of γ³ + 7γ² + (16 − σ⁻²) γ + 12 − σ⁻² = 0 (unique: σ_rel decreases on γ ≥ 0), found by
    bracketing and bisection in float64, then one Newton polish."""
    std = float(std)
    if not 0 < std <= STD_MAX * (1 + 1e-12) or not math.isfinite(std):
        raise ValueError(f"sigma_rel must be in (0, {STD_MAX:.4f}] (0.2887 is the plain average of all "
                         f"training, gamma = 0), got {std!r}")
    q = std ** -2

    def f(g: float) -> float:  # (γ+2)²(γ+3) − q(γ+1): increasing in γ past the root, < 0 before it
        return (g + 2) ** 2 * (g + 3) - q * (g + 1)

    if f(0.0) >= 0:  # std = STD_MAX within round-off
        return 0.0
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    lo = hi / 2 if hi > 1 else 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    g = 0.5 * (lo + hi)
    slope = 3 * g * g + 14 * g + 16 - q
    if slope > 0:
        g2 = g - f(g) / slope
        if lo <= g2 <= hi:
            g = g2
    return g


def power_beta(gamma: float, t: int) -> float:
    """β_γ(t) = (1 − 1/t)^{γ+1}: the decay of the update after step ``t`` ≥ 1 (β_γ(1) = 0)."""
    if t < 1:
        raise ValueError(f"the step t must be >= 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_weights(gamma: float, t: int) -> np.ndarray:
    """The weights ``w[k-1]`` of θ(k), k = 1…t, in the average after step ``t``:
    w_k = (k/t)^{γ+1} − ((k−1)/t)^{γ+1} (float64; they sum to 1)."""
    k = np.arange(t + 1, dtype=np.float64) / t
    return np.diff(k ** (gamma + 1.0))


def profile_inner(a: float, s: float, b: float, u: float) -> float:
    """⟨p_{a,s}, p_{b,u}⟩ = ∫_0^∞ p_{a,s} p_{b,u} dτ = (a+1)(b+1) m^{a+b+1} / ((a+b+1) s^{a+1} u^{b+1}),
    m = min(s, u), evaluated in logarithms (no overflow at large exponents and step counts)."""
    if s > u:
        a, s, b, u = b, u, a, s
    # m = s: s^{a+b+1} / (s^{a+1} u^{b+1}) = (s/u)^b / u
    return (a + 1) * (b + 1) / (a + b + 1) * math.exp(b * math.log(s / u) - math.log(u))


def posthoc_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                         target_gamma: float) -> tuple[np.ndarray, float]:
    """Coefficients ``x`` of the snapshots (profiles ``(gammas[i], steps[i])``) whose combination
    Σ x_i p_i best approximates the profile ``(target_gamma, target_step)`` in L², under Σ x_i = 1 (module
    docstring); returns ``(x, residual)`` with ``residual = ‖Σ x_i p_i − p_r‖ / ‖p_r‖``.

    Times are scaled by ``target_step`` first (the coefficients do not depend on the unit of time). The
    KKT system [[A, 1], [1ᵀ, 0]] [x; λ] = [b; 1] is solved by least squares (SVD), so duplicated or
    nearly dependent snapshots give the minimum-norm coefficients instead of a singular solve."""
    n = len(steps)
    if n == 0 or len(gammas) != n:
        raise ValueError("need at least one snapshot, with one exponent per snapshot")
    scale = float(target_step)
    ts = [float(t) / scale for t in steps]
    A = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            A[i, j] = A[j, i] = profile_inner(gammas[i], ts[i], gammas[j], ts[j])
    b = np.array([profile_inner(gammas[i], ts[i], target_gamma, 1.0) for i in range(n)])
    c = profile_inner(target_gamma, 1.0, target_gamma, 1.0)
    # Equilibrate (unit diagonal) before the solve: the profiles' norms differ by orders of magnitude.
    d = 1.0 / np.sqrt(np.diag(A))
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = A * d[:, None] * d[None, :]
    kkt[:n, n] = kkt[n, :n] = d
    rhs = np.append(b * d, 1.0)
    y = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    x = y[:n] * d
    residual2 = float(x @ A @ x - 2 * b @ x + c)
    return x, math.sqrt(max(residual2, 0.0) / c)


def profile_name(std: float) -> str:
    """The name of a profile: ``std0.050`` (three decimals, as EDM2 names its files), or every digit
    ``format(std, 'g')`` keeps when three decimals would not give the value back (``std0.0125``)."""
    std = float(std)
    return f"std{std:.3f}" if round(std, 3) == std else f"std{std:g}"


def profile_group(name: str) -> str:
    """The checkpoint weight group of profile ``name`` (groups hold no dots): ``ema_std0p050``."""
    return "ema_" + name.replace(".", "p")


def parse_std(text: str | float) -> float | None:
    """σ_rel from ``0.05``, ``"0.05"``, ``"std0.05"`` or ``"std0.050"``; ``None`` when it is none of these."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    body = text[3:] if text.startswith("std") else text
    try:
        value = float(body)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class PowerEMA:
    """Power-function averages of ``model``'s weights, one per length in ``stds`` (σ_rel values).

    ``models[name]`` is the averaged copy of the model (eval mode, no gradients) of profile ``name``
    (:func:`profile_name`); :meth:`update` applies the step ``t``'s update θ̂ ← β θ̂ + (1 − β) θ(t),
    β = (1 − 1/t)^{γ+1}, to every profile with one multi-tensor lerp each (buffers are copied, as the
    classic EMA does). It is an exact average of the trajectory θ(1), …, θ(t): a step whose update was
    skipped (non-finite) still counts, with θ(t) = θ(t − 1).
    """

    def __init__(self, model: nn.Module, stds: Sequence[float]):
        stds = [float(s) for s in stds]
        if not stds:
            raise ValueError("ema_std: give at least one sigma_rel")
        for s in stds:
            std_to_gamma(s)  # the range check, one message
        names = [profile_name(s) for s in stds]
        if len(set(names)) != len(names):
            raise ValueError(f"ema_std: duplicate lengths {stds}")
        self.stds, self.names = stds, names
        self.gammas = [std_to_gamma(s) for s in stds]
        self.models: dict[str, nn.Module] = {}
        for name in names:
            copy_ = copy.deepcopy(model).eval()
            copy_.requires_grad_(False)
            self.models[name] = copy_
        self._params = [p.detach() for p in model.parameters()]
        self._buffers = list(model.buffers())
        self._pairs = [(list(m.parameters()), list(m.buffers())) for m in self.models.values()]

    def profiles(self) -> list[dict]:
        """``[{"name", "std", "gamma", "group"}]``: the JSON description of the profiles."""
        return [{"name": n, "std": s, "gamma": g, "group": profile_group(n)}
                for n, s, g in zip(self.names, self.stds, self.gammas)]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """The update after step ``t`` ≥ 1 (weights θ(t) are the model's current weights)."""
        for gamma, (params, buffers) in zip(self.gammas, self._pairs):
            weight = 1.0 - power_beta(gamma, t)
            torch._foreach_lerp_(params, self._params, weight)
            if buffers:
                torch._foreach_copy_(buffers, self._buffers)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{group: state_dict}`` of every profile."""
        return {profile_group(n): m.state_dict() for n, m in self.models.items()}

    def load_state_dict(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        missing = [profile_group(n) for n in self.names if profile_group(n) not in tensors]
        if missing:
            raise ValueError(f"the checkpoint has no weights of the EMA profile(s) "
                             f"{', '.join(missing)} this run keeps (train.ema_std)")
        for name, model in self.models.items():
            model.load_state_dict(tensors[profile_group(name)])
