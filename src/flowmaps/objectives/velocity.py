"""The interpolant (flow-matching) velocity loss; it also trains teachers."""

from __future__ import annotations

from .._tensor import sq_norm
from .base import Objective


class Velocity(Objective):
    """Flow matching on the diagonal (spec §1.3):

        L_b = E_{t, x0, x1} | b̂_t(I_t) − İ_t |²,    t ~ U[0, 1],

    whose unique minimiser is ``b̂ = b``; at the minimiser the loss equals the irreducible variance
    ``E|İ_t − b_t(I_t)|²``, not zero. ``model`` is a :class:`~flowmaps.FlowMap` (trained through its
    diagonal ``v_{t,t}``) or any velocity network ``model(x, t)``.
    """

    name = "velocity"
    default_domain = "diagonal"

    def terms(self, model, x0, x1, s, t, cond):
        it, dit = self.interpolant(x0, x1, t)
        if hasattr(model, "velocity"):
            pred = model.velocity(it, t, cond)
        else:
            pred = model(it, t) if cond is None else model(it, t, cond=cond)
        return {"velocity": sq_norm(pred - dit)}
