"""sCT: continuous-time consistency training (Lu & Song, arXiv 2410.11081, ICLR 2025), in our time.

Derivation, sources and numerical checks: /work/research/sct.md (§3 maps the paper's loss onto our
v-form Eulerian residual exactly, in value and gradient); decisions: /work/research/spec-sct.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._tensor import expand_as_data, per_sample_norm
from .self_distillation import SelfDistillation
from .times import TimeSampler

__all__ = ["SCT", "ToData", "TARGETS", "SCT_TIME_MEAN", "SCT_TIME_STD"]

TARGETS = ("data", "any")
# The paper's CIFAR-10 sCT times (G.2): τ = log σ_EDM ~ N(P_mean = −1.0, P_std = 1.4), data std 0.5. In
# our time logit(s) = log σ_d − τ (σ_d = σ0 = 0.5), i.e. logit(s) ~ N(log 0.5 + 1.0, 1.4²) (sct.md §3.7).
SCT_TIME_MEAN = math.log(0.5) + 1.0  # 0.3069
SCT_TIME_STD = 1.4
ANY_ETA = 0.5  # target="any": the diagonal fraction (flow matching), measured on gmm (see SCT)


class ToData:
    """Pairs ``(s, 1)``: the start from a time distribution (:class:`TimeSampler` on the diagonal), the end
    at the data. Its domain ``"data"`` is recorded in the trained map (:attr:`FlowMap.domain`), whose
    :meth:`~flowmaps.FlowMap.sample` then refuses jumps that end before ``t = 1``."""

    domain = "data"

    def __init__(self, distribution: str = "logit_normal", mean: float = SCT_TIME_MEAN,
                 std: float = SCT_TIME_STD):
        self.start = TimeSampler("diagonal", distribution, mean, std)

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        s, _ = self.start(n, like, generator)
        return s, torch.ones_like(s)

    def config(self) -> dict:
        return {"domain": "data", "start": self.start.config()}


class SCT(SelfDistillation):
    """sCT, continuous-time consistency training (Lu & Song 2024): the map to the data ``X_{s,1}`` trained
    from data alone, with the paper's tangent normalisation, tangent warm-up and learned per-time weight.

    **The paper** (TrigFlow, ``u = 0`` data, ``u = π/2`` noise; data std ``σ_d``, noise ``z ~ N(0, σ_d²)``):
    ``x_u = cos u x1 + sin u z``, ``f_θ(x, u) = cos u x − sin u σ_d F_θ(x/σ_d, u)``; with
    ``dx_u/du = cos u z − sin u x1`` (the conditional velocity) and ``F⁻`` the network under sg (Alg. 1),

        g = −cos²u (σ_d F⁻ − dx_u/du) − ρ cos u sin u (x_u + σ_d dF⁻/du),   (cos u · Eq. 6, warmed up)
        g ← g / (‖g‖ + c),
        L = e^{w_φ(u)}/D ‖F_θ − F⁻ − g‖² − w_φ(u),

    ``τ = log(σ_d tan u) ~ N(P_mean, P_std²)``, ``ρ = min(1, step/H)``.

    **Ours** (``t = 0`` noise, ``t = 1`` data, ``I_s = (1 − s) x0 + s x1``, ``x0 ~ N(0, σ0²)``, ``σ_d := σ0``,
    ``b = İ = x1 − x0``): the time change ``s = 1/(1 + tan u)``, ``λ = cos u + sin u = 1/√(s² + (1 − s)²)``
    gives ``x_u = λ I_s``, ``f(x_u, u) = X_{s,1}(I_s)`` and ``v_{s,1}(y) = λ[(cos u − sin u) y − σ_d F]``
    (sct.md §3.1–3.2). With ``t ≡ 1``, the v-form Eulerian residual (:func:`~.residuals.eulerian`,
    ``form="v"``, conditional source; ``D v = ∂_s v + ∇v İ``)

        r   = v̂_{s,t}(I_s) − sg(İ + (t − s) D v̂),      cos u · df/du = (s/λ) r,
        r_ρ = (1 − ρ) κ(s) sg(v̂ − İ) + ρ sg(r),         κ(s) = s λ² = s / (s² + (1 − s)²),
        ĝ   = r_ρ / (‖r_ρ‖ + c λ/s),                      (= g/(‖g‖ + c) of the paper)
        ℓ   = ‖(v̂ − sg v̂)/(σ_d λ) + ĝ‖²,                 value ‖ĝ‖², gradient (2/(σ_d λ)) (∂v̂)ᵀ ĝ,
        L   = e^{−w(s, t)} ℓ + w(s, t)                    (:class:`~.weighting.LearnedWeight`),

    equal to the paper's loss in value (up to the constant ``log D``, ``w = log D − w_φ``) and in gradient
    (tests/test_sct.py checks it against the paper's formulas to 1e-10 in float64). Norms are plain L2
    over all dimensions (the paper; FastGen uses RMS). A per-dimension ``σ0`` enters elementwise.

    Defaults and their sources (sct.md §4): ``c = 0.1`` (``tangent_c``; §4.2, G.2, Tables 4–5, FastGen),
    ``H = 10000`` warm-up steps (``tangent_warmup``; §4.2, G.2); the times ``P_mean = −1.0``,
    ``P_std = 1.4`` (CIFAR-10, G.2), i.e. ``logit(s) ~ N(log 0.5 + 1.0 = 0.307, 1.4²)`` (``time_mean``,
    ``time_std``); ``σ_d = 0.5`` = data std = noise std (G.1). These assume data std 0.5 and ``σ0`` equal to
    the data std; for data std ``σ_data`` keep ``σ_EDM/σ_data``: ``time_mean = log(0.5 σ0/σ_data) −
    P_mean`` and scale ``c`` (units of ``x``) by ``σ_data/0.5`` (sct.md §3.5, §3.7; the digits preset
    does, the 2-D presets keep the paper's values, see their comments). No diagonal term (``η = 0``), the
    learned weight on ``(s, t = 1)``, the conditional source; the off-diagonal pass runs without dropout
    (``offdiag_dropout`` for the paper's train-mode JVP). The paper always initialises from a pretrained
    (TrigFlow) diffusion model's EMA (G.2: "We always initialize the CM from the EMA parameters of the
    teacher diffusion model"); here training starts from scratch, which the paper did not test. At
    ``ρ = 0`` the loss regresses ``v̂_{s,1}`` on ``İ`` (the diffusion-initialised state: ``X_{s,1}`` the
    one-step Euler jump), so the warm-up stands in for that initialisation.

    Args (beyond :class:`SelfDistillation`'s, whose switches must keep sCT's residual):
        target: ``"data"`` (default, the paper's sCT): ``t ≡ 1``, only ``X_{s,1}`` is trained, ``η = 0``.
            The map's recorded domain is ``"data"``: one jump ``X_{0,1}`` samples, and a multi-step sample
            needs γ-sampling with ``γ = 1`` (``FlowMap.sample(steps=k, gamma=1)``: jump to the data,
            re-noise to the next grid time; the consistency models' multistep sampler); a deterministic
            k-step composition would use the untrained ``X_{s,t<1}`` and is refused.
            ``"any"``: a generalisation that is **no longer sCT** (sct.md §3.10): ``(s, t)`` a sorted
            logit-normal pair on the triangle (same ``time_mean``/``time_std``), the same residual at
            ``t``, ``κ(s)``, ``c λ/s`` and ``1/(σ_d λ)`` kept as they are (a heuristic: the prior has no
            canonical ``t < 1`` analogue), the learned weight on ``(s, t)``, and a flow-matching diagonal
            term, ``η = 0.5`` by default (on the gmm preset, 2000 steps, one seed: exact-map errors at
            1/2/4 steps 0.51/0.28/0.14 against 0.61/0.37/0.39 with ``η = 0``). Sound as an Eulerian
            fixed point (``D_s X_{s,t} = 0`` for all ``s ≤ t`` with ``X_{t,t} = id`` characterises the
            flow map), and it trains the deterministic k-step composition too.
        tangent_c: ``c``; tangent_warmup: ``H`` (0: no warm-up, ``ρ ≡ 1``).

    Caveat (sct.md §3.10): the per-sample normalisation is nonlinear in the stochastic ``İ``, so
    ``E[ĝ | I_s] ≠ 0`` at the exact map: sCT's fixed point is slightly biased (the raw residual ``r`` is not).
    """

    name = "sct"
    defaults = dict(residual="eulerian", form="v", source="conditional", stopgrad="target", eta=0.0,
                    sampler="logit_normal", time_mean=SCT_TIME_MEAN, time_std=SCT_TIME_STD,
                    weighting="learned", tangent_c=0.1, tangent_warmup=10000)

    def __init__(self, interpolant, target: str = "data", **options):
        if target not in TARGETS:
            raise ValueError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
        self.target = target
        if target == "any":
            options.setdefault("eta", ANY_ETA)
        super().__init__(interpolant, **options)
        self.c, self.warmup = float(self.options["tangent_c"]), int(self.options["tangent_warmup"])

    def _times(self, opts: dict):
        times = SelfDistillation._times(opts)
        if self.target == "data" and opts["sampler"] in ("uniform", "logit_normal"):
            times.pairs = ToData(opts["sampler"], opts["time_mean"], opts["time_std"])
        return times

    def _refuse_nonsense(self, o: dict) -> None:
        fixed = {"residual": "eulerian", "form": "v", "source": "conditional", "stopgrad": "target"}
        for key, value in fixed.items():
            if o[key] != value:
                raise ValueError(f"sct is the v-form Eulerian residual with the conditional velocity "
                                 f"(residual=eulerian, form=v, source=conditional, stopgrad=target); "
                                 f"got {key}={o[key]}")
        super()._refuse_nonsense(o)
        if self.interpolant.name != "linear":
            raise ValueError(f"sct's time change and weights (λ, κ(s), cλ/s) are derived for the linear "
                             f"interpolant, not {self.interpolant.name}")
        if o["weighting"] not in ("learned", "none"):
            raise ValueError(f"sct normalises its tangent itself (tangent_c) under a learned per-time "
                             f"weight; weighting={o['weighting']} would weight it twice (use learned or "
                             "none)")
        if not float(o["tangent_c"]) > 0 or int(o["tangent_warmup"]) < 0:
            raise ValueError(f"sct needs tangent_c > 0 and tangent_warmup >= 0, got "
                             f"{o['tangent_c']}, {o['tangent_warmup']}")
        if o["domain"] != "triangle":
            raise ValueError("sct trains forward jumps s <= t (domain=triangle)")
        if self.target == "data":
            if o["sampler"] not in ("uniform", "logit_normal"):
                raise ValueError(f"target=data draws the start s alone (t = 1): sampler must be "
                                 f"logit_normal or uniform, not {o['sampler']}")
            if self.times.eta > 0 or self.times.annealing:
                raise ValueError("target=data trains X(s,1) alone (sCT: no diagonal term, no gap "
                                 "curriculum); eta > 0 or fm_steps/anneal_steps need target=any")

    def warmup_factor(self) -> float:
        """``ρ = min(1, step/H)`` (``1`` without warm-up)."""
        return 1.0 if self.warmup == 0 else min(1.0, self.step / self.warmup)

    def pieces(self, model, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor, cond: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``(v̂, sg(v̂ − İ), sg r)`` at ``I_s``: the primal (carrying the gradient), its flow-matching
        residual and the v-form Eulerian residual ``r = v̂ − İ − (t − s) D v̂``, from one forward-mode
        JVP of ``(s, x) ↦ v̂_{s,t}(x)`` with tangent ``(1, İ)`` (as :func:`~.residuals.eulerian`)."""
        i_s, di_s = self.interpolant(x0, x1, s)
        b = self.source.conditional(model, i_s, di_s, s, cond)  # İ (guided under guidance)
        v, (dv,) = model.v_jvps(i_s, s, t, [(b.detach(), 1.0, None)], cond=cond, detach=(True,))
        with torch.no_grad():
            flow = v.detach() - b
            residual = flow - expand_as_data(t - s, v) * dv
        self.record("jvp_norm", dv)
        return v, flow, residual

    def _residual(self, model, x0, x1, s, t, cond) -> Tensor:
        v, flow, residual = self.pieces(model, x0, x1, s, t, cond)
        self.record("residual_norm", residual)
        with torch.no_grad():
            inv_lam = torch.sqrt(s * s + (1.0 - s) ** 2)   # 1/λ = 1/(cos u + sin u)
            rho = self.warmup_factor()
            kappa = expand_as_data(s / (inv_lam * inv_lam), v)   # κ(s) = s λ²
            tangent = residual if rho == 1.0 else (1.0 - rho) * kappa * flow + rho * residual
            c_eff = self.c / (s * inv_lam)                  # c λ / s
            g = tangent / expand_as_data(per_sample_norm(tangent) + c_eff, v)
            scale = 1.0 / (self.interpolant.base_scale(v) * expand_as_data(1.0 / inv_lam, v))
        return (v - v.detach()) * scale + g

    def config(self) -> dict:
        return dict(super().config(), target=self.target,
                    tangent={"c": self.c, "warmup": self.warmup})
