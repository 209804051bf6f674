"""Direct flow map matching (FMM) from samples alone, [P1]; reconstructed as spec §3.3 / Q1 recommends."""

from __future__ import annotations

from .._tensor import sq_norm
from .base import Objective, dropout_disabled


class FMM(Objective):
    """FMM direct training ("reconstructed", spec Q1): with ``y = X̂_{t,s}(I_t)``,

        L = E_{(s,t) ~ U([0,1]²)} w_{s,t} [ |∂_t X̂_{s,t}(y) − İ_t|² + λ_inv |X̂_{s,t}(y) − I_t|² ].

    Why it works: for the true map ``X_{s,t}(X_{t,s}(x)) = x``, so the Lagrangian equation gives
    ``∂_t X_{s,t}(X_{t,s}(x)) = b_t(x)``; ``İ_t`` enters linearly and the prediction depends on ``I_t``
    only, so the first term is a regression onto ``E[İ_t | I_t] = b_t`` (its minimum is the irreducible
    variance ``E|İ_t − b_t(I_t)|²``), and the invertibility term (minimum 0) makes the inner map the
    inverse of the outer one. ``∂_t`` is the partial in the map's second time with ``y`` held fixed
    (one forward-mode JVP). Gradients flow through both map calls. ``(s, t)`` covers the full square,
    so the model also learns the backward map. ``invertibility_weight=0`` reproduces [C1].
    """

    name = "fmm"
    default_domain = "square"

    def __init__(self, interpolant, invertibility_weight: float = 1.0, times=None, weight=None):
        if invertibility_weight < 0:
            raise ValueError("invertibility_weight must be >= 0")
        super().__init__(interpolant, times, weight)
        self.invertibility_weight = float(invertibility_weight)

    def terms(self, model, x0, x1, s, t, cond):
        i_t, di_t = self.interpolant(x0, x1, t)
        with dropout_disabled(model):  # both map calls of one residual see one network (spec Q10)
            y = model(i_t, t, s, cond)
            x_back, dt_x = model.jvp(y, s, t, dt=1.0, cond=cond)
        self.record("jvp_norm", dt_x)
        out = {"lagrangian": sq_norm(dt_x - di_t)}
        if self.invertibility_weight:
            out["invertibility"] = self.invertibility_weight * sq_norm(x_back - i_t)
        return out

    def config(self):
        return dict(super().config(), invertibility_weight=self.invertibility_weight)
