"""Reference two-time networks ``v_θ(x, s, t)`` for flow maps of vector data.

Every network here takes per-sample times ``s, t`` of shape ``(B,)`` (``t = 0`` base, ``t = 1`` data),
uses only smooth operations that have forward-mode rules (so ``torch.func.jvp`` works through it), and
has a zero-initialised output layer, so ``FlowMap(net)`` starts as the identity map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TimeFeatures", "MLP"]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


class TimeFeatures(nn.Module):
    """Fourier features of a scalar time: ``[τ, sin(2π f_k τ), cos(2π f_k τ)]_k``.

    Frequencies ``f_k`` are log-spaced from ``min_frequency`` to ``max_frequency``. Smooth in ``τ``, so
    time-JVPs are exact and well scaled (a smooth, bounded ``∂_τ`` matters for the Lagrangian losses).
    """

    def __init__(self, n_frequencies: int = 8, min_frequency: float = 0.25,
                 max_frequency: float = 8.0):
        super().__init__()
        freqs = torch.logspace(math.log10(min_frequency), math.log10(max_frequency), n_frequencies)
        self.register_buffer("frequencies", 2 * math.pi * freqs, persistent=False)
        self.dim = 1 + 2 * n_frequencies

    def forward(self, tau: Tensor) -> Tensor:
        angles = tau[:, None] * self.frequencies.to(tau.dtype)
        return torch.cat([tau[:, None], angles.sin(), angles.cos()], dim=1)


class MLP(nn.Module):
    """Two-time MLP ``v_θ(x, s, t)`` for vectors of any dimension.

    Input: ``[x / σ_data, φ(s), φ(t − s), cond]`` where ``φ`` are :class:`TimeFeatures` (spec Q4:
    ``(s, t − s)`` conditioning); ``depth`` hidden layers of width ``width``; output multiplied by
    ``σ_data`` and produced by a zero-initialised linear layer (identity map at initialisation).
    Inputs of shape ``(B, *shape)`` are flattened and the output is reshaped back.

    Args:
        dim: number of features per sample (product of the sample shape).
        width, depth: hidden width and number of hidden layers.
        activation: ``"gelu"`` (default; smooth, needed by the Eulerian losses, spec Appendix B),
            ``"silu"``, ``"tanh"`` or ``"softplus"``.
        sigma_data: scalar or per-dimension data scale for the pre/post scaling.
        cond_dim: size of an optional conditioning vector appended to the input.
        n_frequencies, max_frequency: Fourier time features (see :class:`TimeFeatures`).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 4, activation: str = "gelu",
                 sigma_data: float | Tensor = 1.0, cond_dim: int = 0, n_frequencies: int = 8,
                 max_frequency: float = 8.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError("dim, width and depth must be positive")
        self.dim, self.cond_dim = dim, cond_dim
        self.time_features = TimeFeatures(n_frequencies, max_frequency=max_frequency)
        sigma = torch.as_tensor(sigma_data, dtype=torch.float32).reshape(-1)
        if sigma.numel() not in (1, dim) or (sigma <= 0).any():
            raise ValueError(f"sigma_data must be positive with 1 or {dim} entries")
        self.register_buffer("sigma_data", sigma.expand(dim).clone())
        layers: list[nn.Module] = []
        fan_in = dim + 2 * self.time_features.dim + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), _ACTIVATIONS[activation]()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"network expects {self.dim} features per sample, got {flat.shape[1]}")
        sigma = self.sigma_data.to(flat.dtype)
        parts = [flat / sigma, self.time_features(s.to(flat.dtype)),
                 self.time_features((t - s).to(flat.dtype))]
        if self.cond_dim:
            if cond is None:
                raise ValueError("this network was built with cond_dim > 0 and needs cond")
            parts.append(cond.reshape(shape[0], -1).to(flat.dtype))
        out = self.out(self.body(torch.cat(parts, dim=1))) * sigma
        return out.reshape(shape)
