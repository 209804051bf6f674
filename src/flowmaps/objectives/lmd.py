"""Lagrangian map distillation (LMD) from a teacher velocity, [P1] as restated in [P2] eq. (26)–(27)."""

from __future__ import annotations

from typing import Callable

from .self_distillation import SelfDistillation


class LMD(SelfDistillation):
    """Lagrangian map distillation: the self-distillation step with an external teacher and no
    diagonal term (``source="teacher"``, ``η = 0``):

        r = ∂_t X̂_{s,t}(I_s) − sg( b̂_t( sg X̂_{s,t}(I_s) ) ),    loss E_{s,t} w_{s,t} |r|²,

    ``(s, t)`` uniform on the triangle ``s ≤ t`` by default (``times="square"`` also trains the backward
    map: the Lagrangian equation holds in both directions). ``∂_t X̂`` and ``X̂`` come from one
    forward-mode JVP in ``t``; the gradient flows through the JVP tangent only (semigradient, eq. 27).
    ``semigradient=False`` gives eq. (26), which also differentiates through ``b̂`` at the transported
    point; it needs a differentiable teacher and is much worse near narrow modes (spec Appendix B).
    ``form="v"`` is the v-form of spec §3.4: the same residual, the gradient through the primal only. Its
    step costs 1.63× a velocity step against 2.31× (``benchmarks/training_cost.py``), but its maps are
    worse: on gmm_hard (``benchmarks/quality_per_budget.py``, 4000 × 512, seeds 0–2) the 1-step error
    was 0.148 against 0.079 at equal steps, and 0.148 at about equal CPU time (5700 steps, 80 s against
    86 s), so the default stays the semigradient form.
    Any other switch of :class:`~flowmaps.objectives.SelfDistillation` applies (``eta``, ``sampler``…).

    The loss is weighted by the learned log-variance head ``e^{−w_{s,t}} |r|² + w_{s,t}`` by default
    (``weighting="learned"``, spec §3.1): on ``benchmarks/quality_per_budget.py`` it lowered the 1-step
    error of gmm_hard by 17% and the checkerboard's 1-step KL by 14% against the plain mean at 2000 steps.
    ``weighting="none"`` gives the plain mean; a ``weight`` function replaces it.

    Args:
        teacher: any velocity ``b̂(x, t)`` (a callable, a trained FlowMap, an exact reference).
    """

    name = "lmd"
    defaults = dict(residual="lagrangian", source="teacher", eta=0.0)

    def __init__(self, interpolant, teacher: Callable, times=None, weight=None, semigradient: bool = True,
                 **options):
        options.setdefault("stopgrad", "target" if semigradient else "source")
        options.setdefault("weighting", "learned" if weight is None else "none")
        super().__init__(interpolant, teacher=teacher, times=times, weight=weight, **options)

    @property
    def semigradient(self) -> bool:
        return self.stopgrad == "target"
