"""Eulerian map distillation (EMD) from a teacher velocity, [P1] as restated in [P2] eq. (28)–(29), (39)."""

from __future__ import annotations

import torch

from .._tensor import expand_as_data, sq_norm
from .base import Objective, as_velocity, teacher_no_grad

FORMS = ("semigradient", "full", "v")


class EMD(Objective):
    """Eulerian map distillation. With ``b = b̂_s(I_s)`` and ``(s, t)`` on the triangle by default:

    * ``form="semigradient"`` (default, eq. 29):
      ``r = ∂_s X̂_{s,t}(I_s) + sg( ∇X̂_{s,t}(I_s) b )``; gradient through the JVP in ``s`` only. With a
      :class:`~flowmaps.FlowMap` both tangents ride on one primal pass (:meth:`~flowmaps.FlowMap.jvps`).
    * ``form="full"`` (eq. 28): ``r = ∂_s X̂_{s,t}(I_s) + ∇X̂_{s,t}(I_s) b``, one augmented JVP with tangent
      ``(ds, dx) = (1, b)``; convex in ``X̂`` but backpropagates through the spatial Jacobian.
    * ``form="v"`` (eq. 39, = continuous-time consistency distillation / AYF-EMD):
      ``r = v̂_{s,t}(I_s) − sg( b + (t − s) [∂_s v̂_{s,t} + ∇v̂_{s,t} b](I_s) )``; one augmented JVP whose
      tangent is stop-gradiented, so the gradient flows through the primal ``v̂`` only (no
      reverse-over-forward). Its residual is ``−R/(t − s)`` scaled; the fixed point is the same.

    The Eulerian equation ``∂_s X_{s,t} + ∇X_{s,t} b_s = 0`` holds in both directions, so
    ``times="square"`` is allowed.
    """

    name = "emd"

    def __init__(self, interpolant, teacher, times=None, weight=None, form: str = "semigradient"):
        if form not in FORMS:
            raise ValueError(f"unknown EMD form {form!r}; choose one of {FORMS}")
        super().__init__(interpolant, times, weight)
        self.teacher = as_velocity(teacher)
        self.form = form

    def terms(self, model, x0, x1, s, t, cond):
        i_s = self.interpolant.interpolate(x0, x1, s)
        b = teacher_no_grad(self.teacher, i_s, s, cond)
        if self.form == "semigradient":
            if hasattr(model, "jvps"):
                # One primal pass carrying both tangents; the spatial one under stop-gradient.
                _, (ds_x, advection) = model.jvps(i_s, s, t, [(None, 1.0, None), (b, None, None)],
                                                  cond=cond, detach=(False, True))
            else:
                with torch.no_grad():
                    _, advection = model.jvp(i_s, s, t, dx=b, cond=cond)
                _, ds_x = model.jvp(i_s, s, t, ds=1.0, cond=cond)
            self.record("jvp_norm", ds_x)
            residual = ds_x + advection
        elif self.form == "full":
            _, residual = model.jvp(i_s, s, t, dx=b, ds=1.0, cond=cond)
            self.record("jvp_norm", residual)
        else:
            if hasattr(model, "v_jvps"):
                # The tangent only enters under sg: compute it without a graph (same values).
                v, (dv,) = model.v_jvps(i_s, s, t, [(b, 1.0, None)], cond=cond, detach=(True,))
            else:
                v, dv = model.v_jvp(i_s, s, t, dx=b, ds=1.0, cond=cond)
            self.record("jvp_norm", dv)
            residual = v - (b + expand_as_data(t - s, v) * dv).detach()
        return {"eulerian": sq_norm(residual)}

    def config(self):
        return dict(super().config(), form=self.form)
