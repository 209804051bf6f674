"""Improved MeanFlow (iMF; Geng et al., arXiv 2512.02012), boundary variant, in our time convention."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .._tensor import expand_as_data, sq_norm
from ..nets.guidance import guidance_condition
from .base import dropout_disabled
from .residuals import eulerian
from .self_distillation import SelfDistillation, _rows


class ImprovedMeanFlow(SelfDistillation):
    """Improved MeanFlow: MeanFlow's Eulerian identity recast as a regression of the *instantaneous*
    velocity on the conditional one, with the JVP's transport velocity taken from the network itself.

    In iMF's own time (``z_τ = (1 − τ) x + τ e``, ``τ = 1`` noise, average velocity ``u(z, r, τ)``, official
    code ``Lyy-iiis/imeanflow`` ``imf.py``)::

        V_θ = u_θ(z, r, τ) + (τ − r) sg( du_θ/dτ ),   du/dτ = ∂_τ u + ∂_z u · v_θ(z, τ)
        L   = ‖V_θ − sg(e − x)‖² / sg(‖·‖² + 0.01)      (sum over dimensions, p = 1)

    where ``v_θ(z, τ)`` is the network's own instantaneous velocity (no gradient). The target no longer
    contains the network, only ``e − x``. In ours (``t = 0`` base, ``v̂_{s,t}(x) = −u(x, 1 − t, 1 − s)``,
    ``İ = x1 − x0``) the same loss is, with ``b̂_s = sg v̂_{s,s}(I_s)``,

        r = v̂_{s,t}(I_s) − sg( İ + (t − s) [∂_s v̂_{s,t}(I_s) + ∇v̂_{s,t}(I_s) b̂_s] ),

    MeanFlow's v-form residual with the JVP transported along ``b̂`` instead of ``İ``: its fixed point is
    the flow map (``E[İ | I_s] = b_s``), and the tangent is the network's velocity, not one noisy sample.
    The network is the *boundary* variant: ``v̂_{s,s}`` is our diagonal (the official code adds an
    auxiliary v-head to its DiT; the paper reports both, the boundary one as the simpler).

    Defaults (``configs/default.py``): half the batch on the diagonal (``η = 0.5``; MeanFlow 0.75), both
    times ``σ(N(0.4, 1))`` in our time (``(−0.4, 1)`` in theirs), sorted, the diagonal samples at the start
    of a pair; adaptive weight ``p = 1``, ``ε = 0.01``.

    Guidance (class labels, ``null_label``): the guided target is
    ``İ_g = İ + (1 − 1/ω)(sg b̂_s(I_s | c) − sg b̂_s(I_s | ∅))`` for labelled samples whose ``s`` lies in the
    guidance interval (``İ`` otherwise; at a fixed point ``b̂(·|c)`` is the guided velocity at scale ``ω``).
    Two ways:

    * ``guidance_max = s_max > 0`` — guidance as a condition (the paper's): per sample ``ω`` is
      log-uniform on ``[1, 1 + s_max]`` (``s_max = 7``), the interval ``[lo, hi]`` has ``lo ~ U[0, ½]``,
      ``hi ~ U[½, 1]`` (``[0, 1]`` on the diagonal), and the network sees ``[label, ω, lo, hi]``
      (:mod:`flowmaps.nets.guidance`; a U-Net with ``guidance_conditioning``). The scale is then chosen at
      sampling time, one evaluation per step: ``flowmaps sample RUN --guidance 1.5``.
    * ``guidance = ω`` (fixed) — one scale baked into the map, the network sees the label only.

    Labels dropped by the trainer (``label_dropout``) are the unconditional samples; the official code
    drops a prefix of the batch that falls among its ``r = t`` rows, here the drop is random.
    """

    name = "imf"
    defaults = dict(residual="eulerian", form="v", source="conditional", stopgrad="target", eta=0.5,
                    sampler="logit_normal", time_mean=0.4, time_std=1.0, diagonal_times="pair",
                    weighting="adaptive", adaptive_p=1.0, adaptive_eps=0.01)

    def __init__(self, interpolant, guidance: float = 1.0, guidance_max: float = 0.0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), null_label: int | None = None,
                 **options):
        for key in ("guidance_kappa", "teacher"):
            if options.get(key) not in (None, 0.0):
                raise ValueError(f"{key} does not apply to improved MeanFlow")
        super().__init__(interpolant, **options)
        if (self.residual, self.form, self.source.kind) != ("eulerian", "v", "conditional"):
            raise ValueError("improved MeanFlow is the v-form Eulerian residual with the conditional "
                             "velocity İ (residual=eulerian, form=v, source=conditional)")
        if float(guidance) < 1.0 or float(guidance_max) < 0.0:
            raise ValueError(f"guidance must be >= 1 and guidance_max >= 0, got {guidance}, "
                             f"{guidance_max}")
        if float(guidance) != 1.0 and float(guidance_max) > 0.0:
            raise ValueError("give either a fixed guidance scale or guidance_max (the sampled scale "
                             "fed to the network), not both")
        lo, hi = (float(v) for v in guidance_interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo < hi <= 1, got {guidance_interval}")
        if (float(guidance) != 1.0 or float(guidance_max) > 0.0) and null_label is None:
            raise ValueError("guidance needs null_label (the unconditional class label)")
        self.scale, self.scale_max = float(guidance), float(guidance_max)
        self.interval, self.null_label = (lo, hi), null_label

    # --- guidance --------------------------------------------------------------------------------
    def _conditions(self, cond: Tensor | None, s: Tensor, n_d: int):
        """``(network condition, tangent condition, unconditional condition, ω_eff)``; ``ω_eff`` is
        ``None`` when no sample is guided."""
        if cond is None or (self.scale == 1.0 and self.scale_max == 0.0):
            return cond, cond, None, None
        null = torch.full_like(cond, self.null_label)
        labelled = cond != self.null_label
        if self.scale_max == 0.0:  # one fixed scale, the network sees the label only
            lo, hi = self.interval
            inside = labelled & (s >= lo) & (s <= hi)
            return cond, cond, null, torch.where(inside, self.scale, 1.0).to(s.dtype)
        g, n = self.generator, s.shape[0]
        draw = lambda: torch.rand(n, generator=g, dtype=s.dtype, device=s.device)  # noqa: E731
        scale = torch.exp(draw() * math.log1p(self.scale_max))
        lo, hi = 0.5 * draw(), 0.5 + 0.5 * draw()
        lo[:n_d], hi[:n_d] = 0.0, 1.0  # the diagonal: the whole interval
        effective = torch.where(labelled & (s >= lo) & (s <= hi), scale, torch.ones_like(scale))
        # valid by construction (ω ≥ 1, 0 ≤ lo < 0.5 ≤ hi ≤ 1): unchecked, no host read
        pack = lambda c, w, a, b: guidance_condition(c, w, a, b, dtype=s.dtype, check=False)  # noqa: E731
        return (pack(cond, scale, lo, hi), pack(cond, effective, 0.0, 1.0), pack(null, 1.0, 0.0, 1.0),
                effective)

    # --- the step --------------------------------------------------------------------------------
    def terms(self, model, x0, x1, s, t, cond):
        n = x1.shape[0]
        n_d = self.times.n_diagonal(n)
        self._n_diag = n_d
        i_s, target = self.interpolant(x0, x1, s)
        net_cond, tangent_cond, uncond, scale = self._conditions(cond, s, n_d)
        guided = scale is not None
        rows = slice(0, n) if guided else slice(n_d, n)  # the tangent is needed off the diagonal only
        with torch.no_grad(), dropout_disabled(model):
            x = i_s.detach()[rows]
            b_c = model.velocity(x, s[rows], _rows(tangent_cond, rows.start, n))
            if guided:
                b_u = model.velocity(x, s, uncond)
                target = target + expand_as_data(1.0 - 1.0 / scale, target) * (b_c - b_u)
        tangent = b_c[n_d:] if guided else b_c
        pieces = {}
        if n_d:
            v = model.velocity(i_s[:n_d], s[:n_d], _rows(net_cond, 0, n_d))
            pieces["diagonal"] = sq_norm(v - target[:n_d])
        if n_d < n:
            warmup = self.tangent.warmup_factor(self.step) if self.tangent is not None else 1.0
            with contextlib.nullcontext() if self.offdiag_dropout else dropout_disabled(model):
                r = eulerian(model, i_s[n_d:], target[n_d:], s[n_d:], t[n_d:], _rows(net_cond, n_d, n),
                             "target", "v", warmup, self.record, tangent=tangent)
            pieces[self.term_name] = sq_norm(r)
        return self.batch_terms(pieces, n_d, n, x1)

    def config(self) -> dict:
        out = super().config()
        if self.scale != 1.0:
            out.update(guidance=self.scale, guidance_interval=list(self.interval))
        if self.scale_max > 0.0:
            out["guidance_max"] = self.scale_max
        return out
