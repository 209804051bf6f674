"""Adapters: a model of torchcfm, Meta's flow_matching or diffusers as a teacher velocity ``b(x, t[, cond])``
in this library's convention (per-sample ``t`` of shape ``(B,)``, ``t = 0`` noise, ``t = 1`` data), for the
linear interpolant ``I_t = (1 − t) x0 + t x1`` with ``x0 ~ N(0, σ0² I)``, σ0 a scalar (``sigma0``,
default 1, the base every one of these libraries trains with).

Each adapter is a function returning a :class:`TeacherVelocity` (an ``nn.Module`` around the model, so
``.to(device)`` moves both). None imports the library it adapts: the models and schedulers are used
through their documented call conventions, which the docstrings state and the tests check against the
real packages. The conversion itself is :mod:`flowmaps.teachers.conversion` (exact, derivation there).
Put the model in eval mode first (``model.eval()``) when it has dropout or batch norm.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._tensor import batch_times
from .conversion import PREDICTIONS, PathPoint, VPSchedule, linear_path, linear_velocity, tau_of_ratio
from .conversion import teacher_state

__all__ = ["TeacherVelocity", "NOISE_ENDS", "gaussian_velocity", "DEFAULT_TAU_START", "torchcfm",
           "flow_matching", "diffusers_flow", "diffusers_vp", "ADAPTERS"]


def _output(out: Any) -> Tensor:
    """The tensor of a model's output: a tensor, a diffusers ``*Output`` (its ``.sample``) or a tuple."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor (or an output with .sample)")


def _scalar_sigma0(sigma0) -> float:
    value = torch.as_tensor(sigma0, dtype=torch.float64)
    if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) <= 0:
        raise ValueError(f"sigma0 must be one positive number (the base is N(0, sigma0^2 I) with the "
                         f"teacher's isotropic noise), got {value.tolist()}")
    return float(value)


