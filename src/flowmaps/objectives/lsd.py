"""Lagrangian self-distillation (LSD), [P2] eq. (13), Algorithm 2 — the paper's recommended method."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class LSD(SelfDistillation):
    """Lagrangian self-distillation: flow matching on a fraction ``η`` of the batch, and off the diagonal

        r = ∂_t X̂_{s,t}(I_s) − sg( v̂_{t,t}( sg X̂_{s,t}(I_s) ) ),    (s, t) uniform on s < t,

    the teacher being the network's own diagonal with its current parameters under stop-gradient
    ([C2] ``lsd_term``, ``stopgrad_type="convex"``); the gradient flows through the time-JVP tangent
    ``∂_t X̂`` (reverse-over-forward). ``form="v"`` is the v-form of spec §3.4,
    ``r = v̂_{s,t} − sg(v̂_{t,t}(X̂_{s,t}) − (t − s) ∂_t v̂_{s,t})``: the same residual and fixed point, the
    gradient through the primal only (no backward through the JVP).

    Defaults ([P2] Table 2, Algorithm 1): ``η = 0.75``, uniform triangle, learned log-variance weight
    ``e^{−w_{s,t}} ℓ + w_{s,t}``. Any switch of :class:`SelfDistillation` can be overridden, e.g.
    ``LSD(interpolant, source="teacher", teacher=b, eta=0)`` is LMD.
    """

    name = "lsd"
    defaults = dict(residual="lagrangian", form="map", source="self", stopgrad="target", eta=0.75,
                    weighting="learned")
