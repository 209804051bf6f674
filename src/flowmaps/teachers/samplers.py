"""The diffusion field's fast samplers in our convention, for any teacher velocity ``b(x, t)``: DDIM
(deterministic, η = 0) and DPM-Solver++(2M), on the timestep spacings people use; and the user's own
diffusers scheduler (``set_timesteps`` + ``step``) run on the teacher's own network.

Convention: ``t = 0`` base, ``t = 1`` data, ``x = t x1 + (1 − t) σ0 ε``. Write ``α_t = t`` and
``σ_t = (1 − t) σ0`` (signal and noise coefficients of our path) and ``λ_t = log(α_t / σ_t)
= log(t / ((1 − t) σ0))`` (half the log-SNR, Lu et al.'s λ; a VP model's timestep with the same SNR has
the same λ). From the velocity, the two posterior means are

    x̂1 = x + (1 − t) b_t(x)      (data prediction),      x̂0 = x − t b_t(x) = σ0 ε̂     (noise).

**DDIM** (Song et al. 2021, η = 0) moves to ``t'`` keeping both predictions:
``x' = t' x̂1 + (1 − t') x̂0``. Substituting, ``x' = x + (t' − t) b_t(x)``: in the linear path DDIM *is*
Euler's method on the grid of ``t``'s, and it is exact when ``x̂1`` is constant along the trajectory.
(A VP model's DDIM step between timesteps ``n → n'`` is the same step between the ``t``'s of the same
SNR, because the VP state is ours scaled, ``z = k x``: :mod:`flowmaps.teachers.conversion`.) Order 1.

**DPM-Solver++(2M)** (Lu et al. 2022, data prediction, multistep, "midpoint" form as diffusers'
``DPMSolverMultistepScheduler``): the ODE ``ẋ = b_t(x)`` is, for ``y = x / σ_t``, ``dy/dλ = e^λ x̂1`` (any
Gaussian path), so with ``h = λ_{t'} − λ_t``

    first order (= DDIM):   x' = (σ_{t'}/σ_t) x + α_{t'} (1 − e^{−h}) D,  D = x̂1(x, t),
    second order:           D = x̂1_i + (1 / (2 r)) (x̂1_i − x̂1_{i−1}),  r = h_{i−1} / h_i,

one evaluation per step; the first step (no previous ``x̂1``) and a step into ``t' = 1`` (``σ = 0``,
``h = ∞``, where diffusers' ``final_sigmas_type="zero"`` also steps first order) are first order, and a
step out of ``t = 0`` (``λ = −∞``) too. ``α_{t'}(1 − e^{−h}) = α_{t'} − σ_{t'} α_t / σ_t`` is formed
without the infinities, so grids may start at 0 and end at 1. σ0 shifts every λ by ``−log σ0`` and
so enters neither ``h``, ``r`` nor the coefficients: the update is the same for every base scale. Order 2.

**Spacings** (:func:`grid`), all ending at ``t = 1`` (the data; diffusers' DDIM with
``set_alpha_to_one`` and DPM-Solver's ``final_sigmas_type="zero"`` end there too):

* ``uniform_t``: ``0, 1/k, …, 1``;
* ``uniform_lambda``: 0, the ``k − 1`` interior times of ``k`` steps uniform in λ from the teacher's
  ``t_lo`` to ``t_hi`` (its well-conditioned range, :func:`well_conditioned_range`), then 1 (the first
  and last steps, from λ = −∞ and to λ = +∞, are first order);
* ``leading``, ``trailing``, ``linspace`` (a VP teacher with a discrete schedule of ``N`` timesteps):
  diffusers ``DDIMScheduler.set_timesteps(k)``'s timesteps ``n_1 > … > n_k`` (as its code defines them, with
  ``steps_offset``), mapped to our ``t`` of the same ``ᾱ_n`` and followed by 1.

The VP spacings start at ``t_1 > 0`` and, as diffusers does, from the base *put at* ``t_1``: diffusers
draws ``z ~ N(0, I)`` at its first timestep, which in our convention is ``x = z / k``; as our base is
``x0 = σ0 ε`` this is ``x_{t_1} = x0 · √(t_1² + σ0² (1 − t_1)²) / σ0`` (:func:`start_at`), the exact flow from
0 to ``t_1`` of the velocity of N(0, I) data, at no network evaluation.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._tensor import batch_times

__all__ = ["SPACINGS", "SAMPLERS", "ddim", "dpm_solver_pp_2m", "grid", "start_at", "sample",
           "discrete_timesteps", "scheduler_sample", "SchedulerRun"]

SPACINGS = ("uniform_t", "uniform_lambda", "leading", "trailing", "linspace")
VP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpmpp_2m")


def _coefficients(t: float, t_next: float, sigma0: float) -> tuple[float, float]:
    """``(c_x, c_d)`` of ``x' = c_x x + c_d D``: ``σ_{t'}/σ_t`` and ``α_{t'} − σ_{t'} α_t / σ_t``."""
    if t >= 1.0:
        raise ValueError("a step must start before the data end t = 1")
    ratio = (1.0 - t_next) / (1.0 - t)
    return ratio, t_next - ratio * t


def _lambda(t: float, sigma0: float) -> float:
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t / ((1.0 - t) * sigma0))


def _data_prediction(velocity, x: Tensor, t: float, cond) -> Tensor:
    tt = batch_times(t, x)
    b = velocity(x, tt) if cond is None else velocity(x, tt, cond)
    return x + (1.0 - t) * b


def _check_grid(times) -> list[float]:
    values = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).reshape(-1)]
    if len(values) < 2 or any(not 0.0 <= v <= 1.0 for v in values) or any(
            b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"the time grid must increase strictly within [0, 1] with at least two times, "
                         f"got {values}")
    return values


def ddim(velocity: Callable, x: Tensor, times, cond: Tensor | None = None,
         return_path: bool = False):
    """DDIM (η = 0) along the increasing grid ``times`` from ``x`` at ``times[0]``:
    ``x' = t' x̂1 + (1 − t') x̂0 = x + (t' − t) b_t(x)`` (module docstring). NFE = ``len(times) − 1``.
    Returns the final state (and the states at every grid time with ``return_path``)."""
    return _multistep(velocity, x, _check_grid(times), 1, 1.0, cond, return_path)


def dpm_solver_pp_2m(velocity: Callable, x: Tensor, times, cond: Tensor | None = None,
                     return_path: bool = False):
    """DPM-Solver++(2M) along the increasing grid ``times`` from ``x`` at ``times[0]`` (equations in the
    module docstring). NFE = ``len(times) − 1``."""
    return _multistep(velocity, x, _check_grid(times), 2, 1.0, cond, return_path)


def _multistep(velocity, x, times, order, sigma0, cond, return_path):
    path = [x] if return_path else None
    previous = None  # (λ of the previous evaluation, its x̂1)
    for t, t_next in zip(times[:-1], times[1:]):
        d_now = _data_prediction(velocity, x, t, cond)
        c_x, c_d = _coefficients(t, t_next, sigma0)
        lam, lam_next = _lambda(t, sigma0), _lambda(t_next, sigma0)
        d = d_now
        if order == 2 and previous is not None and all(map(math.isfinite, (previous[0], lam, lam_next))):
            r = (lam - previous[0]) / (lam_next - lam)
            d = d_now + (d_now - previous[1]) / (2.0 * r)
        x = c_x * x + c_d * d
        previous = (lam, d_now)
        if path is not None:
            path.append(x)
    return (x, torch.stack(path)) if return_path else x


def start_at(x0: Tensor, t: float, sigma0: float = 1.0) -> Tensor:
    """The base ``x0 ~ N(0, σ0² I)`` put at time ``t`` as diffusers puts its noise at its first timestep:
    ``x_t = x0 √(t² + σ0² (1 − t)²) / σ0`` (module docstring)."""
    return x0 * (math.sqrt(t * t + sigma0 * sigma0 * (1.0 - t) ** 2) / sigma0)


def discrete_timesteps(spacing: str, steps: int, num_train_timesteps: int,
                       steps_offset: int = 0) -> list[int]:
    """diffusers ``DDIMScheduler.set_timesteps(steps)``'s timesteps (decreasing) for ``spacing``
    ``leading``, ``trailing`` or ``linspace``, as its code computes them."""
    n, k = int(num_train_timesteps), int(steps)
    if k < 1 or k > n:
        raise ValueError(f"steps must be in [1, {n}] for a schedule of {n} timesteps, got {steps}")
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, k).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, k) * (n // k)).round()[::-1].copy().astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / k)).astype(np.int64) - 1
    else:
        raise ValueError(f"spacing {spacing!r} is not one of {', '.join(VP_SPACINGS)}")
    return [int(v) for v in ts]


def grid(spacing: str, steps: int, teacher=None, sigma0: float | None = None) -> Tensor:
    """The increasing float64 grid of our times (ending at 1) of ``steps`` sampler steps for ``spacing``
    (module docstring). ``teacher``: a :class:`~flowmaps.teachers.TeacherVelocity` (its ``schedule`` for
    the VP spacings, its well-conditioned range ``t_lo``/``t_hi`` for ``uniform_lambda``) or None."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if sigma0 is None:
        sigma0 = float(getattr(teacher, "sigma0", 1.0))
    if spacing == "uniform_t":
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if spacing == "uniform_lambda":
        lo, hi = well_conditioned_range(teacher)
        lam = torch.linspace(_lambda(lo, sigma0), _lambda(hi, sigma0), steps + 1, dtype=torch.float64)
        inner = torch.sigmoid(lam[1:-1] + math.log(sigma0))
        one = torch.ones(1, dtype=torch.float64)
        return torch.cat([0 * one, inner, one])
    if spacing in VP_SPACINGS:
        schedule = getattr(teacher, "schedule", None)
        if schedule is None:
            raise ValueError(f"spacing {spacing!r} needs a VP teacher with a discrete schedule "
                             "(diffusers_vp); use uniform_t or uniform_lambda")
        offset = int(getattr(teacher, "steps_offset", 0) or 0)
        ts = discrete_timesteps(spacing, steps, schedule.num_timesteps, offset)
        ts = [min(max(n, 0), schedule.num_timesteps - 1) for n in ts]
        taus = schedule.tau_of_timesteps(torch.tensor(ts, dtype=torch.long))  # decreasing n: increasing t
        return torch.cat([taus, torch.ones(1, dtype=torch.float64)])
    raise ValueError(f"spacing {spacing!r} is not one of {', '.join(SPACINGS)}")


