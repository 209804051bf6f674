"""Small tensor helpers shared by every layer (times, broadcasting, norms).

Time convention of the whole library: ``t = 0`` is the base (Gaussian noise), ``t = 1`` is the data.
Times that reach a network or a velocity field are always per-sample tensors of shape ``(B,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_times(t: float | Tensor, x: Tensor) -> Tensor:
    """Return ``t`` as a per-sample tensor of shape ``(B,)`` with the dtype and device of ``x``.

    Accepts a Python number, a 0-d tensor, a ``(1,)`` tensor or a ``(B,)`` tensor.
    """
    batch = x.shape[0]
    if isinstance(t, (int, float)):  # filled on the device: a number copied from the host would wait
        return torch.full((batch,), t, dtype=x.dtype, device=x.device)
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(()).expand(batch)
    if t.ndim == 1 and t.shape[0] == batch:
        return t
    raise ValueError(f"times must be a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")


def expand_as_data(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample values ``(B,)`` to ``(B, 1, ..., 1)`` so they broadcast against ``x``."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def sq_norm(r: Tensor) -> Tensor:
    """Per-sample squared Euclidean norm, summed over every non-batch dimension (spec Q8)."""
    return r.reshape(r.shape[0], -1).pow(2).sum(dim=1)


def per_sample_norm(r: Tensor) -> Tensor:
    """Per-sample Euclidean norm over every non-batch dimension."""
    return sq_norm(r).sqrt()


def jvp_of_inputs(fn, x: Tensor, s: Tensor, t: Tensor, dx: Tensor | None, ds: Tensor | None,
                  dt: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(fn(x, s, t), ∂fn·(dx, ds, dt))`` by one ``torch.func.jvp`` over the inputs whose tangent is
    given (``None``: zero tangent, that input held fixed); at least one tangent must be given."""
    from torch.func import jvp

    names, primals, tangents = [], [], []
    for name, primal, tangent in (("x", x, dx), ("s", s, ds), ("t", t, dt)):
        if tangent is not None:
            names.append(name)
            primals.append(primal)
            tangents.append(tangent)
    fixed = {"x": x, "s": s, "t": t}

    def of(*args: Tensor) -> Tensor:
        inputs = dict(fixed, **dict(zip(names, args)))
        return fn(inputs["x"], inputs["s"], inputs["t"])

    return jvp(of, tuple(primals), tuple(tangents))
