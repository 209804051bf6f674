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

    Defaults (MeanFlow's ImageNet code, ``Gsunshine/meanflow`` ``configs/default.py``; spec §3.7 /
    App. C): 75 % of the batch on the diagonal (``η = 0.75``); both times logit-normal, ``σ(N(0.4, 1.0))``
    in our time (``(−0.4, 1.0)`` in theirs), sorted, and the diagonal samples take the start of such a
    pair (``sample_tr``: their ``r = t`` samples keep the noisier of two draws); adaptive weight
    ``ℓ / sg(ℓ + 0.01)^1`` (the paper's text says ``ε = 10⁻³``, the CIFAR code uses ``p = 0.75``,
    ``ε = 10⁻³``); the off-diagonal JVP pass runs with dropout on, as their train-mode JVP does.

    Training-time guidance (``guidance=ω``, ``guidance_kappa=κ``, ``null_label``): every sample, the
    diagonal included, regresses on ``ω İ + (1 − ω − κ) sg v̂_{s,s}(I_s|∅) + κ sg v̂_{s,s}(I_s|c)`` (labelled
    samples with ``s`` in ``guidance_interval``; else ``İ``), which is also the JVP's tangent. Their
    ImageNet setting is ``ω = 1, κ = 0.5`` (effective scale ``ω / (1 − κ) = 2``).
    """

    name = "meanflow"
    defaults = dict(residual="eulerian", form="v", source="conditional", stopgrad="target", eta=0.75,
                    sampler="logit_normal", time_mean=0.4, time_std=1.0, diagonal_times="pair",
                    weighting="adaptive", adaptive_p=1.0, adaptive_eps=0.01, offdiag_dropout=True)