def well_conditioned_range(teacher) -> tuple[float, float]:
    """``(t_lo, t_hi)``: where the teacher's conversion is well conditioned: its ``tau_start`` (the
    noise end it was given) or its ``tau_range``, within ``[1e-3, 1 − 1e-3]`` (flow teachers, whose range
    is ``[0, 1]``: λ from −6.9 to 6.9)."""
    lo, hi = getattr(teacher, "tau_range", (0.0, 1.0))
    lo = max(float(getattr(teacher, "tau_start", lo) or lo), lo, 1e-3)
    return lo, min(float(hi), 1.0 - 1e-3)


def sample(velocity: Callable, x0: Tensor, sampler: str, steps: int, spacing: str,
           cond: Tensor | None = None) -> Tensor:
    """``steps`` steps of ``sampler`` (``ddim`` or ``dpmpp_2m``) from base points ``x0`` (``t = 0``) on
    ``spacing``'s grid; a grid starting after 0 (the VP spacings) starts from the base put there as
    diffusers puts its noise (:func:`start_at`)."""
    sigma0 = float(getattr(velocity, "sigma0", 1.0))
    times = grid(spacing, steps, velocity, sigma0)
    x = start_at(x0, float(times[0]), sigma0) if float(times[0]) > 0 else x0
    if sampler == "ddim":
        return ddim(velocity, x, times, cond=cond)
    if sampler == "dpmpp_2m":
        return dpm_solver_pp_2m(velocity, x, times, cond=cond)
    raise ValueError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")


