"""DDIM and DPM-Solver++(2M) in our convention (flowmaps.teachers.samplers) against exact answers and
against diffusers' own schedulers, and the noise end of ε-prediction VP teachers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flowmaps as fm
from flowmaps import teachers
from flowmaps.teachers import samplers as S
from flowmaps.teachers.adapters import gaussian_velocity

torch.set_default_dtype(torch.float32)


def gaussian_target(sigma0: float = 1.0):
    return fm.exact.Gaussian([1.5, -0.7], std=[0.3, 2.0], interpolant=fm.Linear(sigma0))


# --- exact answers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_exact_for_a_constant_data_prediction(sampler):
    """Data at one point c: x̂1 ≡ c, b_t(x) = (c − x)/(1 − t); both samplers land on c in one step from
    anywhere, and every intermediate state is t c + (1 − t) x0 (DDIM keeps both predictions)."""
    c = torch.tensor([[0.3, -2.0]], dtype=torch.float64)
    velocity = lambda x, t: (c - x) / (1 - t)[:, None]  # noqa: E731
    x0 = torch.randn(5, 2, dtype=torch.float64)
    times = torch.tensor([0.0, 0.2, 0.55, 0.9, 1.0], dtype=torch.float64)
    run = S.ddim if sampler == "ddim" else S.dpm_solver_pp_2m
    x, path = run(velocity, x0, times, return_path=True)
    expected = times[:, None, None] * c + (1 - times[:, None, None]) * x0
    torch.testing.assert_close(path, expected, rtol=0, atol=1e-13)
    one_step = run(velocity, x0, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(one_step, c.expand(5, 2), rtol=0, atol=1e-13)


def test_ddim_is_euler_in_the_linear_path():
    """x' = t' x̂1 + (1 − t') x̂0 with x̂1 = x + (1 − t) b, x̂0 = x − t b is x + (t' − t) b."""
    target = gaussian_target()
    x0 = torch.randn(7, 2, dtype=torch.float64)
    times = torch.tensor([0.0, 0.1, 0.4, 0.8, 1.0], dtype=torch.float64)
    euler = fm.solve_ode(target.velocity, x0, "euler", grid=times).x
    torch.testing.assert_close(S.ddim(target.velocity, x0, times), euler, rtol=0, atol=1e-13)


def observed_orders(run, target, x0, t0, t1, ks, spacing):
    exact = target.flow(x0, t0, t1)
    errors = []
    for k in ks:
        if spacing == "t":
            times = torch.linspace(t0, t1, k + 1, dtype=torch.float64)
        else:  # uniform in λ = log(t / ((1 − t) σ0))
            lam = lambda t: math.log(t / (1 - t))  # noqa: E731
            times = torch.sigmoid(torch.linspace(lam(t0), lam(t1), k + 1, dtype=torch.float64))
        errors.append(float((run(target.velocity, x0, times) - exact).abs().max()))
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])], errors


@pytest.mark.parametrize("sampler,order,span,spacing", [
    ("ddim", 1, (0.0, 1.0), "t"), ("ddim", 1, (0.05, 0.95), "t"), ("ddim", 1, (0.02, 0.98), "lambda"),
    ("dpmpp_2m", 2, (0.05, 0.95), "t"), ("dpmpp_2m", 2, (0.02, 0.98), "lambda")])
def test_observed_order_on_gaussian_data(sampler, order, span, spacing):
    """Gaussian data N(m, diag(0.3², 2²)), closed-form velocity and flow: the error at the end halves
    (DDIM, order 1) or quarters (DPM-Solver++(2M), order 2) when the steps double, uniform in t or in
    λ. (On the whole of [0, 1] uniform in t, DPM-Solver++'s steps next to the ends have λ-sizes that do
    not shrink with the step count, and its observed order creeps up slowly: 1.70, 1.73, 1.76 at
    16 → 128 steps.)"""
    target = gaussian_target()
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = S.ddim if sampler == "ddim" else S.dpm_solver_pp_2m
    orders, errors = observed_orders(run, target, x0, *span, (32, 64, 128, 256), spacing)
    assert abs(orders[-1] - order) < 0.1, (orders, errors)
    assert all(p > order - 0.4 for p in orders), (orders, errors)


# --- spacings and diffusers' own schedulers ----------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 4, 10, 50])
@pytest.mark.parametrize("offset", [0, 1])
def test_discrete_timesteps_are_diffusers_ddim(spacing, steps, offset):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    assert S.discrete_timesteps(spacing, steps, 1000, offset) == scheduler.timesteps.tolist()


class SmoothModel(nn.Module):
    """A fixed smooth float64 network ``model(sample, timestep)`` standing for a trained denoiser."""

    def __init__(self, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.randn(dim + 1, 32, generator=g, dtype=torch.float64) / 2
        self.w2 = torch.randn(32, dim, generator=g, dtype=torch.float64) / 4

    def forward(self, sample, timestep):
        t = timestep.to(torch.float64).reshape(-1).expand(sample.shape[0])[:, None] / 1000
        return torch.tanh(torch.cat([sample, t], 1) @ self.w1) @ self.w2 + 0.5 * sample


def diffusers_trajectory(scheduler, model, z):
    states = [z]
    for n in scheduler.timesteps:
        z = scheduler.step(model(z, n.reshape(1)), n, z).prev_sample
        states.append(z)
    return torch.stack(states)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,steps", [("leading", 4), ("leading", 10), ("trailing", 5),
                                           ("trailing", 1)])
@pytest.mark.parametrize("betas", ["linear", "squaredcos_cap_v2"])
def test_our_ddim_reproduces_diffusers_ddim(prediction, spacing, steps, betas):
    """diffusers' DDIMScheduler (η = 0, set_alpha_to_one) and our DDIM on the teacher converted exactly
    (noise_end="exact"), same model and timesteps: z_n = k_n x_n at every step, to float64 precision."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule=betas, prediction_type=prediction, clip_sample=False,
                              timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    # its tables in float64, so that its step computes √ᾱ in float64 as we do (they are float32)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    model = SmoothModel()
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_trajectory(scheduler, model, z)
    teacher = teachers.diffusers_vp(model, scheduler, noise_end="exact")
    times = S.grid(spacing, steps, teacher)
    assert times[:-1].tolist() == teacher.schedule.tau_of_timesteps(scheduler.timesteps).tolist()
    x, ours = S.ddim(teacher, S.start_at(z, float(times[0])), times, return_path=True)
    k = teacher.schedule.state_scale(times)  # z = k x; 1 at t = 1
    torch.testing.assert_close(k[:, None, None] * ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps", [("linspace", 2), ("linspace", 6), ("leading", 8),
                                           ("trailing", 20)])
