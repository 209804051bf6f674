"""One-process training: a :class:`Trainer` that owns the optimisation state, and :func:`fit` on top of it.

The step is shared by every objective (shortcut-model style): draw a batch of data ``x1``, let the
objective draw ``x0``, ``(s, t)`` and compute its loss, clip gradients, step the optimiser and the
learning-rate schedule, update the EMA. All randomness of data, base samples and times comes from one
``torch.Generator`` seeded by ``seed``, so a run is reproducible from its seed.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable

import torch
from torch import Tensor, nn

from .objectives.base import LossOutput, Objective

DataSource = Tensor | Callable[..., Tensor]

__all__ = ["Trainer", "fit", "inverse_sqrt_schedule"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


def inverse_sqrt_schedule(decay_start: int | None) -> Callable[[int], float]:
    """Learning-rate factor ``1 / sqrt(max(k / k0, 1))``: constant for ``k0`` steps, then ``∝ k^{-1/2}``
    ([P2] Table 2, ``k0 = 35000``). ``None`` keeps the rate constant."""
    if decay_start is None:
        return lambda k: 1.0
    if decay_start < 1:
        raise ValueError("lr decay start must be >= 1 step")
    return lambda k: 1.0 / math.sqrt(max(k / decay_start, 1.0))


def _batch_sampler(data: DataSource, generator: torch.Generator, device) -> Callable[[int], Tensor]:
    if isinstance(data, Tensor):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (N, ...) with N > 0, got {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or infinite values")

        def draw(n: int) -> Tensor:
            idx = torch.randint(data.shape[0], (n,), generator=generator, device=generator.device)
            return data[idx.to(data.device)].to(device)

        return draw
    if callable(data):
        try:
            takes_generator = "generator" in inspect.signature(data).parameters
        except (TypeError, ValueError):
            takes_generator = False
        if takes_generator:
            return lambda n: data(n, generator=generator).to(device)
        return lambda n: data(n).to(device)
    raise TypeError("data must be a tensor of samples (N, ...) or a callable n -> batch")


class Trainer:
    """Optimisation state for one model and one objective.

    Args:
        model: a :class:`~flowmaps.FlowMap` (or a velocity network for :class:`~flowmaps.objectives.Velocity`).
        objective: any :class:`~flowmaps.objectives.Objective`.
        data: samples ``(N, ...)`` drawn with replacement, or a callable ``data(n[, generator=g])``.
        batch_size, lr: batch size and base learning rate.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"radam"`` (the papers' choice).
        grad_clip: global gradient-norm clip (``None``: off).
        lr_decay_start: start of the inverse-sqrt decay (``None``: constant rate).
        ema_decay: keep an exponential moving average of the weights in ``self.ema`` (``None``: off);
            the decay is warmed up as ``min(ema_decay, (1 + k)/(10 + k))`` after ``k`` updates.
        seed: seeds the generator of data, base samples and times, and the global RNG (dropout).
        max_bad_steps: consecutive non-finite losses tolerated (each update is skipped) before stopping.
    """

    def __init__(self, model: nn.Module, objective: Objective, data: DataSource, *,
                 batch_size: int = 256, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, grad_clip: float | None = None,
                 lr_decay_start: int | None = None, ema_decay: float | None = None, seed: int = 0,
                 max_bad_steps: int = 10):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not lr > 0:
            raise ValueError("lr must be > 0")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        self.model, self.objective = model, objective
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.device = params[0].device
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.draw = _batch_sampler(data, self.generator, self.device)
        self.batch_size, self.grad_clip = batch_size, grad_clip
        self.optimizer = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           inverse_sqrt_schedule(lr_decay_start))
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(model).eval()
            self.ema.requires_grad_(False)
        self.step_count = 0
        self.bad_steps, self.max_bad_steps = 0, max_bad_steps
        self.last_grad_norm = float("nan")

    def step(self) -> LossOutput:
        """One optimisation step; returns the objective's output (loss and logged terms)."""
        self.model.train()
        self.objective.begin_step(self.model, self.step_count)
        batch = self.draw(self.batch_size)
        out = self.objective(self.model, batch, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(out.loss):
            return self._skip(out, "loss")
        out.loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.grad_clip if self.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.last_grad_norm = float(grad_norm)
        if not math.isfinite(self.last_grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(out, "gradient")
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.bad_steps = 0
        self.step_count += 1
        return out

    def _skip(self, out: LossOutput, what: str) -> LossOutput:
        self.bad_steps += 1
        self.step_count += 1
        if self.bad_steps >= self.max_bad_steps:
            raise FloatingPointError(f"non-finite {what} for {self.bad_steps} consecutive steps "
                                     f"(last at step {self.step_count}, terms {out.terms}); stopping")
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Warm-up (as in common EMA implementations): early on the average would be dominated by the
        # initialisation, so the decay is capped at (1 + k) / (10 + k) after k updates.
        k = self.step_count
        decay = min(self.ema_decay, (1.0 + k) / (10.0 + k))
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def run(self, steps: int, progress: bool = True,
            callback: Callable[[int, LossOutput], None] | None = None) -> list[float]:
        """Run ``steps`` steps with a progress bar (loss, steps/s, ETA); returns the loss history."""
        from tqdm.auto import tqdm

        if steps < 0:
            raise ValueError("steps must be >= 0")
        history: list[float] = []
        name = getattr(self.objective, "name", "train")
        with tqdm(total=steps, desc=name, disable=not progress, dynamic_ncols=True,
                  unit="step") as bar:
            for _ in range(steps):
                out = self.step()
                history.append(out.loss.item())
                if callback is not None:
                    callback(self.step_count, out)
                bar.update(1)
                if self.step_count % 25 == 0 or self.step_count == steps:
                    bar.set_postfix(loss=f"{history[-1]:.4g}")
        return history


def fit(model: nn.Module, objective: Objective, data: DataSource, *, steps: int,
        batch_size: int = 256, lr: float = 1e-3, seed: int = 0, progress: bool = False,
        **options) -> list[float]:
    """Train ``model`` on ``objective`` for ``steps`` steps; returns the per-step loss history.

    ``data`` is a tensor of samples ``(N, ...)`` or a callable drawing a batch (``data(n)`` or
    ``data(n, generator=g)``). Further ``options`` go to :class:`Trainer` (optimizer, grad_clip,
    lr_decay_start, ema_decay, weight_decay, max_bad_steps).
    """
    trainer = Trainer(model, objective, data, batch_size=batch_size, lr=lr, seed=seed, **options)
    return trainer.run(steps, progress=progress)
