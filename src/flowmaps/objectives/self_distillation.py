"""The self-distillation step: flow matching on the diagonal, one residual off it (spec §3.4, §3.6,
App. C "one view of all of them").

One network ``v̂_{s,t}`` learns the velocity on its diagonal, ``v̂_{t,t} = b_t``, by flow matching on a
fraction ``η`` of the batch, and the map off the diagonal from a residual against a velocity source:

    L = (1/B) [ Σ_{diag} λ(|v̂_{t,t}(I_t) − İ_t|²) + Σ_{off} λ(|r_{s,t}|²) ],   (spec Q7, Q8)

with ``λ`` the weighting. The switches (:class:`SelfDistillation`) — residual, form, velocity source,
stop-gradient scope, weighting, time sampler — span [P2]'s LSD/ESD/PSD, MeanFlow, shortcut models,
consistency training and AYF, and, with an external teacher and ``η = 0``, the map distillations LMD and
EMD of [P1]: the named objectives are these switches with their papers' defaults.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._tensor import expand_as_data, sq_norm
from ..interpolants import Interpolant
from .base import _DROPOUT, Objective, dropout_disabled
from .residuals import FORMS, STOPGRADS, eulerian, lagrangian, progressive
from .sources import SOURCES, VelocitySource
from .times import DyadicPairs, PairStart, SelfDistillationTimes, TimeSampler, as_time_sampler
from .weighting import WEIGHTINGS, AdaptiveWeight, LearnedWeight, TangentNormalization

__all__ = ["SelfDistillation", "RESIDUALS", "SAMPLERS", "GAMMAS", "DIAGONALS"]

RESIDUALS = ("lagrangian", "eulerian", "progressive")
SAMPLERS = ("uniform", "gap", "logit_normal", "dyadic")
DIAGONALS = ("conditional", "teacher")
DIAGONAL_TIMES = ("own", "pair")
GAMMAS = ("uniform", "midpoint")
TERM_NAMES = {"lagrangian": "lagrangian", "eulerian": "eulerian", "progressive": "progressive"}


class SelfDistillation(Objective):
    """One flow map from its own diagonal (or a teacher): the configurable self-distillation step.

    The switches are keyword arguments (an unknown one is a :class:`TypeError`); each subclass
    (:class:`~flowmaps.objectives.LSD`, :class:`~flowmaps.objectives.MeanFlow`…) sets its paper's
    defaults, which the caller's keywords override. The defaults below are this class's.

    Args:
        interpolant: ``I_t = α_t x0 + β_t x1``.

    Keyword Args:
        residual (str): ``"lagrangian"`` (default) | ``"eulerian"`` | ``"progressive"`` (see
            :mod:`flowmaps.objectives.residuals`).
        form (str): ``"map"`` (default; gradient through the map's JVP tangent) or ``"v"`` (gradient
            through the primal ``v̂`` only, the whole target under sg); progressive residuals are always
            v-form.
        source (str): ``"self"`` (default; own diagonal, current parameters under sg), ``"ema"`` (own
            diagonal of an EMA of the parameters, decay ``ema_decay``), ``"teacher"``
            (``teacher(x, t[, cond])``) or ``"conditional"`` (``İ_s``; Eulerian only).
        teacher (Callable | None): the teacher velocity of ``source="teacher"``.
        ema_decay (float): decay of the ``"ema"`` source (default 0.999).
        stopgrad (str): ``"target"`` (default; the teacher term under sg: the papers' semigradients),
            ``"source"`` (only the source's parameters frozen) or ``"none"`` (nothing, own diagonal only).
        eta (float): diagonal fraction of the batch, ``0 ≤ η < 1`` (default 0.75).
        diagonal (str): the diagonal term's target: ``"conditional"`` (default; flow matching,
            ``|v̂_{t,t}(I_t) − İ_t|²``) or ``"teacher"`` (``|v̂_{t,t}(I_t) − sg b̂_t(I_t)|²``, the teacher's
            velocity at the same point: the same minimiser without the conditional noise; ``source``
            ``"teacher"`` only).
        sampler (str): off-diagonal pairs ``"uniform"`` (default; on ``domain``), ``"gap"`` (every jump
            length equally likely, :class:`TimeSampler`), ``"logit_normal"`` (``time_mean``, ``time_std``,
            both times, sorted on the triangle; the diagonal times too) or ``"dyadic"`` (shortcut grid,
            ``dyadic_levels``).
        time_mean (float): mean of the ``"logit_normal"`` normal (default 0).
        time_std (float): its standard deviation (default 1).
        dyadic_levels (int): levels of the ``"dyadic"`` grid (default 7: jumps ``1 … 1/64``).
        times (SelfDistillationTimes | TimeSampler | str | None): the batch's times in place of
            ``sampler`` and ``domain``: a :class:`SelfDistillationTimes` (with its own ``η``), or a pair
            sampler or domain name (with ``eta``).
        domain (str): ``"triangle"`` (default; forward maps, [P2]) or ``"square"`` (both directions).
        fm_steps (int): gap-annealing curriculum ([P2] F.2; off by default): steps of flow matching alone
            (:class:`SelfDistillationTimes`).
        anneal_steps (int): then steps over which the longest jump grows to 1.
        gamma (str): the progressive residual's intermediate time ``u = γ s + (1 − γ) t``: ``"uniform"``
            (default; PSD-U) or ``"midpoint"`` (PSD-M, shortcut).
        weighting (str): ``"none"`` (default), ``"learned"`` (log-variance head ``e^{−w} ℓ + w``, of
            ``weight_channels`` features), ``"adaptive"`` (``ℓ / sg(ℓ + adaptive_eps)^adaptive_p``) or
            ``"tangent"`` (``ℓ / sg(√ℓ + tangent_c)`` off the diagonal with a warm-up of
            ``tangent_warmup`` steps; v-forms only).
        weight (Callable | None): ``w(s, t) -> (B,)`` multiplying each sample's loss
            (:class:`~flowmaps.objectives.Objective`).
        diagonal_times (str): ``"own"`` (default; the diagonal times from the sampler's own distribution on
            the diagonal) or ``"pair"`` (each diagonal sample takes the start ``s`` of a pair drawn like the
            off-diagonal ones, then ``t = s``: MeanFlow's ``sample_tr``, whose ``r = t`` samples keep the
            noisier of two draws).
        ema_warmup (bool): warm the EMA source's decay up as ``min(decay, (1 + k)/(10 + k))`` (default; the
            trainer's EMA), or use the constant decay from the first update (``False``; shortcut models'
            code).
        offdiag_dropout (bool): run the off-diagonal residual with the network's dropout on (MeanFlow's JVP
            pass runs in train mode); default off, as in [P2] (spec Q10).
        guidance (float): classifier-free guidance of the source at scale ``w`` (default 1: none; class
            labels). With the conditional source (MeanFlow) the guided target applies to every sample,
            the diagonal included (MeanFlow's loss); with the self, EMA or teacher sources the diagonal
            stays conditional flow matching on ``İ_t`` ([P2] §3: only the distillation term is guided).
        null_label (int | None): the unconditional label of guidance.
        guidance_kappa (float): MeanFlow's κ (conditional source; see :mod:`flowmaps.objectives.sources`).
        guidance_interval (tuple[float, float]): MeanFlow's guidance interval (default ``(0, 1)``).
        points (TeacherPaths | None): draw the points at time ``s`` on a teacher's paths instead of the
            data (:meth:`use_points`).
    """

    name = "self_distillation"
    defaults: dict = {}

    def __init__(self, interpolant: Interpolant, **options):
        opts = dict(residual="lagrangian", form="map", source="self", teacher=None, stopgrad="target",
                    eta=0.75, diagonal="conditional", sampler="uniform", domain="triangle",
                    time_mean=0.0, time_std=1.0, dyadic_levels=7, fm_steps=0, anneal_steps=0,
                    gamma="uniform", ema_decay=0.999, weighting="none", adaptive_p=1.0,
                    adaptive_eps=1e-3, tangent_c=0.1, tangent_warmup=0, weight_channels=128,
                    guidance=1.0, null_label=None, guidance_kappa=0.0, guidance_interval=(0.0, 1.0),
                    diagonal_times="own", offdiag_dropout=False, ema_warmup=True, times=None,
                    weight=None, points=None)
        unknown = set(options) - set(opts)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for {type(self).__name__}")
        opts.update(self.defaults)
        opts.update(options)
        self.options = opts
        times = opts["times"]
        if times is None:
            times = self._times(opts)
        elif not isinstance(times, SelfDistillationTimes):  # a domain name or a pair sampler
            times = SelfDistillationTimes(opts["eta"], as_time_sampler(times))
        super().__init__(interpolant, times, opts["weight"])
        self.residual, self.form, self.stopgrad = opts["residual"], opts["form"], opts["stopgrad"]
        self.gamma, self.weighting, self.diagonal = opts["gamma"], opts["weighting"], opts["diagonal"]
        self._refuse_nonsense(opts)
        self.source = VelocitySource(opts["source"], teacher=opts["teacher"], ema_decay=opts["ema_decay"],
                                     guidance=opts["guidance"], null_label=opts["null_label"],
                                     kappa=opts["guidance_kappa"], interval=opts["guidance_interval"],
                                     ema_warmup=opts["ema_warmup"])
        self.offdiag_dropout = bool(opts["offdiag_dropout"])
        self.points = None
        if opts["points"] is not None:
            self.use_points(opts["points"])
        self.learned = LearnedWeight(opts["weight_channels"]) if self.weighting == "learned" else None
        self.adaptive = (AdaptiveWeight(opts["adaptive_p"], opts["adaptive_eps"])
                         if self.weighting == "adaptive" else None)
        self.tangent = (TangentNormalization(opts["tangent_c"], opts["tangent_warmup"])
                        if self.weighting == "tangent" else None)
        self.step = 0
        self._n_diag = 0

    # --- configuration ---------------------------------------------------------------------------
    @staticmethod
    def _times(opts: dict) -> SelfDistillationTimes:
        sampler, domain = opts["sampler"], opts["domain"]
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if domain not in ("triangle", "square"):
            raise ValueError(f"domain must be 'triangle' or 'square', got {domain!r}")
        if opts["diagonal_times"] not in DIAGONAL_TIMES:
            raise ValueError(f"diagonal_times: {opts['diagonal_times']!r} is not one of "
                             f"{', '.join(DIAGONAL_TIMES)}")
        if sampler == "dyadic":
            if domain != "triangle":
                raise ValueError("the dyadic sampler draws forward jumps only (domain=triangle)")
            pairs = DyadicPairs(opts["dyadic_levels"])
            diagonal = TimeSampler("diagonal")
        else:
            pairs = TimeSampler(domain, sampler, opts["time_mean"], opts["time_std"])
            diagonal = pairs.diagonal()
        if opts["diagonal_times"] == "pair":
            diagonal = PairStart(pairs)
        return SelfDistillationTimes(opts["eta"], pairs, diagonal, opts["fm_steps"], opts["anneal_steps"])

    def _refuse_nonsense(self, o: dict) -> None:
        """Refuse switch combinations that make no sense, with one line saying why."""
        choices = {"residual": RESIDUALS, "form": FORMS, "stopgrad": STOPGRADS, "source": SOURCES,
                   "weighting": WEIGHTINGS, "gamma": GAMMAS}
        for key, allowed in choices.items():
            if o[key] not in allowed:
                raise ValueError(f"{key}: {o[key]!r} is not one of {', '.join(allowed)}")
        residual, source = o["residual"], o["source"]
        if o["diagonal"] not in DIAGONALS:
            raise ValueError(f"diagonal: {o['diagonal']!r} is not one of {', '.join(DIAGONALS)}")
        if o["diagonal"] == "teacher" and source != "teacher":
            raise ValueError(f"diagonal=teacher regresses the diagonal on a teacher's velocity, but the "
                             f"source is {source!r}: use source=teacher or diagonal=conditional")
        if residual == "lagrangian" and source == "conditional":
            raise ValueError("a lagrangian residual needs the velocity at the transported point "
                             "X(s,t,I_s), but the conditional velocity İ is known only at I_s: use an "
                             "eulerian residual (MeanFlow, CT) or another source")
        if residual == "progressive" and source not in ("self", "ema"):
            raise ValueError(f"a progressive residual composes the model's own jumps; source must be "
                             f"self or ema, not {source} (for a teacher velocity use PFMM)")
        if residual == "progressive" and (o["form"] != "map" or o["stopgrad"] != "target"):
            raise ValueError("a progressive residual has one form: the student v against its own "
                             "two-jump target under stop-gradient (form=map, stopgrad=target)")
        if o["form"] == "v" and o["stopgrad"] != "target":
            raise ValueError("a v-form residual puts its whole target under stop-gradient "
                             "(stopgrad=target)")
        if source == "conditional" and o["stopgrad"] != "target":
            raise ValueError("with the conditional velocity İ only the stop-gradient (semigradient) "
                             "residual is unbiased; stopgrad must be target")
        if o["stopgrad"] == "none" and source != "self":
            raise ValueError(f"stopgrad=none differentiates through the network's own diagonal; with "
                             f"source={source} use stopgrad=source")
        if source in ("self", "ema") and self.times.eta == 0.0 and not self.times.annealing:
            raise ValueError(f"source={source} learns from the network's own diagonal, which only the "
                             "diagonal flow-matching term trains: eta must be > 0")
        if o["weighting"] == "tangent" and (o["form"] != "v" or residual == "progressive"):
            raise ValueError("tangent normalisation (AYF/sCM) applies to v-form lagrangian or eulerian "
                             "residuals (form=v)")
        if (o["guidance"] != 1.0 or o["guidance_kappa"] != 0.0) and residual == "progressive":
            raise ValueError("guidance applies to lagrangian and eulerian residuals (a velocity source)")
        if o["weight"] is not None and o["weighting"] != "none":
            raise ValueError("give either a weight function or a weighting, not both")

    # --- distillation without data (spec E.8) ---------------------------------------------------
    def data_free_refusal(self) -> str | None:
        """Why this objective cannot train without data, or ``None`` when it can: the points at time
        ``s`` then come from the teacher's paths, so the velocity source must be the teacher, no term
        may need the interpolant's conditional velocity ``İ`` (flow matching on the diagonal,
        ``source="conditional"``), and the residual must not compose the model's own jumps."""
        kind = self.source.kind
        if any(getattr(type(self), m) is not getattr(SelfDistillation, m)
               for m in ("terms", "_residual", "_diagonal")):
            return (f"{self.name}: its own step reads the data's interpolant; distillation without data "
                    "is for LMD, EMD and the self-distillation step with objective.source=teacher")
        if kind != "teacher":
            what = "its own diagonal" if kind in ("self", "ema") else "the data's conditional velocity"
            return (f"{self.name} learns from {what} (source={kind}); without data it needs a teacher "
                    "(objective.source=teacher with eta=0 or diagonal=teacher)")
        if self.residual == "progressive":
            return f"{self.name}: a progressive residual composes the model's own jumps; it needs data"
        if (self.times.eta > 0 or self.times.annealing) and self.diagonal != "teacher":
            return (f"{self.name}: its diagonal term is flow matching on the data (eta > 0, "
                    "diagonal=conditional); without data use eta=0 or diagonal=teacher")
        return None

    def use_points(self, points) -> None:
        """Draw the points at time ``s`` from ``points`` (a :class:`~flowmaps.objectives.trajectories.TeacherPaths`)
        instead of the interpolant of the data; refused (ValueError) when the objective needs data."""
        why = self.data_free_refusal()
        if why is not None:
            raise ValueError(why)
        self.points = points

    def data_free(self, shape, device="cpu", dtype=torch.float32, seed: int = 0, **options):
        """Prepare to train without data: the teacher's paths (``options`` go to
        :class:`~flowmaps.objectives.trajectories.TeacherPaths`) unless points were given; returns them."""
        from .trajectories import TeacherPaths

        if self.points is None:
            why = self.data_free_refusal()
            if why is not None:
                raise ValueError(why)
            self.use_points(TeacherPaths(self.source.teacher, self.interpolant, shape, seed=seed,
                                         device=device, dtype=dtype, **options))
        return self.points

    def _start(self, x0: Tensor, x1: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """The points at times ``s``: ``I_s`` of the data, or on the teacher's paths without data (on
        paths of the labels ``cond``, for a class-conditional teacher)."""
        if self.points is None:
            return self.interpolant.interpolate(x0, x1, s)
        return self.points.at(s, self.generator, cond=cond)

    @property
    def teacher(self):
        """The external teacher velocity (source ``"teacher"``), else ``None``."""
        return self.source.teacher

    @property
    def term_name(self) -> str:
        return TERM_NAMES[self.residual]

    # --- state -----------------------------------------------------------------------------------
    def begin_step(self, model, step: int) -> None:
        self.step = int(step)
        self.times.begin_step(step)
        self.source.begin_step(model, step)
        if self.points is not None:
            self.points.begin_step(step)

    def trainable_modules(self):
        return [self.learned] if self.learned is not None else []

    def state_dict(self):
        tensors, meta = self.source.state_dict()
        tensors = {f"source.{k}": v for k, v in tensors.items()}
        if self.learned is not None:
            tensors.update({f"weight.{k}": v for k, v in self.learned.state_dict().items()})
        return tensors, {"step": self.step, "source": meta}

    def load_state_dict(self, model, tensors, meta):
        self.source.load_state_dict(model, {k[len("source."):]: v for k, v in tensors.items()
                                            if k.startswith("source.")}, meta.get("source", {}))
        if self.learned is not None:
            weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
            if not weights:
                raise ValueError("the checkpoint has no learned loss weight but this objective "
                                 "learns one")
            self.learned.load_state_dict(weights)
        self.step = int(meta.get("step", 0))
        self.times.begin_step(self.step)

    # --- the step --------------------------------------------------------------------------------
    def terms(self, model, x0, x1, s, t, cond):
        n = x1.shape[0]
        n_d = self.times.n_diagonal(n)
        self._n_diag = n_d
        if 0 < n_d < n and self._fusable(model, x1):
            return self.batch_terms(self._fused_lagrangian(model, x0, x1, s, t, cond, n_d), n_d, n, x1)
        pieces = {}
        if n_d:
            pieces["diagonal"] = self._diagonal(model, x0[:n_d], x1[:n_d], t[:n_d], _rows(cond, 0, n_d))
        if n_d < n:
            with contextlib.nullcontext() if self.offdiag_dropout else dropout_disabled(model):
                r = self._residual(model, x0[n_d:], x1[n_d:], s[n_d:], t[n_d:], _rows(cond, n_d, n))
            pieces[self.term_name] = sq_norm(r)
        return self.batch_terms(pieces, n_d, n, x1)

    # LSD's step in one network pass: the diagonal needs the value of v̂ on its rows, the Lagrangian
    # residual the value and the time-JVP on the others; a network with the fused forward-mode path
    # computes both in one set of matmuls (``v_jvps(..., offset=n_d)``) instead of two smaller passes.
    # Not under bf16 (or TF32): the JVP then runs in full fp32 and the diagonal, a plain pass, autocasts
    # (flowmaps.precision, rules 1-2), so the two cannot share a pass.
    fuse_passes = True

    def _fusable(self, model, like: Tensor) -> bool:
        if getattr(model, "jvps_apart", None) is not None and model.jvps_apart(like):
            return False
        if not (self.fuse_passes and self.points is None and self.residual == "lagrangian"
                and self.form == "map"
                and self.stopgrad == "target" and self.diagonal == "conditional"
                and hasattr(model, "v_jvps") and model._fused("forward_and_jvps")):
            return False
        # the diagonal pass runs with dropout, the residual without: one pass only without dropout
        return not any(isinstance(m, _DROPOUT) and m.training and m.p > 0 for m in model.modules())

    def _fused_lagrangian(self, model, x0, x1, s, t, cond, n_d) -> dict[str, Tensor]:
        """The diagonal term and the Lagrangian map-form residual with the target under sg (LSD, LMD with
        a diagonal) from one pass: the same values and gradients as :meth:`_diagonal` and
        :func:`~flowmaps.objectives.residuals.lagrangian`."""
        i_all, di_all = self.interpolant(x0, x1, s)  # s = t on the diagonal rows
        v, (dt_v,) = model.v_jvps(i_all, s, t, [(None, None, 1.0)], cond=cond, offset=n_d)
        v_o, s_o, t_o = v[n_d:], s[n_d:], t[n_d:]
        gap = expand_as_data(t_o - s_o, v_o)
        x_st = i_all[n_d:] + gap * v_o
        dt_x = v_o + gap * dt_v  # ∂_t [x + (t − s) v̂_{s,t}(x)]
        self.record("jvp_norm", dt_x)
        target = self.source.at(model, x_st.detach(), t_o, _rows(cond, n_d, x1.shape[0]))
        return {"diagonal": sq_norm(v[:n_d] - di_all[:n_d]), self.term_name: sq_norm(dt_x - target)}

    def batch_terms(self, pieces: dict[str, Tensor], n_d: int, n: int, like: Tensor) -> dict[str, Tensor]:
        """The diagonal and off-diagonal per-sample terms as ``(n,)`` vectors over the whole batch (each
        zero on the other part), as :meth:`combine` and :meth:`summarize` read them."""
        if len(pieces) == 1:
            return pieces
        zeros_d, zeros_o = like.new_zeros(n_d), like.new_zeros(n - n_d)
        return {"diagonal": torch.cat([pieces["diagonal"], zeros_o]),
                self.term_name: torch.cat([zeros_d, pieces[self.term_name]])}

    def _diagonal(self, model, x0, x1, t, cond) -> Tensor:
        """The diagonal term, with dropout as configured: flow matching ``|v̂_{t,t}(I_t) − İ_t|²``, or
        with ``diagonal="teacher"`` the teacher's velocity ``|v̂_{t,t}(I_t) − sg b̂_t(I_t)|²``. With the
        conditional source under guidance (MeanFlow) the target is the guided ``b^g_t(I_t)``, as the
        official loss regresses every sample, ``r = t`` included, on it."""
        if self.diagonal == "teacher":
            i_t = self._start(x0, x1, t, cond)
            target = self.source.at(model, i_t, t, cond, grad="none")  # under no_grad
        else:
            i_t, target = self.interpolant(x0, x1, t)
            if self.source.kind == "conditional":
                target = self.source.conditional(model, i_t, target, t, cond)
        return sq_norm(model.velocity(i_t, t, cond) - target)

    def _residual(self, model, x0, x1, s, t, cond) -> Tensor:
        warmup = self.tangent.warmup_factor(self.step) if self.tangent is not None else 1.0
        if self.residual == "progressive":
            i_s = self.interpolant.interpolate(x0, x1, s)
            teacher = self.source.ema if (self.source.kind == "ema" and self.source.ema is not None) \
                else model
            return progressive(model, i_s, s, t, cond, teacher, self._draw_gamma(s))
        if self.residual == "lagrangian":
            i_s = self._start(x0, x1, s, cond)
            return lagrangian(model, i_s, s, t, cond, self.source, self.stopgrad, self.form, warmup,
                              self.record)
        if self.source.kind == "conditional":
            i_s, di_s = self.interpolant(x0, x1, s)
            b = self.source.conditional(model, i_s, di_s, s, cond)
        else:
            i_s = self._start(x0, x1, s, cond)
            b = self.source.at(model, i_s, s, cond, grad="all" if self.stopgrad == "none" else "none")
        return eulerian(model, i_s, b, s, t, cond, self.stopgrad, self.form, warmup, self.record)

    def _draw_gamma(self, s: Tensor) -> Tensor | float:
        if self.gamma == "midpoint":
            return 0.5
        return torch.rand(s.shape[0], generator=self.generator, dtype=s.dtype, device=s.device)

    def combine(self, terms, s, t):
        per_sample = sum(terms.values())
        if self.weight is not None:
            return self.weight(s, t) * per_sample
        if self.learned is not None:
            return self.learned.apply(per_sample, s, t)
        if self.adaptive is not None:
            return self.adaptive.apply(per_sample)
        if self.tangent is not None:
            n_d = self._n_diag
            return torch.cat([per_sample[:n_d], self.tangent.apply(per_sample[n_d:])])
        return per_sample

    def summarize(self, terms):
        """Each term's mean over its own sub-batch (the diagonal and the off-diagonal samples)."""
        n_d, out = self._n_diag, {}
        for name, values in terms.items():
            part = values[:n_d] if name == "diagonal" else values[n_d:]
            out[name] = part.detach().mean() if part.numel() else values.new_zeros(())
        return out

    def config(self) -> dict:
        out = {"name": self.name, "residual": self.residual, "form": self.form,
               "stopgrad": self.stopgrad, "times": self.times.config(), **self.source.config()}
        if self.residual == "progressive":
            out["gamma"] = self.gamma
        for part in (self.learned, self.adaptive, self.tangent):
            if part is not None:
                out["weighting"] = part.config()
        return out


def _rows(cond: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if cond is None else cond[start:stop]
