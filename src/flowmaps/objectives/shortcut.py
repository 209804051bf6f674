"""Shortcut models (Frans et al., arXiv 2410.12557) as PSD-M on the dyadic grid, [P2] eq. (43)."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class Shortcut(SelfDistillation):
    """Shortcut models: flow matching on the diagonal and, off it, one jump of length ``2d`` against two
    jumps of length ``d`` of the EMA network,

        r = v̂_{s,s+2d}(I_s) − sg( ½ v̂⁻_{s,s+d}(I_s) + ½ v̂⁻_{s+d,s+2d}(X̂⁻_{s,s+d}(I_s)) ),

    ``d = 2^{-k}``, ``k ~ U{1..7}``, ``s`` a multiple of ``d`` with ``s + 2d ≤ 1`` (:class:`DyadicPairs`),
    ``v̂⁻`` the EMA of the parameters (constant decay 0.999 from the first update, as their
    ``target_update_rate``). Our diagonal is ``d = 0`` with ``t ~ U[0, 1]`` (their flow-matching part
    conditions on ``d = 1/128`` and draws ``t`` from the grid ``{0, …, 127}/128``), targets are not
    clipped (theirs at ±4, which assumes unit-scale latents), the levels are drawn uniformly (their code
    gives each level an equal share of the bootstrap batch, the remainder to the full jump), and the loss
    sums over dimensions (theirs averages; a constant factor).

    Defaults (their code, spec App. C): 1/8 of the batch off the diagonal (``η = 7/8``), no weighting.
    """

    name = "shortcut"
    defaults = dict(residual="progressive", source="ema", ema_decay=0.999, ema_warmup=False, eta=0.875,
                    gamma="midpoint", sampler="dyadic", dyadic_levels=7, weighting="none")
