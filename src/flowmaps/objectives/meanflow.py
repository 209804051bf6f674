"""MeanFlow (Geng et al., arXiv 2505.13447) in our time convention: consistency training in v-form, [P2] eq. (42)."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class MeanFlow(SelfDistillation):
    """MeanFlow: the Eulerian residual in v-form with the conditional velocity ``İ_s`` as its source,

        r = v̂_{s,t}(I_s) − sg( İ_s + (t − s) [ ∂_s v̂_{s,t}(I_s) + ∇v̂_{s,t}(I_s) İ_s ] ),

    one forward-mode JVP of ``(s, x) ↦ v̂_{s,t}(x)`` with tangent ``(1, İ_s)``, the gradient through the
    primal only. In MeanFlow's own time (``τ = 1`` noise, average velocity ``u(z, r, τ)``),
    ``v̂_{s,t}(x) = −u(x, 1 − t, 1 − s)``; samples with ``r = τ`` are our diagonal, where the residual is
    flow matching. Its expected semigradient vanishes at the exact flow map: ``İ_s`` enters linearly and
    ``E[İ_s | I_s] = b_s(I_s)``.

    Defaults (MeanFlow's ImageNet setting, spec §3.7 / App. C): 75 % of the batch on the diagonal
    (``η = 0.75``); both times logit-normal, ``σ(N(0.4, 1.0))`` in our time (``(−0.4, 1.0)`` in theirs),
    sorted; adaptive weight ``ℓ / sg(ℓ + 10⁻³)^1``. Training-time guidance: ``guidance=w`` with
    ``null_label`` makes the source ``w İ_s + (1 − w) sg(v̂_{s,s}(I_s | ∅))`` for labelled samples.
    """

    name = "meanflow"
    defaults = dict(residual="eulerian", form="v", source="conditional", stopgrad="target", eta=0.75,
                    sampler="logit_normal", time_mean=0.4, time_std=1.0, weighting="adaptive",
                    adaptive_p=1.0, adaptive_eps=1e-3)