# --- the user's own diffusers scheduler ----------------------------------------------------------

class SchedulerRun:
    """The user's diffusers scheduler as a sampler of the teacher's own network: a fresh copy
    (``from_config`` of the scheduler's config, or another class of its ``compatibles`` named by
    ``name``) is set to ``k`` steps, and ``z ← scheduler.step(model(scale_model_input(z, n), n), n, z)``
    runs over its timesteps from ``z = init_noise_sigma · x0 / σ0`` (the base as its unit noise).
    Its final ``z`` is the sample (diffusers returns it as the data). NFE: the network calls made."""

    def __init__(self, teacher, name: str = "own"):
        scheduler = getattr(teacher, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"{getattr(teacher, 'name', 'the teacher')} has no diffusers scheduler "
                             "(teachers of the diffusers_vp and diffusers_flow adapters do)")
        classes = {type(scheduler).__name__: type(scheduler)}
        classes.update({c.__name__: c for c in getattr(scheduler, "compatibles", None) or []
                        if isinstance(c, type)})
        if name == "own":
            cls = type(scheduler)
        elif name in classes:
            cls = classes[name]
        else:
            raise ValueError(f"scheduler {name!r} is not compatible with {type(scheduler).__name__} "
                             f"(its compatibles: {', '.join(sorted(classes))})")
        self.teacher, self.cls, self.config = teacher, cls, scheduler.config
        self.name = cls.__name__

    def __call__(self, x0: Tensor, steps: int, cond: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        teacher = self.teacher
        scheduler = self.cls.from_config(self.config)
        scheduler.set_timesteps(int(steps), device=x0.device)
        z = x0 / teacher.sigma0 * float(getattr(scheduler, "init_noise_sigma", 1.0))
        extras = dict(teacher.extras)
        if cond is not None:
            extras[teacher.cond_kwarg] = cond
        scale = float(getattr(teacher, "timestep_scale", 0.0) or 0.0)
        train_steps = float(getattr(self.config, "num_train_timesteps", 1000) or 1000)
        nfe = 0
        options = {"generator": generator} if "generator" in _step_parameters(scheduler) else {}
        for n in scheduler.timesteps:
            scale_input = getattr(type(scheduler), "scale_model_input", None)
            zin = scheduler.scale_model_input(z, n) if scale_input is not None else z
            u = torch.full((z.shape[0],), float(n), dtype=z.dtype, device=z.device)
            if scale:
                u = u * (scale / train_steps)
            out = teacher._call(teacher.model, zin, u, extras)
            out = getattr(out, "sample", out) if not isinstance(out, Tensor) else out
            if isinstance(out, (tuple, list)):
                out = out[0]
            nfe += 1
            z = scheduler.step(out, n, z, **options).prev_sample
        return z, nfe


def _step_parameters(scheduler) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(scheduler.step).parameters)
    except (TypeError, ValueError):
        return ()


def scheduler_sample(teacher, x0: Tensor, steps: int, name: str = "own", cond: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """``(samples, NFE)`` of the teacher's diffusers scheduler (:class:`SchedulerRun`) at ``steps``."""
    return SchedulerRun(teacher, name)(x0, steps, cond, generator)

