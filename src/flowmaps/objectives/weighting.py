"""Per-sample loss weightings of the self-distillation step (spec §3.1, §3.7, §3.8).

Each turns per-sample losses ``ℓ`` (squared residuals summed over data dimensions) into what is averaged:

* :class:`LearnedWeight` — [P2] eq. (19): ``e^{−w(s,t)} ℓ + w(s,t)`` with a small learned network
  ``w(s, t)`` read as the log-variance of the loss at ``(s, t)`` (EDM2's uncertainty weighting in two
  times). Its parameters train with the model's and are checkpointed with the objective.
* :class:`AdaptiveWeight` — MeanFlow §4.3: ``ℓ / sg(ℓ + ε)^p`` (``p = 1``: the gradient of ``log ℓ``;
  ``p = ½``: Pseudo-Huber-like).
* :class:`TangentNormalization` — AYF / sCM: the v-form residual ``g`` (the "tangent") enters the
  gradient as ``g / (‖g‖ + c)``, i.e. the loss ``ℓ / sg(√ℓ + c)``; with a warm-up of the ``(t − s)``
  term of the target (see :meth:`warmup`). Applied to the off-diagonal samples only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LearnedWeight", "AdaptiveWeight", "TangentNormalization", "WEIGHTINGS"]

WEIGHTINGS = ("none", "learned", "adaptive", "tangent")


class LearnedWeight(nn.Module):
    """``w(s, t) = Linear( (PosEmb(s) + PosEmb(t)) / √2 )``: the log-variance head of [C2]'s EDM2 variant
    (spec §3.1, Q9), on ``(s, t)`` — not ``(s, t − s)``. Sinusoidal embeddings of ``channels`` features
    (max period ``10⁴``, raw times in [0, 1]); the output layer starts at zero, so ``w ≡ 0`` and the
    weighted loss equals the plain one at initialisation. ``apply(ℓ, s, t) = e^{−w} ℓ + w``, minimised
    over ``w`` at ``w = log E[ℓ | s, t]``.
    """

    def __init__(self, channels: int = 128, max_period: float = 1e4):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"channels must be an even number >= 2, got {channels}")
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("frequencies", freqs.float(), persistent=False)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.channels, self.max_period = channels, max_period

    def embed(self, tau: Tensor) -> Tensor:
        angles = tau.float()[:, None] * self.frequencies
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """``w(s, t)`` per sample, shape ``(B,)``, in fp32."""
        with torch.autocast(s.device.type, enabled=False):
            features = (self.embed(s) + self.embed(t)) / math.sqrt(2.0)
            return self.linear(features.to(self.linear.weight.dtype)).squeeze(1)

    def apply(self, loss: Tensor, s: Tensor, t: Tensor) -> Tensor:
        w = self(s, t).to(loss.dtype)
        return torch.exp(-w) * loss + w

    def config(self) -> dict:
        return {"name": "learned", "channels": self.channels}


class AdaptiveWeight:
    """MeanFlow's adaptive weight: ``ℓ / sg(ℓ + ε)^p`` (spec §3.7; ``p = 1``, ``ε = 10⁻³`` by default)."""

    def __init__(self, p: float = 1.0, eps: float = 1e-3):
        if not p >= 0 or not eps > 0:
            raise ValueError(f"adaptive weighting needs p >= 0 and eps > 0, got p={p}, eps={eps}")
        self.p, self.eps = float(p), float(eps)

    def apply(self, loss: Tensor) -> Tensor:
        return loss / (loss.detach() + self.eps).pow(self.p)

    def config(self) -> dict:
        return {"name": "adaptive", "p": self.p, "eps": self.eps}


class TangentNormalization:
    """AYF / sCM tangent normalisation with tangent warm-up (spec §3.8, Q20; from third-party
    reproductions, unverified against the papers).

    With the v-form residual ``g = v̂_{s,t} − (b + r (t − s) D v̂)`` (the whole target under sg) the
    gradient is ``2 g·∇v̂``; normalising replaces it by ``2 g/(‖g‖ + c)·∇v̂``, which is the gradient of
    ``ℓ / sg(‖g‖ + c)`` with ``ℓ = ‖g‖²``. The warm-up factor ``r`` of the ``(t − s)`` term ramps
    linearly from 0 to 1 over ``warmup`` steps (``0``: no warm-up); before it reaches 1 the fixed point
    is not yet the flow map.
    """

    def __init__(self, c: float = 0.1, warmup: int = 0):
        if not c > 0 or int(warmup) < 0:
            raise ValueError(f"tangent normalisation needs c > 0 and warmup >= 0, got c={c}, "
                             f"warmup={warmup}")
        self.c, self.warmup = float(c), int(warmup)

    def warmup_factor(self, step: int) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)

    def apply(self, loss: Tensor) -> Tensor:
        return loss / (loss.detach().sqrt() + self.c)

    def config(self) -> dict:
        return {"name": "tangent", "c": self.c, "warmup": self.warmup}
