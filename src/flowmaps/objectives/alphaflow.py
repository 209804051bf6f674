"""α-Flow (Zhang et al., arXiv 2510.20771, "AlphaFlow: Understanding and Improving MeanFlow Models"), in
our time convention: the self-distillation step with a curriculum from trajectory flow matching to
MeanFlow (research note: /work/research/alphaflow.md; official code ``snap-research/alphaflow``,
``src/training/loss.py``, ``AlphaFlowLoss``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._tensor import expand_as_data
from .residuals import eulerian
from .self_distillation import SelfDistillation

__all__ = ["AlphaFlow", "alpha_schedule"]


def alpha_schedule(step: int, start: int, end: int, gamma: float = 25.0, clamp: float = 5e-3) -> float:
    """α at optimisation step ``step`` (Alg. 2; the official ``get_ratio`` with ``scheduler: sigmoid``):

        α(k) = 1 − σ(γ (k − k_m) / (k_e − k_s)),  k_m = k_s + (k_e − k_s)/2,

    ``α = 1`` before ``k_s`` and ``0`` after ``k_e``; then ``α < η`` becomes 0 and ``α > 1 − η``
    becomes 1 (``η = clamp``). ``k_s = k_e`` is a step (the official ``scheduler: step``): ``α = 1`` before it, 0
    from it on."""
    if step < start:
        a = 1.0
    elif step > end or (end == start and step >= end):
        a = 0.0
    else:
        x = gamma * (step - (start + (end - start) / 2)) / (end - start)
        sigmoid = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        a = 1.0 - sigmoid
    if a < clamp:
        return 0.0
    if a > 1.0 - clamp:
        return 1.0
    return a


class AlphaFlow(SelfDistillation):
    """α-Flow: one network ``v̂_{s,t}`` trained by a curriculum over the consistency step ratio ``α``:
    trajectory flow matching (``α = 1``), discrete consistency (``0 < α < 1``), MeanFlow (``α = 0``).

    **Paper's convention** (MeanFlow time: ``z_t = (1 − t) x + t ε``, ``t = 1`` noise, ``v = ε − x``,
    average velocity ``u(z, r, t)``, ``z_r = z_t − (t − r) u``, ``r ≤ t``; Def. 1, Alg. 1, the code):

        s_p = α r + (1 − α) t,   z_{s_p} = z_t − (t − s_p) v,
        α > 0:  u_tgt = clip(α v + (1 − α) u_θ⁻(z_{s_p}, r, s_p), ±4),
        α = 0:  u_tgt = v − (t − r) d/dt u_θ⁻(z_t, r, t)   (JVP, tangent (v, 0, 1): MeanFlow),
        r = t:  u_tgt = v;     ℓ = mean_elem (u_θ(z_t, r, t) − u_tgt)²,
        loss = mean_i w_i ℓ_i,   w_i = (α if r < t and α > 0 else 1) / (sg ℓ_i + c).

    **Ours** (``t = 0`` noise, ``t = 1`` data, ``I_s = (1 − s) x0 + s x1``, ``İ = x1 − x0``;
    ``v̂_{s,t}(x) = −u(x, 1 − t, 1 − s)``: the paper's ``(t, r)`` is our ``(1 − s, 1 − t)``, its noisier
    time our start ``s``, its intermediate ``s_p`` our ``m = s + α (t − s)``):

        s = t:         r = v̂_{s,s}(I_s) − Ĩ,                                         w = 1/(sg mse + c)
        α > 0, s < t:  x_m = I_s + α (t − s) Ĩ,
                       r = v̂_{s,t}(I_s) − sg clip(α Ĩ + (1 − α) v̂_{m,t}(x_m), ±4),  w = α/(sg mse + c)
        α = 0, s < t:  r = v̂_{s,t}(I_s) − sg(Ĩ + (t − s)[∂_s v̂ + ∇v̂ Ĩ])  (MeanFlow), w = 1/(sg mse + c)

    with ``Ĩ = İ`` (or the guided mix below), ``v̂`` the current weights under no_grad (no EMA: their
    Table 5a) and ``mse = |r|²/D`` the per-element mean of the official reduction: the loss
    ``w · mse`` is ``α |r|² / (sg |r|² + c D)`` on our summed squares. For ``α > 0``,
    ``r = [X̂_{s,t}(I_s) − X̂_{m,t}(x_m)] / (t − s)``: the Eulerian residual discretised by a step
    ``α (t − s)`` along ``Ĩ`` (logged as ``eulerian``); as ``α → 0`` its ``α⁻¹``-scaled gradient tends
    to MeanFlow's (Thm 1). At ``α = 1`` the target is ``Ĩ`` (no network pass), whose minimiser is
    ``v̂_{s,t} = b_s``, not the flow map: only the ``α = 0`` phase has the flow map as its fixed point.

    The curriculum (:func:`alpha_schedule`) over ``alpha_steps = (k_s, k_e)``, steepness ``alpha_gamma``
    (γ), clamp ``alpha_clamp`` (η); the step is the trainer's count (:meth:`begin_step`) and travels with
    the checkpoint, with the window. ``k_e = None`` is the run's length, told by the trainer
    (:meth:`plan`, from :func:`~flowmaps.fit`'s ``steps`` or ``Trainer(total_steps=…)``); the CLI passes
    ``objective.alpha_end``, else ``train.steps``. Without an end the first step raises. A resumed run
    keeps the window it was saved with: raising ``train.steps`` on resume lengthens the ``α = 0`` phase,
    it does not stretch the curriculum.

    Defaults (official code and configs; research note §2–§4, §6): ``γ = 25``, ``η = 5·10⁻³``,
    ``k_s = 0``, ``k_e`` = the run's length (``alphaflow-sigmoid-latentspace-B-2``: 0 → 400K of 400K);
    the ``±4`` clip of the ``α > 0`` targets (``clamp_utgt``, for unit-scale latents;
    ``target_clamp=None`` turns it off); the adaptive weight, ``c = 10⁻³``, ``p = 1``, factor ``α``
    (``weighting="none"`` weights the ``α > 0`` off-diagonal rows by ``α⁻¹`` instead: Def. 1 literally);
    both times ``σ(N(0.4, 1.0))`` in our time (``LN(−0.4, 1)`` in theirs), sorted, the diagonal times a
    single such draw (not MeanFlow's pair start); ``η = 0.5`` of the batch on the diagonal, the first
    rows (``ratio_fm`` of their no-CFG B/2 config; their CFG B/2 run uses 0.25); the off-diagonal passes
    with dropout as configured, on by default (their loss runs the network in train mode).

    Guidance (``guidance=ω``, ``guidance_kappa=κ``, ``guidance_interval``, ``null_label``): the
    conditional source's MeanFlow mix ``Ĩ = ω İ + (1 − ω − κ) sg v̂_{s,s}(I_s|∅) + κ sg v̂_{s,s}(I_s|c)``
    on every row, the diagonal included, as their ``_compute_velocity_cfg``; it is the step direction
    of ``x_m`` and the JVP tangent. Their CFG B/2 run: ``ω = 1, κ = 0.5``. Label dropout is the
    trainer's (a dropped label gives ``İ``), not their in-window dropout.
    """

    name = "alphaflow"
    defaults = dict(residual="eulerian", form="v", source="conditional", stopgrad="target", eta=0.5,
                    sampler="logit_normal", time_mean=0.4, time_std=1.0, diagonal_times="own",
                    weighting="adaptive", adaptive_p=1.0, adaptive_eps=1e-3, offdiag_dropout=True)

    def __init__(self, interpolant, alpha_steps: tuple[int, int | None] | None = None,
                 alpha_gamma: float = 25.0, alpha_clamp: float = 5e-3,
                 target_clamp: float | None = 4.0, **options):
        start, end = (0, None) if alpha_steps is None else _window(alpha_steps)
        if not (isinstance(alpha_gamma, (int, float)) and alpha_gamma > 0):
            raise ValueError(f"alpha_gamma (the curriculum's steepness γ) must be > 0, got "
                             f"{alpha_gamma}")
        if not 0.0 <= float(alpha_clamp) < 0.5:
            raise ValueError(f"alpha_clamp (η of the curriculum) must be in [0, 0.5), got {alpha_clamp}")
        if target_clamp is not None and not float(target_clamp) > 0:
            raise ValueError(f"target_clamp must be > 0 (or None for no clip), got {target_clamp}")
        self.alpha_start, self.alpha_end = start, end
        self.alpha_gamma, self.alpha_clamp = float(alpha_gamma), float(alpha_clamp)
        self.target_clamp = None if target_clamp is None else float(target_clamp)
        super().__init__(interpolant, **options)
        self._alpha, self._dim = 1.0, 1

    def _refuse_nonsense(self, o: dict) -> None:
        if o["source"] != "conditional":
            raise ValueError(f"α-Flow's targets step along the conditional velocity İ (source="
                             f"conditional); source={o['source']} does not apply")
        if o["residual"] != "eulerian" or o["form"] != "v" or o["stopgrad"] != "target":
            raise ValueError("α-Flow has one residual: v̂ against its whole target under stop-gradient "
                             "(residual=eulerian, form=v, stopgrad=target)")
        if o["weighting"] not in ("adaptive", "none"):
            raise ValueError(f"α-Flow's weighting is adaptive (α/(sg mse + c), its code) or none (α⁻¹ "
                             f"off the diagonal, its Def. 1), not {o['weighting']}")
        if o["weighting"] == "adaptive" and float(o["adaptive_p"]) != 1.0:
            raise ValueError(f"α-Flow's adaptive weight has p = 1, got adaptive_p={o['adaptive_p']}")
        if o["fm_steps"] or o["anneal_steps"]:
            raise ValueError("α-Flow has its own curriculum (alpha_steps); gap annealing "
                             "(fm_steps/anneal_steps) does not combine with it")
        super()._refuse_nonsense(o)

    # --- the curriculum --------------------------------------------------------------------------
    def plan(self, total_steps: int) -> None:
        """The run's length: the curriculum's end when ``alpha_steps`` left it open."""
        if self.alpha_end is None or getattr(self, "_planned", False):
            if int(total_steps) < self.alpha_start:
                raise ValueError(f"alpha_steps: the curriculum starts at step {self.alpha_start}, after "
                                 f"the run's end ({total_steps} steps)")
            self.alpha_end, self._planned = int(total_steps), True

    def window(self) -> tuple[int, int]:
        """``(k_s, k_e)`` of the curriculum."""
        if self.alpha_end is None:
            raise ValueError("AlphaFlow: the α curriculum needs its end step: pass alpha_steps=(k_s, "
                             "k_e) or train with fit(steps=...) / Trainer(total_steps=...)")
        return self.alpha_start, self.alpha_end

    def alpha_at(self, step: int) -> float:
        return alpha_schedule(step, *self.window(), gamma=self.alpha_gamma, clamp=self.alpha_clamp)

    @property
    def alpha(self) -> float:
        """α at the current step."""
        return self.alpha_at(self.step)

    def begin_step(self, model, step: int) -> None:
        super().begin_step(model, step)
        self.window()  # a missing end fails here, at the first step

    def state_dict(self):
        tensors, meta = super().state_dict()
        if self.alpha_end is not None:
            meta["alpha_steps"] = [self.alpha_start, self.alpha_end]
        return tensors, meta

    def load_state_dict(self, model, tensors, meta):
        if "alpha_steps" in meta:  # the window the run started with (see the class docstring)
            self.alpha_start, self.alpha_end = (int(k) for k in meta["alpha_steps"])
            self._planned = False
        super().load_state_dict(model, tensors, meta)

    # --- the step --------------------------------------------------------------------------------
    def terms(self, model, x0, x1, s, t, cond):
        self._alpha, self._dim = self.alpha, x1[0].numel()
        if not hasattr(self, "_stats"):
            self._stats = {}
        self._stats["alpha"] = x1.new_full((), self._alpha)  # no copy from the host
        return super().terms(model, x0, x1, s, t, cond)

    def _residual(self, model, x0, x1, s, t, cond) -> Tensor:
        a = self._alpha
        i_s, di_s = self.interpolant(x0, x1, s)
        direction = self.source.conditional(model, i_s, di_s, s, cond)  # Ĩ, under no_grad
        if a == 0.0:
            return eulerian(model, i_s, direction, s, t, cond, "target", "v", 1.0, self.record)
        with torch.no_grad():
            target = direction.detach()
            if a != 1.0:
                x_m = i_s.detach() + a * expand_as_data(t - s, i_s) * target
                target = a * target + (1.0 - a) * model.v(x_m, s + a * (t - s), t, cond)
            if self.target_clamp is not None:
                target = target.clamp(-self.target_clamp, self.target_clamp)
        return model.v(i_s, s, t, cond) - target

    def combine(self, terms, s, t):
        per_sample = sum(terms.values())
        a, n_d = self._alpha, self._n_diag
        factor = torch.ones_like(per_sample)
        if a > 0.0:
            factor[n_d:] = a if self.weighting == "adaptive" else 1.0 / a
        if self.weighting == "adaptive":
            per_sample = per_sample / (per_sample.detach() + self.adaptive.eps * self._dim)
        per_sample = factor * per_sample
        return per_sample if self.weight is None else self.weight(s, t) * per_sample

    def config(self) -> dict:
        out = super().config()
        out["alpha"] = {"steps": [self.alpha_start, self.alpha_end], "gamma": self.alpha_gamma,
                        "clamp": self.alpha_clamp, "target_clamp": self.target_clamp}
        if self.weighting == "none":
            out["weighting"] = {"name": "none"}
        return out


def _window(steps) -> tuple[int, int | None]:
    try:
        start, end = steps
    except (TypeError, ValueError):
        raise ValueError(f"alpha_steps must be a pair (k_s, k_e), got {steps!r}") from None
    ok = isinstance(start, int) and not isinstance(start, bool) and start >= 0 and (
        end is None or isinstance(end, int) and not isinstance(end, bool) and end >= start)
    if not ok:
        raise ValueError(f"alpha_steps: need integers 0 <= k_s <= k_e (k_e None: the run's length), "
                         f"got {tuple(steps)!r}")
    return start, end
