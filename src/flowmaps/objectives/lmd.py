"""Lagrangian map distillation (LMD) from a teacher velocity, [P1] as restated in [P2] eq. (26)–(27)."""

from __future__ import annotations

from .._tensor import sq_norm
from .base import Objective, as_velocity, call_teacher, teacher_no_grad


class LMD(Objective):
    """Lagrangian map distillation:

        r = ∂_t X̂_{s,t}(I_s) − sg( b̂_t( sg X̂_{s,t}(I_s) ) ),    loss E_{s,t} w_{s,t} |r|²,

    ``(s, t)`` uniform on the triangle ``s ≤ t`` by default (``times="square"`` also trains the backward
    map: the Lagrangian equation holds in both directions). ``∂_t X̂`` and ``X̂`` come from one
    forward-mode JVP in ``t``; the gradient flows through the JVP tangent only (semigradient, eq. 27).
    ``semigradient=False`` gives eq. (26), which also differentiates through ``b̂`` at the transported
    point; it needs a differentiable teacher and is much worse near narrow modes (spec Appendix B).

    Args:
        teacher: any velocity ``b̂(x, t)`` (a callable, a trained FlowMap, an exact reference).
    """

    name = "lmd"

    def __init__(self, interpolant, teacher, times=None, weight=None, semigradient: bool = True):
        super().__init__(interpolant, times, weight)
        self.teacher = as_velocity(teacher)
        self.semigradient = semigradient

    def terms(self, model, x0, x1, s, t, cond):
        i_s = self.interpolant.interpolate(x0, x1, s)
        x_st, dt_x = model.jvp(i_s, s, t, dt=1.0, cond=cond)
        self.record("jvp_norm", dt_x)
        if self.semigradient:
            target = teacher_no_grad(self.teacher, x_st, t, cond)
        else:
            target = call_teacher(self.teacher, x_st, t, cond)
        return {"lagrangian": sq_norm(dt_x - target)}

    def config(self):
        return dict(super().config(), semigradient=self.semigradient)
