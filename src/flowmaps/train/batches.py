"""Where a training batch comes from: a tensor of samples, uint8 images decoded per batch, or a callable
drawing its own samples (an exact reference's ``sample``), behind one ``draw(n)``."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from ..data.images import ByteImages

__all__ = ["DataSource", "batch_sampler", "all_finite", "sample_shape_of"]

DataSource = Tensor | ByteImages | Callable[..., Tensor]


def all_finite(data: Tensor, rows: int = 1 << 14) -> bool:
    """``torch.isfinite(data).all()``, a block of rows at a time (no mask as large as the data)."""
    return all(bool(torch.isfinite(block).all()) for block in data.split(rows))


def batch_sampler(data: DataSource, generator: torch.Generator, device) -> Callable[[int], Tensor]:
    """``draw(n)``: a batch of ``n`` samples on ``device``, drawn with ``generator``: uniform rows (with
    replacement) of a tensor or :class:`~flowmaps.data.images.ByteImages` (checked once: shape
    ``(N, ...)``, ``N > 0``, finite), or the callable's own ``data(n[, generator=generator])``."""
    if isinstance(data, (Tensor, ByteImages)):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (N, ...) with N > 0, got {tuple(data.shape)}")
        # ByteImages decode to finite levels; only the selected rows are decoded, per batch.
        if isinstance(data, Tensor) and not all_finite(data):
            raise ValueError("data contains NaN or infinite values")

        def draw(n: int) -> Tensor:
            idx = torch.randint(data.shape[0], (n,), generator=generator, device=generator.device)
            return data[idx.to(data.device)].to(device)

        draw.data = data
        return draw
    if callable(data):
        try:
            takes_generator = "generator" in inspect.signature(data).parameters
        except (TypeError, ValueError):
            takes_generator = False
        if takes_generator:
            return lambda n: data(n, generator=generator).to(device)
        return lambda n: data(n).to(device)
    raise TypeError("data must be a tensor of samples (N, ...), ByteImages or a callable n -> batch")


def sample_shape_of(model: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample of ``model``: its ``sample_shape``, a U-Net's image shape, an MLP's
    dimension; else a one-line ValueError asking for ``sample_shape``."""
    if getattr(model, "sample_shape", None):
        return tuple(model.sample_shape)
    net = getattr(model, "net", model)
    options = getattr(net, "network_options", None) or {}
    if options.get("image_shape"):
        return tuple(options["image_shape"])
    if isinstance(options.get("dim"), int):
        return (options["dim"],)
    raise ValueError("data=None: give sample_shape (the shape of one sample) for this model")