def test_our_dpm_solver_reproduces_diffusers_dpm_solver(prediction, spacing, steps):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma zero) and
    ours, same model and timesteps. diffusers steps in float32 (its ``step`` casts the sample and the
    sigmas to float32), so the agreement is float32's, not float64's."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                                            timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    model = SmoothModel()
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_trajectory(scheduler, model, z)
    teacher = teachers.diffusers_vp(model, scheduler, noise_end="exact")
    times = torch.cat([teacher.schedule.tau_of_timesteps(scheduler.timesteps),
                       torch.ones(1, dtype=torch.float64)])
    x, ours = S.dpm_solver_pp_2m(teacher, S.start_at(z, float(times[0])), times, return_path=True)
    k = teacher.schedule.state_scale(times)
    torch.testing.assert_close(k[:, None, None] * ours, theirs, rtol=2e-5, atol=2e-5)
    # and DDIM is not DPM-Solver++ here (the test sees the second-order term; with 2 steps both are
    # first order: the first has no previous prediction, the last goes to σ = 0)
    if steps > 2:
        assert (S.ddim(teacher, S.start_at(z, float(times[0])), times) - theirs[-1]).abs().max() > 1e-3


def test_scheduler_run_is_the_users_scheduler():
    """SchedulerRun runs the scheduler's own set_timesteps/step on the network: a compatible class by
    name, the base as its unit noise; it is our DDIM on leading spacing, NFE = steps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    model = SmoothModel()
    teacher = teachers.diffusers_vp(model, scheduler, noise_end="exact")
    x0 = torch.randn(6, 3, dtype=torch.float64)
    z, nfe = S.scheduler_sample(teacher, x0, 4, "DDIMScheduler")
    assert nfe == 4  # (diffusers keeps ᾱ in float32, so the agreement is float32's)
    torch.testing.assert_close(z, S.sample(teacher, x0, "ddim", 4, "leading"), rtol=1e-5, atol=1e-6)
    z, nfe = S.scheduler_sample(teacher, x0, 3, "own", generator=torch.Generator().manual_seed(0))
    assert nfe == 3 and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="not compatible"):
        S.SchedulerRun(teacher, "FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ValueError, match="has no diffusers scheduler"):
        S.SchedulerRun(teachers.torchcfm(lambda x: x[:, :2], call="concat"))


def test_scheduler_run_of_a_flow_teacher_is_euler():
    """FlowMatchEulerDiscreteScheduler's own steps on the network are Euler steps of the adapted velocity
    at the same σ's (our t = 1 − σ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = SmoothModel()
    teacher = teachers.diffusers_flow(model, scheduler)
    x0 = torch.randn(6, 3, dtype=torch.float64)
    z, nfe = S.scheduler_sample(teacher, x0, 5)
    run = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    run.set_timesteps(5)
    times = 1.0 - run.sigmas.double()
    assert nfe == 5
    torch.testing.assert_close(z, S.ddim(teacher, x0, times), rtol=1e-5, atol=1e-5)


