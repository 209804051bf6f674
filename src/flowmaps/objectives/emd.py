"""Eulerian map distillation (EMD) from a teacher velocity, [P1] as restated in [P2] eq. (28)–(29), (39)."""

from __future__ import annotations

from .self_distillation import SelfDistillation

FORMS = {"semigradient": ("map", "target"), "full": ("map", "source"), "v": ("v", "target")}


class EMD(SelfDistillation):
    """Eulerian map distillation: the self-distillation step with an external teacher and no diagonal
    term. With ``b = b̂_s(I_s)`` and ``(s, t)`` on the triangle by default:

    * ``form="semigradient"`` (default, eq. 29):
      ``r = ∂_s X̂_{s,t}(I_s) + sg( ∇X̂_{s,t}(I_s) b )``; gradient through the JVP in ``s`` only. With a
      :class:`~flowmaps.FlowMap` both tangents ride on one primal pass (:meth:`~flowmaps.FlowMap.jvps`).
    * ``form="full"`` (eq. 28): ``r = ∂_s X̂_{s,t}(I_s) + ∇X̂_{s,t}(I_s) b``, one augmented JVP with tangent
      ``(ds, dx) = (1, b)``; convex in ``X̂`` but backpropagates through the spatial Jacobian.
    * ``form="v"`` (eq. 39, = continuous-time consistency distillation / AYF-EMD):
      ``r = v̂_{s,t}(I_s) − sg( b + (t − s) [∂_s v̂_{s,t} + ∇v̂_{s,t} b](I_s) )``; one augmented JVP whose
      tangent is stop-gradiented, so the gradient flows through the primal ``v̂`` only (no
      reverse-over-forward). Its residual is ``−R``, minus the map-form residual ``R`` (same size, same
      fixed point); its gradient is ``R``'s semigradient divided by ``(t − s)``.

    The Eulerian equation ``∂_s X_{s,t} + ∇X_{s,t} b_s = 0`` holds in both directions, so
    ``times="square"`` is allowed. Other switches of :class:`~flowmaps.objectives.SelfDistillation` apply.
    """

    name = "emd"
    defaults = dict(residual="eulerian", source="teacher", eta=0.0)

    def __init__(self, interpolant, teacher, times=None, weight=None, form: str = "semigradient",
                 **options):
        if form not in FORMS:
            raise ValueError(f"unknown EMD form {form!r}; choose one of {tuple(FORMS)}")
        network_form, stopgrad = FORMS[form]
        super().__init__(interpolant, teacher=teacher, times=times, weight=weight, form=network_form,
                         stopgrad=stopgrad, **options)
        self.emd_form = form

    def config(self):
        return dict(super().config(), emd_form=self.emd_form)