class TeacherVelocity(nn.Module):
    """``b(x, t[, cond])`` of a model trained elsewhere: our ``τ = t`` is clamped to :attr:`tau_range`
    (the times the model's schedule covers; ``(0, 1)`` for flow-matching models), the model is queried
    at its own time ``u`` and state ``z = k x`` (``at``), and its prediction is turned into our velocity
    exactly (:func:`~flowmaps.teachers.conversion.linear_velocity`).

    Args:
        model: the library's model (a module or any callable).
        call: ``call(model, z, u, extras) -> output`` in the library's calling convention.
        at: ``at(tau) -> PathPoint``, the teacher's time and path coefficients at our times (float64).
        prediction: what the model predicts, one of ``velocity``, ``epsilon``, ``x1``, ``v``.
        sigma0: our base scale (a scalar).
        tau_range: the times at which the conversion is exact.
        cond_kwarg: the keyword that carries class labels to the model (``None``: unconditional).
        extras: fixed keyword arguments of every call (e.g. ``encoder_hidden_states``).
        name: the adapter's name (for messages and ``repr``).
    """

    def __init__(self, model: nn.Module | Callable, call: Callable, at: Callable[[Tensor], PathPoint], prediction: str,
                 sigma0: float = 1.0, tau_range: tuple[float, float] = (0.0, 1.0),
                 cond_kwarg: str | None = None, extras: dict | None = None, name: str = "teacher",
                 noise_end: str = "exact", tau_start: float | None = None):
        super().__init__()
        if noise_end not in NOISE_ENDS:
            raise ValueError(f"{name}: noise_end must be one of {', '.join(NOISE_ENDS)}, got {noise_end!r}")
        if noise_end != "exact" and (tau_start is None or not 0.0 <= float(tau_start) < 1.0):
            raise ValueError(f"{name}: noise_end={noise_end} needs tau_start in [0, 1), got {tau_start!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"{name}: prediction must be one of {', '.join(PREDICTIONS)}, "
                             f"got {prediction!r}")
        if not callable(model):
            raise TypeError(f"{name}: the model must be callable, got {type(model).__name__}")
        self.model = model
        self._call, self._at, self.prediction = call, at, prediction
        self.sigma0, self.tau_range = _scalar_sigma0(sigma0), tuple(float(v) for v in tau_range)
        self.cond_kwarg, self.extras, self.name = cond_kwarg, dict(extras or {}), name
        self.noise_end = noise_end
        self.tau_start = None if noise_end == "exact" else max(float(tau_start), self.tau_range[0])

    def query(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, PathPoint]:
        """The teacher's state and time for our ``(x, t)``: ``(z, PathPoint)``."""
        lo, hi = self.tau_range
        if self.tau_start is not None:
            lo = max(lo, self.tau_start)
        tau = batch_times(t, x).to(torch.float64).clamp(lo, hi)
        point = self._at(tau)
        return teacher_state(x, point, self.sigma0), point

    def forward(self, x: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        b = self._teacher(x, t, cond)
        if self.noise_end != "gaussian":
            return b
        tau = batch_times(t, x).to(torch.float64)
        low = tau < self.tau_start
        if not bool(low.any()):
            return b
        low = low.reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.where(low, gaussian_velocity(x, tau, self.sigma0), b)

    def _teacher(self, x: Tensor, t: float | Tensor, cond: Tensor | None) -> Tensor:
        z, point = self.query(x, t)
        extras = dict(self.extras)
        if cond is not None:
            if self.cond_kwarg is None:
                raise TypeError(f"{self.name}: class labels were given but the adapter has no "
                                "cond_kwarg (the model's keyword for them)")
            extras[self.cond_kwarg] = cond
        pred = _output(self._call(self.model, z, point.u.to(x.dtype), extras))
        if pred.shape != x.shape:
            pred = self._learned_variance(pred, x)
        if pred.shape != x.shape:
            raise ValueError(f"{self.name}: the model returned shape {tuple(pred.shape)} for input "
                             f"{tuple(x.shape)}")
        return linear_velocity(pred, x, point, self.sigma0, self.prediction)

    def _learned_variance(self, pred: Tensor, x: Tensor) -> Tensor:
        """DDPM models with a learned variance output ``[ε̂, v]`` on 2C channels: keep ``ε̂``."""
        if pred.ndim == x.ndim >= 2 and pred.shape[1] == 2 * x.shape[1] and pred.shape[2:] == x.shape[2:]:
            return pred[:, : x.shape[1]]
        return pred

    def extra_repr(self) -> str:
        start = (f", noise_end={self.noise_end}, tau_start={self.tau_start:.4g}"
                 if self.tau_start is not None else "")
        return (f"adapter={self.name}, prediction={self.prediction}, sigma0={self.sigma0:g}, "
                f"tau_range=({self.tau_range[0]:.4g}, {self.tau_range[1]:.4g}){start}")


NOISE_ENDS = ("exact", "clamp", "gaussian")


def gaussian_velocity(x: Tensor, tau: Tensor, sigma0: float) -> Tensor:
    """The exact velocity of standard-normal data N(0, I) on our path, ``b_τ(x) = x (τ − σ0²(1 − τ)) /
    (τ² + σ0² (1 − τ)²)``: the flow that scales the base to the variance ``τ² + σ0²(1 − τ)²`` of the VP
    noise ``z ~ N(0, I)`` read at ``τ`` (``x = z/k``), i.e. what diffusers' samplers assume when they put
    pure noise at their first timestep."""
    tau = tau.to(torch.float64)
    coef = (tau - sigma0 ** 2 * (1.0 - tau)) / (tau ** 2 + sigma0 ** 2 * (1.0 - tau) ** 2)
    return coef.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * x


# --- torchcfm ---------------------------------------------------------------------------------------

def _positional_arity(model) -> int | None:
    """How many positional arguments without defaults the model's ``forward`` takes (None: unknown)."""
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def _call_concat(model, z, u, extras):
    if z.ndim != 2:
        raise ValueError(f"torchcfm: the [x, t] call order needs vectors (B, d), got shape {tuple(z.shape)}; "
                         "models of images take (t, x): call='tx'")
    return model(torch.cat([z, u[:, None]], dim=1), **extras)


def _call_tx(model, z, u, extras):
    return model(u, z, **extras)


def torchcfm(model, call: str = "auto", sigma0: float = 1.0, cond_kwarg: str | None = "y",
             extras: dict | None = None) -> TeacherVelocity:
    """A torchcfm model as a teacher.

    torchcfm's convention is ours: ``ConditionalFlowMatcher`` regresses ``x_t = t x1 + (1 − t) x0``
    (``x0`` its noise, ``x1`` the data; ``sigma=0``) onto ``u_t = x1 − x0``, ``t = 0`` noise → ``t = 1``
    data. So ``b(x, t) = model(x, t)`` exactly for σ0 = 1; for another σ0 the model is queried at
    ``u = t / (t + (1 − t) σ0)`` and ``z = x / (t + (1 − t) σ0)`` and its velocity converted exactly.

    Call orders (``call``): ``"concat"``, the state ``[x, t]`` (shape ``(B, d + 1)``) of its MLP
    (``torchcfm.models.models.MLP(dim, time_varying=True)``, used as ``model(torch.cat([x, t[:, None]],
    -1))``); ``"tx"``, ``model(t, x)`` with ``t`` of shape ``(B,)`` (its ``UNetModelWrapper``, labels as
    ``y=``); ``"auto"`` picks ``"tx"`` when ``forward`` takes two positional arguments. torchdyn's
    ``torch_wrapper`` (one scalar time) is unwrapped to the model inside it.
    """
    if type(model).__name__ == "torch_wrapper" and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    if call == "auto":
        call = "tx" if (_positional_arity(model) or 1) >= 2 else "concat"
    if call not in ("concat", "tx"):
        raise ValueError(f"torchcfm: call must be 'auto', 'concat' or 'tx', got {call!r}")
    s0 = _scalar_sigma0(sigma0)
    return TeacherVelocity(model, _call_concat if call == "concat" else _call_tx,
                           lambda tau: linear_path(tau, s0), "velocity", s0,
                           cond_kwarg=cond_kwarg if call == "tx" else None, extras=extras,
                           name=f"torchcfm[{call}]")


# --- Meta's flow_matching ---------------------------------------------------------------------------

def _call_keywords(model, z, u, extras):
    return model(x=z, t=u, **extras)


def _scheduler_point(scheduler, sigma0: float, ends: tuple[float, float], tau_range: tuple[float, float]):
    """``at(tau)`` for a flow_matching ``Scheduler``: the time of the same SNR ``α_u/σ_u`` by its
    ``snr_inverse`` (the end times ``ends`` at the ends of its range), with its ``α, σ`` and their
    derivatives there (their ``alpha_t`` is our ``A``, their ``sigma_t`` our ``S``)."""
    lo, hi = tau_range

    def at(tau: Tensor) -> PathPoint:
        ratio = (tau / ((1.0 - tau) * sigma0)).clamp(max=torch.finfo(torch.float64).max)
        u = scheduler.snr_inverse(ratio).to(torch.float64)
        u = torch.where(tau <= lo, torch.full_like(u, ends[0]),
                        torch.where(tau >= hi, torch.full_like(u, ends[1]), u))
        out = scheduler(u)
        return PathPoint(u=u, A=out.alpha_t.double(), S=out.sigma_t.double(), tau=tau,
                         dA=out.d_alpha_t.double(), dS=out.d_sigma_t.double())

    return at


def _scheduler_ends(scheduler) -> tuple[float, float]:
    """``u = 0`` and ``u = 1``, each moved inward by 1e-6 where the conversion is singular there: a
    coefficient or derivative is not finite (``VPScheduler``: ``σ̇_u`` is infinite at ``u = 1``), or the
    path's velocity carries no information, ``D = α̇σ − σ̇α = 0`` (``PolynomialConvexScheduler``:
    ``α̇_0 = σ̇_0 = 0``)."""
    ends = []
    for end, inward in ((0.0, 1e-6), (1.0, 1.0 - 1e-6)):
        out = scheduler(torch.tensor([end], dtype=torch.float64))
        values = [torch.as_tensor(v, dtype=torch.float64)
                  for v in (out.alpha_t, out.sigma_t, out.d_alpha_t, out.d_sigma_t)]
        A, S, dA, dS = values
        regular = all(bool(torch.isfinite(v).all()) for v in values) and bool((dA * S - dS * A != 0).all())
        ends.append(end if regular else inward)
    return ends[0], ends[1]


def flow_matching(model, scheduler=None, prediction: str = "velocity", sigma0: float = 1.0,
                  cond_kwarg: str | None = None, extras: dict | None = None) -> TeacherVelocity:
    """A Meta ``flow_matching`` model (a ``ModelWrapper``, called ``model(x=x, t=t, **extras)`` with
    ``t`` of shape ``(B,)``) as a teacher.

    flow_matching's convention: ``AffineProbPath(scheduler)`` samples ``x_t = σ_t x_0 + α_t x_1`` with
    ``x_0`` the noise (source) and ``x_1`` the data, ``t = 0`` noise → ``t = 1`` data, and the model
    predicts ``dx_t = σ̇_t x_0 + α̇_t x_1`` (``prediction="velocity"``), or ``x_1`` (``"x1"``) or ``x_0``
    (``"epsilon"``). With ``scheduler=None`` (or ``CondOTScheduler``: ``α_t = t``, ``σ_t = 1 − t``) the path
    is ours and ``b(x, t) = model(x=x, t=t)`` exactly for σ0 = 1. Any other scheduler (``VPScheduler``,
    ``CosineScheduler``, ``PolynomialConvexScheduler``…) is converted exactly: the model is queried at
    ``u = scheduler.snr_inverse(t / ((1 − t) σ0))``; times beyond the SNR its schedule reaches at
    ``u ∈ [0, 1]`` are clamped to it (``tau_range``), and an end where the schedule's derivative is
    infinite (``VPScheduler`` at ``u = 1``), or where the path's velocity is zero whatever the data
    (``PolynomialConvexScheduler`` at ``u = 0``), is moved inward by 1e-6; near such an end the model's
    own errors are amplified by ``1/(α̇σ − σ̇α)``.
    """
    s0 = _scalar_sigma0(sigma0)
    if scheduler is None or type(scheduler).__name__ == "CondOTScheduler":
        at, tau_range = (lambda tau: linear_path(tau, s0)), (0.0, 1.0)
    else:
        ends = _scheduler_ends(scheduler)
        out = scheduler(torch.tensor(ends, dtype=torch.float64))
        ratio = out.alpha_t.double() / out.sigma_t.double()  # SNR at the two ends (may be ∞)
        lo, hi = (float(v) for v in tau_of_ratio(ratio, s0))
        if not lo < hi:
            raise ValueError("flow_matching: the scheduler's SNR must increase from t=0 (noise) to t=1")
        tau_range = (lo, hi)
        at = _scheduler_point(scheduler, s0, ends, tau_range)
    return TeacherVelocity(model, _call_keywords, at, prediction, s0, tau_range, cond_kwarg, extras,
                           name="flow_matching")


# --- diffusers --------------------------------------------------------------------------------------

def _call_diffusers(model, z, u, extras):
    # the state first, the time by keyword: UNet2DModel(sample, timestep), UNet2DConditionModel,
    # SD3Transformer2DModel(hidden_states, ..., timestep=...) and FluxTransformer2DModel all name it so
    return model(z, timestep=u, **extras)


def _config(scheduler, key: str, default=None):
    config = getattr(scheduler, "config", None)
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def diffusers_flow(model, scheduler=None, timestep_scale: float | None = None, sigma0: float = 1.0,
                   cond_kwarg: str | None = None, extras: dict | None = None) -> TeacherVelocity:
    """A diffusers flow-matching model (``FlowMatchEulerDiscreteScheduler``: SD3, Flux, AuraFlow…; called
    ``model(x, timestep=…, **extras)``, output a tensor or ``.sample``) as a teacher. ``extras`` holds what
    else the model needs on every call (``encoder_hidden_states``, ``pooled_projections``…).

    diffusers' convention: the state at noise level ``σ`` is ``x_σ = (1 − σ) x1 + σ ε`` (``σ = 1`` noise →
    ``σ = 0`` data), the model's time argument is ``timestep = σ · num_train_timesteps`` (1000) and it
    predicts ``dx_σ/dσ = ε − x1``. Our ``t`` is ``1 − σ``, and ``d/dt = −d/dσ``, so

        b(x, t) = −model(x, 1000 (1 − t))          (σ0 = 1; exact).

    The scheduler's ``shift`` (and dynamic shifting, ``shift_terminal``, Karras/exponential/beta sigmas)
    only choose *which* noise levels its sampler visits: diffusers always calls the model with
    ``timestep = σ · num_train_timesteps`` for the true noise level ``σ`` of the state, so the conversion
    above is exact for every shift (tested by running the scheduler's own ``step`` with ``shift=3``).
    ``invert_sigmas=True`` (Mochi) feeds inverted timesteps and is refused. ``timestep_scale`` overrides
    ``num_train_timesteps`` (e.g. 1 for a transformer called with ``timestep / 1000`` as Flux's pipeline
    does).
    """
    if _config(scheduler, "invert_sigmas", False):
        raise ValueError("diffusers_flow: a scheduler with invert_sigmas=True (Mochi) feeds inverted "
                         "timesteps; wrap that model yourself")
    scale = float(timestep_scale if timestep_scale is not None
                  else _config(scheduler, "num_train_timesteps", 1000))
    s0 = _scalar_sigma0(sigma0)

    def at(tau: Tensor) -> PathPoint:
        point = linear_path(tau, s0, reverse=True)  # u = σ; the model predicts d/dσ whatever the scale
        point.u = point.u * scale
        return point

    velocity = TeacherVelocity(model, _call_diffusers, at, "velocity", s0, (0.0, 1.0), cond_kwarg, extras,
                               name="diffusers_flow")
    velocity.timestep_scale, velocity.scheduler = scale, scheduler
    return velocity


DEFAULT_TAU_START = 0.05
"""The default noise end of ε-prediction VP teachers (``diffusers_vp(noise_end="auto")``): below it the
velocity is held at its value there, ``b_t := b_{0.05}`` (README, spec E.7: measured)."""


def diffusers_vp(model, scheduler, prediction_type: str | None = None, sigma0: float = 1.0,
                 cond_kwarg: str | None = None, extras: dict | None = None, noise_end: str = "auto",
                 tau_start: float | None = None) -> TeacherVelocity:
    """A diffusers ε-, v- or x-prediction VP model (``DDPMScheduler``, ``DDIMScheduler`` or any scheduler
    with ``alphas_cumprod``; called ``model(x, timestep=…, **extras)``) as a teacher, converted **exactly**.

    diffusers' convention: ``add_noise`` makes ``z = √ᾱ_n x1 + √(1 − ᾱ_n) ε`` at integer timestep ``n``
    (``n = 0`` nearly data, ``n = N − 1`` nearly noise) and the model predicts ``ε``
    (``prediction_type="epsilon"``), ``v = √ᾱ ε − √(1 − ᾱ) x1`` (``"v_prediction"``) or ``x1``
    (``"sample"``); the default is the scheduler's ``config.prediction_type``.

    Derivation (``a = √ᾱ``, ``s = √(1 − ᾱ)``, σ0 = 1 for the formulas; the general σ0 is in
    :mod:`flowmaps.teachers.conversion`): ``z = a x1 + s ε = (a + s) · [τ x1 + (1 − τ) ε]`` with
    ``τ = a / (a + s)``, i.e. the VP state is our linear interpolant at ``τ`` scaled by ``a + s``. So for our
    ``(x, τ)`` take the timestep whose ``a/s = τ/(1 − τ)`` and query the model at ``z = (a + s) x``; the
    posterior means are the same (the events ``{z = (a+s)x}`` and ``{I_τ = x}`` coincide). Then

        ε-prediction:  x̂1 = (z − s ε̂)/a = (x − (1 − τ) ε̂)/τ,   b_τ(x) = (x̂1 − x)/(1 − τ) = (x − ε̂)/τ;
        v-prediction:  x̂1 = a z − s v̂,  ε̂ = s z + a v̂,         b_τ(x) = x̂1 − ε̂;
        x-prediction:  b_τ(x) = (x̂1 − x)/(1 − τ).

    Discrete timesteps: the log-SNR of ``alphas_cumprod`` is interpolated linearly between integer
    timesteps and inverted exactly (:class:`~flowmaps.teachers.conversion.VPSchedule`), so the model is
    called at a fractional timestep whose SNR is exactly that of our ``τ``; at integer timesteps this is the
    scheduler's own ``ᾱ_n``. ``τ`` outside the schedule's range (``tau_range``; about ``[0.0063, 0.990]``
    for the default linear betas) is clamped to it. ε-prediction near ``τ_min`` divides by ``τ``: the
    model's own errors are amplified by ``1/τ`` there (v-prediction has no such division). Learned-variance
    outputs (2C channels) keep their first C channels, as ``DDPMScheduler.step`` does.

    **The noise end** (``noise_end``, ``tau_start``). ε-prediction divides the model's error by ``τ``:
    ``squaredcos_cap_v2`` reaches ``τ_min ≈ 4.9e-5`` at timestep 999 (errors × 2·10⁴), the linear betas
    ``τ_min ≈ 0.0063`` (× 160). diffusers' own samplers put their pure noise at their first timestep
    and so never need the model at ``τ`` below it. ``noise_end``:

    * ``"clamp"`` — ``b_τ(x) := b_{tau_start}(x)`` below ``tau_start``: the network is queried at
      ``tau_start`` or later only, where its error is amplified ``σ0/tau_start``× at most. Near the
      noise end the velocity changes slowly (``b_0(x) = E[x1] − x``), so holding it costs little: with a
      perfect model of the gmm mixture the dopri5 endpoints move by 0.0015 on average at
      ``tau_start = 0.05`` (``benchmarks/diffusion_teachers.py``);
    * ``"gaussian"`` — below ``tau_start`` the velocity of N(0, I) data,
      ``b_τ(x) = x (τ − σ0²(1 − τ))/(τ² + σ0²(1 − τ)²)`` (:func:`gaussian_velocity`): the base flows to
      the noise level of ``tau_start`` as diffusers' pure-noise start assumes (the VP noise
      ``z ~ N(0, I)`` read there). Exact only for standardised data (same perfect model: 0.049);
    * ``"exact"`` — the whole schedule (clamped at ``τ_min`` only): the behaviour before issue 17;
    * ``"auto"`` (default) — ``"clamp"`` with ``tau_start = DEFAULT_TAU_START`` (0.05) for
      ε-prediction; ``"exact"`` for v- and x-prediction, whose conversions divide by nothing that
      vanishes at the noise end.
    """
    kind = prediction_type or _config(scheduler, "prediction_type", "epsilon")
    names = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x1"}
    if kind not in names:
        raise ValueError("diffusers_vp: prediction_type must be epsilon, v_prediction or sample, "
                         f"got {kind!r}")
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError("diffusers_vp: the scheduler has no alphas_cumprod (a VP scheduler such as "
                         "DDPMScheduler or DDIMScheduler is needed)")
    s0 = _scalar_sigma0(sigma0)
    schedule = VPSchedule(abar, s0)
    if noise_end == "auto":
        noise_end = "clamp" if kind == "epsilon" else "exact"
        tau_start = DEFAULT_TAU_START if tau_start is None else tau_start
    elif noise_end != "exact" and tau_start is None:
        tau_start = DEFAULT_TAU_START
    velocity = TeacherVelocity(model, _call_diffusers, schedule.at, names[kind], s0, schedule.tau_range,
                               cond_kwarg, extras, name=f"diffusers_vp[{kind}]", noise_end=noise_end,
                               tau_start=tau_start if noise_end != "exact" else None)
    velocity.schedule, velocity.scheduler = schedule, scheduler
    velocity.steps_offset = int(_config(scheduler, "steps_offset", 0) or 0)
    return velocity


ADAPTERS = {"torchcfm": torchcfm, "flow_matching": flow_matching, "diffusers_flow": diffusers_flow,
            "diffusers_vp": diffusers_vp}
"""The adapters by the name ``teacher.adapter=`` takes: each converts a module of that library into a
teacher ``b(x, t)``."""
