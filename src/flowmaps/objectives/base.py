"""Shared machinery of every objective: the training step, teachers and guidance, the dropout scope.

Every objective is a small callable ``objective(model, x1, cond=None, generator=None) -> LossOutput``.
It draws the base sample ``x0 ~ N(0, σ0² I)`` and times ``(s, t)`` (:mod:`flowmaps.objectives.times`),
then its ``terms`` method returns per-sample squared residuals (summed over data dimensions, spec Q8);
``combine`` turns them into per-sample losses (their sum under the weighting) and the loss is their
batch mean. A new objective is one subclass that implements ``terms`` (and, if it needs state such as a
refreshed teacher or a learned weight, ``begin_step``, ``state_dict`` and ``trainable_modules``).

Time convention: ``t = 0`` base, ``t = 1`` data. Time domains of ``(s, t)``:
``"diagonal"`` (``s = t``, velocity training), ``"triangle"`` (``s ≤ t``, forward maps, spec Q6) and
``"square"`` (``[0, 1]²``, both directions; FMM direct training needs ``X̂_{t,s}``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..interpolants import Interpolant
from .times import DOMAINS, SelfDistillationTimes, TimeSampler, as_time_sampler

Velocity = Callable[[Tensor, Tensor], Tensor]
Weighting = Callable[[Tensor, Tensor], Tensor]

__all__ = ["TimeSampler", "Objective", "LossOutput", "Velocity", "Weighting", "GuidedVelocity",
           "call_teacher", "teacher_no_grad", "dropout_disabled", "DOMAINS"]

@dataclass
class LossOutput:
    """``loss``: scalar to minimise; ``terms``: detached batch means of each term (for logging);
    ``stats``: diagnostics that are not part of the loss (e.g. ``jvp_norm``, the mean norm of the
    forward-mode tangent of JVP objectives); ``skipped``: set by the trainer when the update was
    skipped (``"loss"`` or ``"gradient"`` was non-finite); ``grad_norm``: the gradient norm before
    clipping, set by the trainer; ``finite``: under the trainer's device guard, the two flags (loss,
    gradient finite) that decide on the device whether the update is made.

    Terms and stats are 0-dim tensors on the device of the loss (plain floats are accepted too): they
    stay there, so a training step needs no host read; :meth:`logged` reads them all at once."""

    loss: Tensor
    terms: dict[str, Tensor | float] = field(default_factory=dict)
    stats: dict[str, Tensor | float] = field(default_factory=dict)
    skipped: str | None = None
    grad_norm: Tensor | None = None
    finite: Tensor | None = None

    def logged(self) -> dict[str, float]:
        """``{"loss": …, **terms, **stats}`` as Python floats, in one host transfer."""
        names = ["loss", *self.terms, *self.stats]
        values = [self.loss, *self.terms.values(), *self.stats.values()]
        device = self.loss.device
        stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64) if isinstance(v, Tensor)
                               else torch.tensor(float(v), dtype=torch.float64, device=device)
                               for v in values])
        return dict(zip(names, stacked.tolist()))


class Objective:
    """Base class: the one training step every objective shares. Subclasses implement :meth:`terms`.

    The step (:meth:`__call__`): draw ``x0 ~ N(0, σ0² I)`` and per-sample times ``(s, t)`` from
    :attr:`times`, let :meth:`terms` return per-sample squared residuals, :meth:`combine` them into
    per-sample losses (sum, then the weighting), and average over the batch (spec Q7, Q8).

    Dropout (spec Q10): only a flow-matching pass on the diagonal runs the network with dropout; every
    off-diagonal residual runs it with dropout off (:func:`dropout_disabled`), so the primal, its
    tangents and the teacher passes of one residual all see one network.

    Args:
        interpolant: the interpolant ``I_t = α_t x0 + β_t x1`` (defines the base and the velocity).
        times: a time sampler (a self-distillation objective's :class:`SelfDistillationTimes`) or a domain
            name (default: the objective's own).
        weight: optional ``w(s, t) -> (B,)`` multiplying each sample's loss (default 1).
    """

    name = "objective"
    default_domain = "triangle"

    def __init__(self, interpolant: Interpolant,
                 times: TimeSampler | SelfDistillationTimes | str | None = None,
                 weight: Weighting | None = None):
        self.interpolant = interpolant
        self.times = as_time_sampler(times if times is not None else self.default_domain)
        self.weight = weight
        self.generator: torch.Generator | None = None

    @property
    def domain(self) -> str:
        """Where in ``[0, 1]²`` the map is trained: ``"triangle"`` (forward maps ``s ≤ t`` only),
        ``"square"`` (both directions) or ``"diagonal"`` (a velocity)."""
        return getattr(self.times, "domain", "triangle")

    def terms(self, model, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor,
              cond: Tensor | None) -> dict[str, Tensor]:
        """Per-sample squared residuals ``{name: (B,)}``; their sum is the per-sample loss."""
        raise NotImplementedError

    def combine(self, terms: dict[str, Tensor], s: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss from the terms: their sum, times ``weight(s, t)`` when one is given."""
        per_sample = sum(terms.values())
        return per_sample if self.weight is None else self.weight(s, t) * per_sample

    def summarize(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The logged value of each term: its batch mean, a detached 0-dim tensor (no host read)."""
        return {k: v.detach().mean() for k, v in terms.items()}

    points = None  # where the points at time s come from without data (SelfDistillation.data_free)

    def data_free(self, shape, device="cpu", dtype=torch.float32, seed: int = 0, **options):
        """Prepare to train without data and return the source of points (spec E.8); objectives that
        learn from data refuse with a one-line ValueError (a teacher's distillations accept)."""
        raise ValueError(f"{self.name} learns from data; training without data (data=None, "
                         "data.name=none) needs a teacher distillation such as LMD or EMD")

    def begin_step(self, model, step: int) -> None:
        """Called by the trainer before each optimisation step (stateful objectives override it)."""

    def plan(self, total_steps: int) -> None:
        """Told by the trainer, before the first step, how many steps the run takes (objectives with a
        schedule over the run, such as AlphaFlow's α curriculum, use it)."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules of the objective trained beside the model (e.g. a learned loss weight): the trainer
        adds their parameters to the optimiser and to the distributed wrapper."""
        return []

    def record(self, name: str, value: Tensor) -> None:
        """Log a diagnostic from :meth:`terms`: the batch mean of the per-sample norm of ``value``."""
        flat = value.detach().reshape(value.shape[0], -1).float()
        if not hasattr(self, "_stats"):
            self._stats = {}
        self._stats[name] = flat.norm(dim=1).mean()

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Training state beyond the model (tensors, JSON metadata); stateless objectives have none."""
        return {}, {}

    def load_state_dict(self, model, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore :meth:`state_dict` after ``model`` holds the checkpoint's weights."""

    def __call__(self, model, x1: Tensor, cond: Tensor | None = None,
                 generator: torch.Generator | None = None) -> LossOutput:
        self._stats: dict[str, Tensor] = {}
        self.generator = generator  # for draws inside terms (e.g. PSD's intermediate time)
        x0 = self.interpolant.sample_base(x1, generator)
        s, t = self.times(x1.shape[0], x1, generator)
        terms = self.terms(model, x0, x1, s, t, cond)
        per_sample = self.combine(terms, s, t)
        return LossOutput(per_sample.mean(), self.summarize(terms), dict(self._stats))

    def config(self) -> dict:
        return {"name": self.name, "times": self.times.config()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module):
    """Run ``model`` with its dropout layers in eval mode (restored on exit); other layers keep their
    mode. Off-diagonal residuals run under it, so one residual sees one network (spec Q10)."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    switched = [m for m in modules if isinstance(m, _DROPOUT) and m.training]
    for m in switched:
        m.train(False)
    try:
        yield model
    finally:
        for m in switched:
            m.train(True)


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