def test_grids_and_bad_names():
    teacher = teachers.diffusers_vp(SmoothModel(), __import__("diffusers").DDPMScheduler())
    for spacing in S.SPACINGS:
        g = S.grid(spacing, 6, teacher)
        assert g.numel() == 7 and g[-1] == 1.0 and bool((g[1:] > g[:-1]).all())
    g = S.grid("uniform_lambda", 4, teacher)  # 0, three interior times of 4 λ-steps over [lo, hi], 1
    lo, hi = teacher.tau_start, teacher.tau_range[1]
    lam = torch.log(g[1:-1] / (1 - g[1:-1]))
    ends = torch.tensor([math.log(lo / (1 - lo)), math.log(hi / (1 - hi))], dtype=torch.float64)
    torch.testing.assert_close(lam, ends[0] + (ends[1] - ends[0]) * torch.tensor([0.25, 0.5, 0.75],
                               dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert g[0] == 0.0 and S.grid("uniform_lambda", 1, teacher).tolist() == [0.0, 1.0]
    flow = teachers.torchcfm(lambda x: x[:, :2], call="concat")
    with pytest.raises(ValueError, match="needs a VP teacher"):
        S.grid("leading", 4, flow)
    with pytest.raises(ValueError, match="not one of"):
        S.grid("karras", 4, flow)
    with pytest.raises(ValueError, match="not one of"):
        S.sample(flow, torch.zeros(2, 2), "heun", 2, "uniform_t")
    with pytest.raises(ValueError, match="increase strictly"):
        S.ddim(flow, torch.zeros(2, 2), torch.tensor([0.0, 0.5, 0.5]))


# --- the noise end ---------------------------------------------------------------------------------

def test_gaussian_velocity_is_the_exact_velocity_of_standard_normal_data():
    for sigma0 in (1.0, 0.5):
        target = fm.exact.Gaussian([0.0, 0.0], std=1.0, interpolant=fm.Linear(sigma0))
        x = torch.randn(9, 2, dtype=torch.float64)
        t = torch.rand(9, dtype=torch.float64)
        torch.testing.assert_close(gaussian_velocity(x, t, sigma0), target.velocity(x, t))
        # and its flow from 0 to t is start_at
        torch.testing.assert_close(target.flow(x, 0.0, 0.3), S.start_at(x, 0.3, sigma0))


def test_noise_end_defaults_and_options():
    """ε-prediction: by default the teacher below tau_start is held at its value there ('clamp') and
    is the exact conversion above it; 'gaussian' is the velocity of N(0, I) data below tau_start;
    v-prediction keeps the whole schedule; 'exact' is the behaviour before."""
    from diffusers import DDPMScheduler

    model = SmoothModel()
    eps = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = torch.randn(8, 3, dtype=torch.float64)
    lo, hi = torch.full((8,), 0.01, dtype=torch.float64), torch.full((8,), 0.3, dtype=torch.float64)
    default, exact = teachers.diffusers_vp(model, eps), teachers.diffusers_vp(model, eps, noise_end="exact")
    start = teachers.adapters.DEFAULT_TAU_START
    assert default.noise_end == "clamp" and default.tau_start == start
    torch.testing.assert_close(default(x, lo), exact(x, torch.full_like(lo, start)))
    torch.testing.assert_close(default(x, hi), exact(x, hi))
    assert not torch.allclose(exact(x, lo), default(x, lo))
    gauss = teachers.diffusers_vp(model, eps, noise_end="gaussian", tau_start=0.1)
    torch.testing.assert_close(gauss(x, lo), gaussian_velocity(x, lo, 1.0))
    torch.testing.assert_close(gauss(x, hi), exact(x, hi))
    mixed = torch.tensor([0.01, 0.3] * 4, dtype=torch.float64)
    torch.testing.assert_close(gauss(x, mixed)[::2], gauss(x, lo)[::2])
    torch.testing.assert_close(gauss(x, mixed)[1::2], gauss(x, hi)[1::2])
    v = teachers.diffusers_vp(model, DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                                   prediction_type="v_prediction"))
    assert v.noise_end == "exact" and v.tau_start is None
    with pytest.raises(ValueError, match="noise_end must be one of"):
        teachers.diffusers_vp(model, eps, noise_end="soft")
    with pytest.raises(ValueError, match="tau_start"):
        teachers.diffusers_vp(model, eps, noise_end="gaussian", tau_start=1.5)


# --- flowmaps evaluate: the rows of a diffusers teacher ------------------------------------------------

DDPM_USER = '''
"""User code: a diffusers-style ε-network on (x, timestep) and its DDPMScheduler."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1).expand(sample.shape[0])
        return 0.5 * torch.tanh(self.lin(torch.cat([sample, t[:, None] / 1000], 1))) + 0.9 * sample


def make():
    from diffusers import DDPMScheduler
    return Net(), DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
'''


def test_evaluate_adds_scheduler_ddim_and_dpm_rows_for_a_diffusers_teacher(tmp_path, monkeypatch):
    """`flowmaps distill` from a diffusers ε-model (teacher.factory + diffusers_vp), then `flowmaps
    evaluate`: rows of its own scheduler (DDPMScheduler), of DDIMScheduler by name, and of our DDIM
    and DPM-Solver++(2M) at NFE = steps, in the table and the JSON; diffusers' DDIM (leading) and ours on
    leading spacing give the same samples, so the same W2."""
    import json

    from flowmaps.cli import main

    (tmp_path / "ddpm_user.py").write_text(DDPM_USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lmd"
    assert main(["distill", "--preset", "gmm", "--quiet", "train.steps=3", "data.n_train=2000",
                 "data.n_eval=500", "teacher.factory=ddpm_user:make", "teacher.adapter=diffusers_vp",
                 "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--steps", "1,2,4", "--no-dopri5",
                 "--n", "300", "eval.schedulers=[own,DDIMScheduler]", "eval.spacings=[auto,trailing]",
                 "eval.solvers=[euler]"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    got = {(r["sampler"], r["steps"]): r for r in rows}
    for sampler in ("DDPMScheduler", "DDIMScheduler", "ddim (leading)", "ddim (trailing)",
                    "dpmpp_2m (linspace)", "dpmpp_2m (trailing)"):
        for k in (1, 2, 4):
            assert got[(sampler, k)]["nfe"] == k, (sampler, k)
    for k in (1, 2, 4):
        assert got[("DDIMScheduler", k)]["w2"] == pytest.approx(got[("ddim (leading)", k)]["w2"], rel=1e-3)
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "DDIMScheduler" in table and "dpmpp_2m (linspace)" in table
    assert (tmp_path / "eval" / "plots" / "w2_vs_nfe.png").is_file()


def test_evaluate_says_in_its_own_sentence_that_it_skipped_the_fast_samplers(tmp_path, capsys):
    """A run whose σ0 is per dimension (``interpolant.sigma0=data`` on vectors) has no DDIM / DPM-Solver
    rows: ``flowmaps evaluate`` prints that as a note of its own, not as an ``evaluated …`` row line."""
    from flowmaps.cli import main

    out = tmp_path / "fmm"
    assert main(["train", "--preset", "gmm", "--objective", "fmm", "--quiet", "train.steps=2",
                 "data.n_train=500", "data.n_eval=200", "interpolant.sigma0=data", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--steps", "1", "--no-dopri5",
                 "--n", "100", "--teacher", "exact", "eval.samplers=[ddim]", "eval.solvers=[euler]"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert ("  skipped the DDIM / DPM-Solver rows of eval.samplers: they need the linear interpolant with "
            "one sigma0") in lines, lines
    assert not any("evaluated skipped" in line for line in lines), lines
    rows = [line for line in lines if line.startswith("  evaluated ")]
    assert rows and all(" steps=" in line and " nfe=" in line for line in rows), lines
