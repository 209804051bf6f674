"""Training in one call: :func:`fit` builds a :class:`~flowmaps.train.trainer.Trainer`, runs it and
returns a :class:`FitResult` (the loss history with the trained and averaged models)."""

from __future__ import annotations

from torch import nn

from ..objectives.base import Objective
from .batches import DataSource
from .trainer import Trainer

__all__ = ["fit", "FitResult"]


class FitResult(list):
    """What :func:`fit` returns: the per-step losses (it is that list) and the trained models.

    ``ema`` is the exponential moving average of the weights (a copy of the model in eval mode, or
    ``None`` when ``ema_decay=None``): usually the better sampler, as the CLI samples and evaluates it.
    With ``ema_std`` it is the first power-function profile, and ``averages`` holds every average by
    name (``"ema"``, ``"std0.050"``, …; see :attr:`Trainer.averages`). ``model`` is the model passed to :func:`fit`, trained in place (the raw weights); ``trainer`` the
    :class:`Trainer`, to continue training (``result.trainer.run(1000)``).
    """

    def __init__(self, losses: list[float], trainer: "Trainer"):
        super().__init__(losses)
        self.trainer, self.model, self.ema = trainer, trainer.model, trainer.ema
        self.averages = trainer.averages

    @property
    def best(self) -> nn.Module:
        """The EMA model when one is kept, else the raw model."""
        return self.ema if self.ema is not None else self.model


def fit(model: nn.Module, objective: Objective, data: DataSource | None, *, steps: int,
        batch_size: int = 256, lr: float = 1e-3, seed: int = 0, progress: bool = False,
        ema_decay: float | None = 0.999, **options) -> FitResult:
    """Train ``model`` on ``objective`` for ``steps`` steps; returns a :class:`FitResult`: the per-step
    loss history (a list), with the EMA of the weights in ``.ema`` (``ema_decay``, default 0.999 as in
    the CLI; ``None`` keeps none) and the trained model in ``.model``. ``ema_std=[0.05, 0.10]`` (an
    option of :class:`Trainer`) also keeps EDM2's power-function averages of those lengths σ_rel; the
    first becomes ``.ema`` and all are in ``.averages``.

    ``data`` is a tensor of samples ``(N, ...)``, :class:`~flowmaps.data.images.ByteImages` or a callable
    drawing a batch (``data(n)`` or ``data(n, generator=g)``), or ``None`` with a teacher distillation
    (LMD, EMD): no dataset, the points at time ``s`` on the teacher's ODE paths from the base, solved
    and refreshed by :class:`~flowmaps.objectives.trajectories.TeacherPaths` (``teacher_paths={"paths":
    4096, "steps": 32, "refresh_every": 100, "refresh_paths": 256}``; spec E.8). Further ``options`` go to
    :class:`Trainer` (optimizer, grad_clip, lr_decay_start, weight_decay, max_bad_steps, grad_accum,
    precision, compile). The EMA does not change the training of ``model``: with or without it the raw
    weights are the same.
    """
    trainer = Trainer(model, objective, data, batch_size=batch_size, lr=lr, seed=seed,
                      ema_decay=ema_decay, **dict(dict(total_steps=steps), **options))
    return FitResult(trainer.run(steps, progress=progress), trainer)
