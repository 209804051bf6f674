"""Progressive flow map matching (PFMM), [P1] as restated in [P2] App. B.3 and [C1] (spec §3.5, Q21)."""

from __future__ import annotations

import copy

import torch

from .._tensor import sq_norm
from ..precision import full_fp32
from .base import Objective, as_velocity, call_teacher, dropout_disabled
from .residuals import semigroup_target

FORMS = ("velocity", "map")


class PFMM(Objective):
    """Progressive flow map matching: a student learns two teacher jumps as one, doubling its range.

    Stage ``k`` trains on pairs with ``|t − s| ≤ δ_k = min(1, δ_0 2^k)`` — by default with the jump
    length uniform on ``[0, δ_k]`` (``band="gap"``); ``band="clip"`` is [C1]'s ``t ~ U[0, 1]``,
    ``s = clip(t + U[−δ_k, δ_k])``, sorted, under which long jumps are rare (on the spec §6.3 mixture the
    1-step map error is 0.147 with ``clip`` and 0.071 with ``gap``, same budget) — against the midpoint
    composition of the teacher ``X̌``, ``u = (s + t)/2`` (eq. 30):

        X̌_{u,t}(X̌_{s,u}(I_s)) = I_s + (t − s) · ½ [ v̌_{s,u}(I_s) + v̌_{u,t}(X̌_{s,u}(I_s)) ].

    Stage 0's teacher is one Euler step of the given velocity, ``X̌_{s,t}(x) = x + (t − s) b̂_s(x)``; at the
    start of each later stage (every ``stage_steps`` optimisation steps) the teacher is refreshed to a
    frozen copy of the student. The whole target is under stop-gradient.

    ``form="velocity"`` (default) regresses ``v̂_{s,t}(I_s)`` on the teacher's chord slope above. This is
    the X-space loss ``|X̂_{s,t}(I_s) − X̌_{u,t}(X̌_{s,u}(I_s))|²`` divided by ``(t − s)²``: the same
    minimiser, but short jumps are not down-weighted to nothing and no ``(X − x)/(t − s)`` cancellation
    happens ([P2] drops the same factor in PSD). ``form="map"`` is the X-space loss of eq. (30).

    Stateful: call :meth:`begin_step` before each step (``flowmaps.fit`` does), so the stage and the
    teacher follow the step count.

    Precision: the residual (student and teacher passes) always runs in full fp32, also under bf16
    training (:func:`flowmaps.precision.full_fp32`). After each refresh the teacher *is* the student, so
    the residual is the small defect between one jump and two, and plain bf16 passes (``2^-8`` of ``v``
    each) bury it: at 500 steps on gmm_hard bf16 moved PFMM's gradient by 12% of its norm, 30% of the
    batch-to-batch spread of the fp32 gradient, against at most 3.4% of that spread for the other
    objectives (spec E.12, ``benchmarks/precision.py``).
    """

    name = "pfmm"

    def __init__(self, interpolant, teacher, initial_range: float = 1.0 / 16, stage_steps: int = 500,
                 form: str = "velocity", weight=None, band: str = "gap"):
        if form not in FORMS:
            raise ValueError(f"unknown PFMM form {form!r}; choose one of {FORMS}")
        if band not in BANDS:
            raise ValueError(f"unknown PFMM band {band!r}; choose one of {BANDS}")
        self.band = band
        if not 0.0 < initial_range <= 1.0:
            raise ValueError("initial_range must be in (0, 1]")
        if stage_steps < 1:
            raise ValueError("stage_steps must be >= 1")
        super().__init__(interpolant, "triangle", weight)
        self.teacher = as_velocity(teacher)
        self.initial_range, self.stage_steps, self.form = float(initial_range), int(stage_steps), form
        self.stage = 0
        self.frozen = None  # frozen copy of the student: the teacher from stage 1 on

    @property
    def max_gap(self) -> float:
        """Current range ``δ_k`` of ``|t − s|``."""
        return min(1.0, self.initial_range * 2**self.stage)

    def begin_step(self, model, step: int) -> None:
        stage = step // self.stage_steps
        if stage != self.stage or (stage > 0 and self.frozen is None):
            self.stage = stage
            self.frozen = self.snapshot(model) if stage > 0 else None

    def state_dict(self):
        """The stage and the frozen teacher's weights: a resumed run must continue against the same
        teacher snapshot (taken at the start of the stage), not a copy of the resumed student."""
        tensors = {} if self.frozen is None else {f"frozen.{k}": v for k, v in
                                                  self.frozen.state_dict().items()}
        return tensors, {"stage": self.stage, "frozen": self.frozen is not None}

    def load_state_dict(self, model, tensors, meta):
        self.stage = int(meta["stage"])
        self.frozen = None
        if meta.get("frozen"):
            self.frozen = self.snapshot(model)
            self.frozen.load_state_dict({k[len("frozen."):]: v for k, v in tensors.items()
                                         if k.startswith("frozen.")})

    @staticmethod
    def snapshot(model):
        frozen = copy.deepcopy(model).eval()
        frozen.requires_grad_(False)
        return frozen

    def teacher_slope(self, x, s, t, cond):
        """The teacher's chord slope ``v̌_{s,t}(x)`` (Euler: ``b̂_s(x)``; later: the frozen student)."""
        if self.frozen is None:
            return call_teacher(self.teacher, x, s, cond)
        return self.frozen.v(x, s, t, cond)

    def __call__(self, model, x1, cond=None, generator=None):
        # Band sampling replaces the shared time sampler; the rest is the common step.
        self.times = _BandSampler(self.max_gap, self.band)
        return super().__call__(model, x1, cond, generator)

    def terms(self, model, x0, x1, s, t, cond):
        with full_fp32(x1.device.type):  # see the class docstring: the residual's digits
            return self._terms(model, x0, x1, s, t, cond)

    def _terms(self, model, x0, x1, s, t, cond):
        i_s = self.interpolant.interpolate(x0, x1, s)
        with dropout_disabled(model), torch.no_grad():
            target = semigroup_target(lambda x, a, b: self.teacher_slope(x, a, b, cond), i_s, s, t, 0.5)
        with dropout_disabled(model):
            residual = sq_norm(model.v(i_s, s, t, cond) - target)
        if self.form == "map":
            residual = (t - s) ** 2 * residual
        return {"progressive": residual}

    def config(self):
        return dict(name=self.name, initial_range=self.initial_range, stage_steps=self.stage_steps,
                    form=self.form, band=self.band)


BANDS = ("clip", "gap")


class _BandSampler:
    """Pairs ``s ≤ t`` with ``t − s ≤ δ``.

    ``band="clip"`` ([C1]): ``t ~ U[0,1]``, ``s = clip(t + U[−δ, δ], 0, 1)``, sorted. Long jumps are rare
    under it: at ``δ = 1`` a gap near 1 needs ``t ≈ 1`` and a jitter near −1, so the one-step pair
    ``(0, 1)`` is barely trained. ``band="gap"``: the gap ``t − s ~ U[0, δ]``, then ``s ~ U[0, 1 − gap]``,
    so every jump length up to ``δ`` gets the same weight."""

    def __init__(self, width: float, band: str = "clip"):
        self.width, self.band = width, band

    def __call__(self, n, like, generator=None):
        u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        v = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        if self.band == "gap":
            gap = min(self.width, 1.0) * u
            s = (1.0 - gap) * v
            return s, s + gap
        s = (u + self.width * (2 * v - 1)).clamp(0.0, 1.0)
        return torch.minimum(s, u), torch.maximum(s, u)

    def config(self):
        return {"domain": "band", "width": self.width, "band": self.band}
