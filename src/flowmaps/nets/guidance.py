"""Guidance as an explicit condition of the network (improved MeanFlow, arXiv 2512.02012).

A guidance-conditioned network takes, beside the class label, the classifier-free guidance scale ``ω`` and
the guidance interval ``[lo, hi]`` (in our time: guidance acts on the part of the trajectory whose time
lies in it), so one trained map serves every scale: the scale is chosen at sampling time, one network
evaluation per step. The condition travels as one float tensor of shape ``(B, 4)``,

    cond = [label, ω, lo, hi],

so everything that slices or moves ``cond`` with its samples keeps working. ``ω = 1`` (or an interval
that excludes the time) is the plain conditional map; the label :attr:`null_label` the unconditional one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["guidance_condition", "split_guidance_condition", "is_guidance_condition", "class_labels",
           "check_image_inputs", "guidance_features"]


def guidance_condition(labels: Tensor, scale: float | Tensor = 1.0, lo: float | Tensor = 0.0,
                       hi: float | Tensor = 1.0, dtype: torch.dtype = torch.float32,
                       check: bool = True) -> Tensor:
    """``(B, 4)`` condition ``[label, ω, lo, hi]`` from integer labels ``(B,)`` and scalars or ``(B,)``
    tensors. ``ω ≥ 1``; ``0 ≤ lo < hi ≤ 1``, checked unless ``check=False``: the checks read the values
    on the host (on a GPU, a wait for the device), which a training step that builds valid conditions
    (improved MeanFlow's) skips. Numbers are filled in on the labels' device (no copy from the host)."""
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError("labels must be a (B,) integer tensor")
    n, device = labels.shape[0], labels.device
    cols = [v.to(dtype=dtype, device=device).expand(n) if isinstance(v, Tensor)
            else torch.full((n,), float(v), dtype=dtype, device=device) for v in (scale, lo, hi)]
    if check and (cols[0] < 1).any():
        raise ValueError("the guidance scale must be >= 1")
    if check and ((cols[1] < 0).any() or (cols[2] > 1).any() or (cols[1] >= cols[2]).any()):
        raise ValueError("the guidance interval must satisfy 0 <= lo < hi <= 1")
    return torch.stack([labels.to(dtype), *cols], dim=1)


def is_guidance_condition(cond) -> bool:
    return isinstance(cond, Tensor) and cond.is_floating_point() and cond.ndim == 2 and cond.shape[1] == 4


def split_guidance_condition(cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(labels, ω, lo, hi)`` of a ``(B, 4)`` condition."""
    if not is_guidance_condition(cond):
        raise ValueError("a guidance condition is a (B, 4) float tensor [label, scale, lo, hi]")
    return cond[:, 0].round().long(), cond[:, 1], cond[:, 2], cond[:, 3]


def class_labels(cond, batch: int, device: torch.device, null_label: int, guidance_conditioned: bool) -> Tensor:
    """The ``(B,)`` integer labels of a class-conditional network: ``cond`` itself, or the null label
    (the unconditional one) for every sample when ``cond`` is ``None``; anything else is refused."""
    if cond is None:
        return torch.full((batch,), null_label, dtype=torch.long, device=device)
    if not isinstance(cond, Tensor) or cond.is_floating_point() or cond.is_complex():
        if not guidance_conditioned and is_guidance_condition(cond):
            raise ValueError("a guidance condition [label, scale, lo, hi] needs a network built "
                             "with guidance_conditioning=True")
        raise ValueError("cond must be an integer tensor of class labels in [0, num_classes]")
    if cond.shape != (batch,):
        raise ValueError(f"cond must have shape ({batch},), got {tuple(cond.shape)}")
    return cond.long()


def check_image_inputs(kind: str, x: Tensor, s: Tensor, t: Tensor, image_shape: tuple[int, ...]) -> None:
    """Refuse inputs of an image network ``kind`` (UNet, DiT) that are not ``(B, *image_shape)`` with
    per-sample times ``(B,)``."""
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{kind} expects inputs of shape (B, {', '.join(map(str, image_shape))}), "
                         f"got {tuple(x.shape)}")
    batch = x.shape[0]
    if s.shape != (batch,) or t.shape != (batch,):
        raise ValueError(f"times s and t must have shape ({batch},), got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")


def guidance_features(cond: Tensor, embed, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(labels, features)`` of a ``(B, 4)`` condition: its labels, and ``embed`` of ``1 − 1/ω``, ``lo``
    and ``hi`` (each in ``dtype``) side by side, the input of a network's guidance embedding."""
    labels, scale, lo, hi = split_guidance_condition(cond)
    return labels, torch.cat([embed(v.to(dtype)) for v in (1 - 1 / scale, lo, hi)], 1)
