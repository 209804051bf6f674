"""Velocity sources: where the velocity inside a residual's target comes from (spec App. C, (ii)).

A residual compares the map with a velocity ``b``: at the transported point ``X̂_{s,t}(I_s)``
(Lagrangian), at ``I_s`` (Eulerian), or not at all (the semigroup compares the map with itself). The
source of ``b`` is one of

* ``"self"`` — the network's own diagonal ``v̂_{t,t}`` with the current parameters under stop-gradient:
  [P2]'s self-distillation teacher (δ = 0 in its eq. 96);
* ``"ema"`` — the diagonal of an exponential moving average of the parameters (shortcut models' targets);
* ``"teacher"`` — an external velocity ``b̂(x, t)`` (distillation: LMD, EMD, AYF);
* ``"conditional"`` — the single-sample conditional velocity ``İ_s = α̇_s x0 + β̇_s x1`` (consistency
  training, MeanFlow). Its conditional mean given ``I_s`` is ``b_s(I_s)``, so it is unbiased only where
  the residual is linear in ``b`` and evaluated at ``I_s``: the Eulerian residual under stop-gradient.

With classifier-free guidance at a scale ``w`` (class-conditional data), the source is the guided
velocity ``b(x|∅) + w [b(x|c) − b(x|∅)]`` (``c = ∅`` for samples whose label was dropped). For the
conditional source it is MeanFlow's training-time guidance (its ImageNet code, ``guidance_fn``):

    b^g = ω İ + (1 − ω − κ) sg v̂_{s,s}(x|∅) + κ sg v̂_{s,s}(x|c),

for labelled samples whose time lies in the guidance interval, else ``İ`` (``ω = guidance``,
``κ = kappa``; the two network passes run without dropout and without gradient). Its conditional mean is
the guided velocity at the effective scale ``ω / (1 − κ)``; MeanFlow's ImageNet default is ``ω = 1``,
``κ = 0.5``. The interval is stated in our time on the start ``s`` (MeanFlow's ``[t_a, t_b]`` in its time,
``τ = 1`` noise, is ``[1 − t_b, 1 − t_a]`` here).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.func import functional_call

from .base import as_velocity, call_teacher, dropout_disabled

__all__ = ["VelocitySource", "SOURCES", "make_source"]

SOURCES = ("self", "ema", "teacher", "conditional")


class VelocitySource:
    """Evaluates the target velocity ``b_t(x | cond)``.

    ``grad`` selects what the result is differentiable in: ``"none"`` (stop-gradient; no graph is
    built), ``"input"`` (through ``x`` only; the source's parameters frozen) or ``"all"`` (also through
    the network's own parameters; the ``"self"`` source only).
    """

    def __init__(self, kind: str, teacher=None, ema_decay: float = 0.999, guidance: float = 1.0,
                 null_label: int | None = None, kappa: float = 0.0,
                 interval: tuple[float, float] = (0.0, 1.0), ema_warmup: bool = True):
        if kind not in SOURCES:
            raise ValueError(f"unknown velocity source {kind!r}; choose one of {', '.join(SOURCES)}")
        if (teacher is not None) != (kind == "teacher"):
            raise ValueError("a teacher is given exactly when source='teacher'"
                             if teacher is None else
                             f"a teacher was given but source={kind!r}; use source='teacher'")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if float(kappa) != 0.0 and kind != "conditional":
            raise ValueError("guidance_kappa mixes the conditional velocity İ with the network's own "
                             "guided diagonal (MeanFlow); it needs source=conditional")
        if not 0.0 <= float(kappa) < 1.0:
            raise ValueError(f"guidance_kappa must be in [0, 1), got {kappa}")
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo < hi <= 1, got {interval}")
        if (float(guidance) != 1.0 or float(kappa) != 0.0) and null_label is None:
            raise ValueError("guidance needs null_label (the unconditional class label)")
        self.kind = kind
        self.teacher = as_velocity(teacher) if teacher is not None else None
        self.ema_decay, self.guidance = float(ema_decay), float(guidance)
        self.null_label = None if null_label is None else int(null_label)
        self.kappa, self.interval = float(kappa), (lo, hi)
        self.ema_warmup = bool(ema_warmup)
        self.ema = None          # the EMA copy of the model (kind "ema")
        self.ema_step = -1       # the last step the EMA was updated at

    # --- the velocity at (x, t) ------------------------------------------------------------------
    def at(self, model, x: Tensor, t: Tensor, cond: Tensor | None = None, grad: str = "none") -> Tensor:
        """``b_t(x | cond)`` of the source (guided when ``guidance != 1``)."""
        if self.kind == "conditional":
            raise ValueError("the conditional velocity İ is only known at the interpolant I_s")
        if grad == "none":
            with torch.no_grad():
                return self._guided(lambda y, c: self._velocity(model, y, t, c, "none"),
                                    x.detach(), cond)
        return self._guided(lambda y, c: self._velocity(model, y, t, c, grad), x, cond)

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0 or self.kappa != 0.0

    def conditional(self, model, i_s: Tensor, di_s: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        """The conditional source at ``I_s``: ``İ_s``, or under guidance
        ``ω İ_s + (1 − ω − κ) sg v̂_{s,s}(I_s|∅) + κ sg v̂_{s,s}(I_s|c)`` for labelled samples with ``s``
        in the guidance interval (module docstring)."""
        if not self.guided or cond is None:
            return di_s
        null = torch.full_like(cond, self.null_label)
        with torch.no_grad(), dropout_disabled(model):
            x = i_s.detach()
            guided = self.guidance * di_s + (1.0 - self.guidance - self.kappa) * model.velocity(x, s, null)
            if self.kappa:
                guided = guided + self.kappa * model.velocity(x, s, cond)
        lo, hi = self.interval
        use = (cond != self.null_label) & (s >= lo) & (s <= hi)
        return torch.where(use.reshape((-1,) + (1,) * (di_s.ndim - 1)), guided, di_s)

    def _guided(self, velocity, x: Tensor, cond: Tensor | None) -> Tensor:
        if not self.guided or cond is None:
            return velocity(x, cond)
        null = torch.full_like(cond, self.null_label)
        uncond = velocity(x, null)
        return uncond + self.guidance * (velocity(x, cond) - uncond)

    def _velocity(self, model, x: Tensor, t: Tensor, cond: Tensor | None, grad: str) -> Tensor:
        if self.kind == "teacher":
            return call_teacher(self.teacher, x, t, cond)
        if self.kind == "ema":
            return (self.ema if self.ema is not None else model).velocity(x, t, cond)
        if grad == "input":  # the network's own diagonal with its parameters frozen
            params = {name: p.detach() for name, p in model.net.named_parameters()}
            kwargs = {} if cond is None else {"cond": cond}
            return functional_call(model.net, params, (x, t, t), kwargs)
        return model.velocity(x, t, cond)

    # --- the EMA teacher's state -----------------------------------------------------------------
    def begin_step(self, model, step: int) -> None:
        """Source ``"ema"``: update the averaged copy from the current weights, once per step, with the
        trainer's warm-up ``min(decay, (1 + k)/(10 + k))``, or without it (``ema_warmup=False``: the
        constant decay of shortcut models' code from the first update)."""
        if self.kind != "ema" or step <= self.ema_step:
            return
        if self.ema is None:
            self.ema = self._snapshot(model)
        else:
            decay = (min(self.ema_decay, (1.0 + step) / (10.0 + step)) if self.ema_warmup
                     else self.ema_decay)
            with torch.no_grad():
                for p_ema, p in zip(self.ema.parameters(), model.parameters()):
                    p_ema.lerp_(p.detach(), 1.0 - decay)
                for b_ema, b in zip(self.ema.buffers(), model.buffers()):
                    b_ema.copy_(b)
        self.ema_step = int(step)

    @staticmethod
    def _snapshot(model):
        ema = copy.deepcopy(model).eval()
        ema.requires_grad_(False)
        return ema

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        if self.ema is None:
            return {}, {"ema_step": self.ema_step}
        return ({f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                {"ema_step": self.ema_step})

    def load_state_dict(self, model, tensors: dict[str, Tensor], meta: dict) -> None:
        self.ema_step = int(meta.get("ema_step", -1))
        ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        self.ema = None
        if ema_state:
            self.ema = self._snapshot(model)
            self.ema.load_state_dict(ema_state)

    def config(self) -> dict:
        out = {"source": self.kind}
        if self.kind == "ema":
            out["ema_decay"] = self.ema_decay
            if not self.ema_warmup:
                out["ema_warmup"] = False
        if self.guided:
            out["guidance"] = self.guidance
            if self.kind == "conditional":
                out.update(guidance_kappa=self.kappa, guidance_interval=list(self.interval))
        return out


def make_source(kind: str, **options) -> VelocitySource:
    return VelocitySource(kind, **options)
