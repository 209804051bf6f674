"""Learning-rate schedules: the factor multiplying the base rate after ``k`` optimisation steps.

* ``inverse_sqrt`` ([P2] Table 2): ``1 / sqrt(max(k / k0, 1))``, constant for ``k0 = decay_start`` steps,
  then ``∝ k^{-1/2}`` (constant throughout when ``decay_start`` is ``None``);
* ``constant``: ``1``;
* ``cosine``: ``final + (1 − final)(1 + cos(π min(k/total, 1)))/2``;
* ``linear``: ``1 − (1 − final) min(k/total, 1)``;

and a warm-up of ``warmup > 0`` steps multiplies the factor by ``min(1, (k + 1)/warmup)``.
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["inverse_sqrt_schedule", "learning_rate_schedule", "LR_SCHEDULES"]


def inverse_sqrt_schedule(decay_start: int | None) -> Callable[[int], float]:
    """Learning-rate factor ``1 / sqrt(max(k / k0, 1))``: constant for ``k0`` steps, then ``∝ k^{-1/2}``
    ([P2] Table 2, ``k0 = 35000``). ``None`` keeps the rate constant."""
    if decay_start is None:
        return lambda k: 1.0
    if decay_start < 1:
        raise ValueError("lr decay start must be >= 1 step")
    return lambda k: 1.0 / math.sqrt(max(k / decay_start, 1.0))


LR_SCHEDULES = ("inverse_sqrt", "constant", "cosine", "linear")


def learning_rate_schedule(name: str = "inverse_sqrt", decay_start: int | None = None, warmup: int = 0,
                total: int | None = None, final: float = 0.0) -> Callable[[int], float]:
    """Learning-rate factor after ``k`` steps.

    ``inverse_sqrt``: :func:`inverse_sqrt_schedule` (constant while ``decay_start`` is ``None``);
    ``constant``; ``cosine``: ``final + (1 − final)(1 + cos(π k/total))/2``; ``linear``:
    ``1 − (1 − final) k/total`` (both need ``total``, the run's step count, and stay at ``final`` after
    it). ``warmup > 0`` multiplies the factor by ``min(1, (k + 1)/warmup)``.
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if int(warmup) < 0:
        raise ValueError("lr warm-up must be >= 0 steps")
    if not 0.0 <= final <= 1.0:
        raise ValueError("the final lr factor must be in [0, 1]")
    if name in ("cosine", "linear") and (total is None or total < 1):
        raise ValueError(f"the {name} lr schedule needs the total number of steps")
    if name == "inverse_sqrt":
        base = inverse_sqrt_schedule(decay_start)
    elif name == "constant":
        base = lambda k: 1.0  # noqa: E731
    elif name == "cosine":
        base = lambda k: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(k / total, 1.0)))  # noqa: E731
    else:
        base = lambda k: 1.0 - (1.0 - final) * min(k / total, 1.0)  # noqa: E731
    if not warmup:
        return base
    return lambda k: base(k) * min(1.0, (k + 1) / warmup)
