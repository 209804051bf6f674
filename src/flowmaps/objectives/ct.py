"""Continuous-time consistency training (CT), [P2] §C.2 eq. (41), spec §3.6."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class CT(SelfDistillation):
    """Continuous-time consistency training: the Eulerian residual with the conditional velocity ``İ_s``
    in place of a teacher, the advective term under stop-gradient,

        r = ∂_s X̂_{s,t}(I_s) + sg( ∇X̂_{s,t}(I_s) İ_s ),    (s, t) uniform on s < t,

    one primal pass carrying the tangents ``(ds = 1)`` and ``(dx = İ_s)``. Only the semigradient is
    unbiased: ``İ_s`` enters linearly, so its expected gradient is the one with ``b_s(I_s)``, which
    vanishes at the flow map (a full gradient would also penalise ``∇X̂ Cov(İ | I_s) ∇X̂ᵀ``).
    ``form="v"`` is MeanFlow's residual (:class:`MeanFlow`).

    Defaults: no diagonal term (``η = 0``, consistency training learns from data pairs alone), no
    weighting; ``eta=0.75`` adds [P2]'s flow-matching term.
    """

    name = "ct"
    defaults = dict(residual="eulerian", form="map", source="conditional", stopgrad="target", eta=0.0,
                    weighting="none")
