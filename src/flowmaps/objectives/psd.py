"""Progressive self-distillation (PSD-U, PSD-M), [P2] eq. (15), (22), Algorithm 4."""

from __future__ import annotations

from .self_distillation import SelfDistillation


class PSD(SelfDistillation):
    """Progressive self-distillation: flow matching on a fraction ``η`` of the batch, and off the diagonal
    the semigroup residual in its preconditioned v-form (eq. 22/92)

        u = γ s + (1 − γ) t,
        r = v̂_{s,t}(I_s) − sg( (1 − γ) v̂_{s,u}(I_s) + γ v̂_{u,t}(X̂_{s,u}(I_s)) ),

    both teacher hops with the current parameters under stop-gradient; no derivatives, three forward
    passes. ``gamma="uniform"`` (``γ ~ U[0, 1]``, PSD-U, default) or ``"midpoint"`` (``γ = ½``, PSD-M).

    Defaults ([P2] Table 2): ``η = 0.75``, uniform triangle, learned log-variance weight.
    """

    name = "psd"
    defaults = dict(residual="progressive", source="self", eta=0.75, gamma="uniform",
                    weighting="learned")
