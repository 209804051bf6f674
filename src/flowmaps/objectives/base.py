"""Shared machinery of every objective: time sampling, weighting, reduction, and the training step.

Every objective is a small callable ``objective(model, x1, cond=None, generator=None) -> LossOutput``.
It draws the base sample ``x0 ~ N(0, σ0² I)`` and times ``(s, t)``, then its ``terms`` method returns
per-sample squared residuals (summed over data dimensions, spec Q8); the loss is the batch mean of
``w(s, t) · Σ terms``. A new objective is one subclass that implements ``terms`` (and, if it needs
state such as a refreshed teacher, ``begin_step``).

Time convention: ``t = 0`` base, ``t = 1`` data. Time domains of ``(s, t)``:
``"diagonal"`` (``s = t``, velocity training), ``"triangle"`` (``s ≤ t``, forward maps, spec Q6) and
``"square"`` (``[0, 1]²``, both directions; FMM direct training needs ``X̂_{t,s}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..interpolants import Interpolant

Velocity = Callable[[Tensor, Tensor], Tensor]
Weighting = Callable[[Tensor, Tensor], Tensor]

__all__ = ["TimeSampler", "Objective", "LossOutput", "Velocity", "Weighting", "GuidedVelocity",
           "call_teacher", "teacher_no_grad"]

DOMAINS = ("diagonal", "triangle", "square")


class TimeSampler:
    """Draws per-sample times ``(s, t)`` on a domain of ``[0, 1]²``.

    Args:
        domain: ``"diagonal"``, ``"triangle"`` (``s ≤ t``) or ``"square"``.
        distribution: ``"uniform"`` (default; uniform on the domain) or ``"logit_normal"`` (each time
            ``σ(N(mean, std))``, as in MeanFlow), applied to two i.i.d. draws.
        tmin, tmax: clip range of the times (default the whole interval, as in [C2]).

    On the triangle the two i.i.d. draws are sorted (``s = min``, ``t = max``), which is uniform on it.
    """

    def __init__(self, domain: str = "triangle", distribution: str = "uniform", mean: float = 0.0,
                 std: float = 1.0, tmin: float = 0.0, tmax: float = 1.0):
        if domain not in DOMAINS:
            raise ValueError(f"unknown time domain {domain!r}; choose one of {DOMAINS}")
        if distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown time distribution {distribution!r}; "
                             "choose 'uniform' or 'logit_normal'")
        if not 0.0 <= tmin < tmax <= 1.0:
            raise ValueError(f"need 0 <= tmin < tmax <= 1, got tmin={tmin}, tmax={tmax}")
        self.domain, self.distribution = domain, distribution
        self.mean, self.std, self.tmin, self.tmax = mean, std, tmin, tmax

    def _draw(self, n: int, like: Tensor, generator) -> Tensor:
        if self.distribution == "uniform":
            u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        else:
            z = torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)
            u = torch.sigmoid(self.mean + self.std * z)
        return self.tmin + (self.tmax - self.tmin) * u

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        a = self._draw(n, like, generator)
        if self.domain == "diagonal":
            return a, a
        b = self._draw(n, like, generator)
        if self.domain == "triangle":
            return torch.minimum(a, b), torch.maximum(a, b)
        return a, b

    def config(self) -> dict:
        return dict(domain=self.domain, distribution=self.distribution, mean=self.mean,
                    std=self.std, tmin=self.tmin, tmax=self.tmax)


def as_time_sampler(times: TimeSampler | str) -> TimeSampler:
    return times if isinstance(times, TimeSampler) else TimeSampler(times)


@dataclass
class LossOutput:
    """``loss``: scalar to minimise; ``terms``: detached batch means of each term (for logging);
    ``stats``: diagnostics that are not part of the loss (e.g. ``jvp_norm``, the mean norm of the
    forward-mode tangent of JVP objectives); ``skipped``: set by the trainer when the update was
    skipped (``"loss"`` or ``"gradient"`` was non-finite)."""

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None


class Objective:
    """Base class. Subclasses implement :meth:`terms`; the batch handling lives here.

    Args:
        interpolant: the interpolant ``I_t = α_t x0 + β_t x1`` (defines the base and the velocity).
        times: a :class:`TimeSampler` or a domain name.
        weight: optional ``w(s, t) -> (B,)`` multiplying each sample's loss (default 1).
    """

    name = "objective"
    default_domain = "triangle"

    def __init__(self, interpolant: Interpolant, times: TimeSampler | str | None = None,
                 weight: Weighting | None = None):
        self.interpolant = interpolant
        self.times = as_time_sampler(times if times is not None else self.default_domain)
        self.weight = weight

    def terms(self, model, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor,
              cond: Tensor | None) -> dict[str, Tensor]:
        """Per-sample squared residuals ``{name: (B,)}``; their sum is the per-sample loss."""
        raise NotImplementedError

    def begin_step(self, model, step: int) -> None:
        """Called by the trainer before each optimisation step (stateful objectives override it)."""

    def record(self, name: str, value: Tensor) -> None:
        """Log a diagnostic from :meth:`terms`: the batch mean of the per-sample norm of ``value``."""
        flat = value.detach().reshape(value.shape[0], -1).float()
        if not hasattr(self, "_stats"):
            self._stats = {}
        self._stats[name] = flat.norm(dim=1).mean().item()

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Training state beyond the model (tensors, JSON metadata); stateless objectives have none."""
        return {}, {}

    def load_state_dict(self, model, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore :meth:`state_dict` after ``model`` holds the checkpoint's weights."""

    def __call__(self, model, x1: Tensor, cond: Tensor | None = None,
                 generator: torch.Generator | None = None) -> LossOutput:
        self._stats: dict[str, float] = {}
        x0 = self.interpolant.sample_base(x1, generator)
        s, t = self.times(x1.shape[0], x1, generator)
        terms = self.terms(model, x0, x1, s, t, cond)
        per_sample = sum(terms.values())
        if self.weight is not None:
            per_sample = self.weight(s, t) * per_sample
        return LossOutput(per_sample.mean(), {k: v.detach().mean().item() for k, v in terms.items()},
                          dict(self._stats))

    def config(self) -> dict:
        return {"name": self.name, "times": self.times.config()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def as_velocity(teacher) -> Velocity:
    """Accept any callable ``b(x, t)``, or an object with a ``velocity(x, t)`` method (a trained
    :class:`~flowmaps.FlowMap`, an exact reference)."""
    if hasattr(teacher, "velocity") and callable(teacher.velocity):
        return teacher.velocity
    if callable(teacher):
        return teacher
    raise TypeError(f"a teacher must be a callable b(x, t) or have .velocity(x, t); got {teacher!r}")


def call_teacher(teacher: Velocity, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """``b̂_t(x)``, or ``b̂_t(x | cond)`` for a conditional teacher (class labels; see
    :class:`GuidedVelocity` for classifier-free guidance as a distillation input)."""
    return teacher(x, t) if cond is None else teacher(x, t, cond)


def teacher_no_grad(teacher: Velocity, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """Evaluate a teacher velocity under stop-gradient (no graph is built, saving memory)."""
    with torch.no_grad():
        return call_teacher(teacher, x.detach(), t.detach(), cond)


class GuidedVelocity:
    """Classifier-free guidance of a class-conditional velocity (label ``null_label`` = unconditional):

        b^w_t(x | c) = b_t(x | ∅) + w [ b_t(x | c) − b_t(x | ∅) ],

    ``w = 1`` is the plain conditional velocity. Used to sample a teacher with guidance, and as the
    teacher of a distillation, so the student learns the guided flow map at this ``w``. Without a label
    (``cond=None``) it is the unconditional velocity.
    """

    def __init__(self, velocity: Velocity, scale: float, null_label: int):
        self.base, self.scale, self.null_label = as_velocity(velocity), float(scale), int(null_label)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        null = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        uncond = self.base(x, t, null)
        if cond is None or self.scale == 0.0:
            return uncond
        cond_v = self.base(x, t, cond)
        return uncond + self.scale * (cond_v - uncond)
