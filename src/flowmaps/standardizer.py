"""Data units and model space: the per-dimension standardisation ``z = (x − mean) / std`` that a model
trained on ``data.standardize`` data works in. Kept at the bottom of the package because a trained
:class:`~flowmaps.FlowMap` carries one to map its samples back to data units."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Standardizer"]


@dataclass
class Standardizer:
    """Per-dimension standardisation ``z = (x − mean) / std`` and back, ``x = z · std + mean``.

    ``mean`` and ``std`` are float32 tensors of shape ``(d,)``; ``to_dict``/``from_dict`` store them as
    JSON lists (e.g. in a checkpoint's metadata) so samples can be mapped back to data units.
    """

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, min_std: float = 1e-6) -> "Standardizer":
        """Mean and (unbiased) std per dimension of ``x`` ``(N, d)``; std clamped to ``>= min_std`` so
        constant features (and ``N = 1``) give a finite transform."""
        x = torch.as_tensor(x)
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError("Standardizer.fit needs at least one sample of shape (N, d)")
        x = x.reshape(x.shape[0], -1).double()
        std = x.std(0) if x.shape[0] > 1 else torch.zeros_like(x[0])
        return cls(x.mean(0).float(), std.clamp_min(min_std).float())

    def __post_init__(self):
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Standardizer: mean and std shapes differ ({tuple(self.mean.shape)} vs "
                             f"{tuple(self.std.shape)})")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()
                and (self.std > 0).all()):
            raise ValueError("Standardizer: mean must be finite and std finite and positive")

    def transform(self, x: Tensor) -> Tensor:
        """``z = (x − mean) / std``."""
        return (x - self.mean.to(x)) / self.std.to(x)

    def inverse(self, z: Tensor) -> Tensor:
        """``x = z · std + mean`` (data units)."""
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        try:
            return cls(torch.tensor(d["mean"], dtype=torch.float32),
                       torch.tensor(d["std"], dtype=torch.float32))
        except (KeyError, TypeError) as err:
            raise ValueError(f"Standardizer.from_dict needs numeric lists 'mean' and 'std' ({err})") \
                from None
