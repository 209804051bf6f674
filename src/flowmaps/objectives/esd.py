"""Eulerian self-distillation (ESD), [P2] eq. (14), Algorithm 3."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class ESD(SelfDistillation):
    """Eulerian self-distillation: flow matching on a fraction ``η`` of the batch, and off the diagonal

        r = ∂_s X̂_{s,t}(I_s) + sg( ∇X̂_{s,t}(I_s) v̂_{s,s}(I_s) ),    (s, t) uniform on s < t,

    with ``v̂_{s,s}(I_s)`` the network's own diagonal under stop-gradient and the advective JVP under
    stop-gradient too ([C2] ``esd_term``, ``stopgrad_type="full"``); the gradient flows through the JVP in
    ``s``. Both tangents ride on one primal pass. ``stopgrad="source"`` backpropagates through the
    spatial JVP ([C2] ``"convex"``). [P2] found ESD unstable on images in every stop-gradient choice;
    it is reported on the checkerboard only.

    Defaults ([P2] Table 2): ``η = 0.75``, uniform triangle, learned log-variance weight.
    """

    name = "esd"
    defaults = dict(residual="eulerian", form="map", source="self", stopgrad="target", eta=0.75,
                    weighting="learned")
