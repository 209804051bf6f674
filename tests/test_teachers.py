"""Teacher adapters against closed forms, with the real packages (torchcfm, flow_matching, diffusers).

For Gaussian data ``x1 ~ N(m, diag(s²))`` every library's regression target has a closed-form conditional
mean: on a path ``z = A x1 + S ε`` the posterior means are ``x̂1 = m + A s² (z − A m)/(A² s² + S²)`` and
``ε̂ = S (z − A m)/(A² s² + S²)`` (:func:`posterior`). Each test builds a model *of the library's kind*
whose forward returns the exact prediction in the library's own convention (velocity, ε, v, x1, at the
library's time), adapts it, and compares with our exact velocity ``Gaussian(m, s, Linear(σ0)).velocity``
(:mod:`flowmaps.exact`, an independent formula ``b = β̇ m + (ċ/c)(x − β m)``) at many ``(x, t)``. In float64
the conversions agree to ~1e-13; ``python tests/test_teachers.py`` prints the error of every case.

Library conventions are checked with the libraries' own code (torchcfm's ``ConditionalFlowMatcher``,
flow_matching's ``AffineProbPath``, diffusers' ``add_noise``/``scale_noise``/``step``), not restated.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import flowmaps.teachers as teachers
from flowmaps import Linear
from flowmaps.exact import Gaussian
from flowmaps.objectives import LMD

torch.set_num_threads(1)
F64 = torch.float64

MEAN = torch.linspace(-1.5, 1.0, 16, dtype=F64)
STD = torch.linspace(0.3, 1.4, 16, dtype=F64)
IMAGE = (1, 4, 4)  # the 16 dimensions as a 1×4×4 image, for diffusers' image models
SIGMA0S = (1.0, 0.6)


def posterior(z: torch.Tensor, A: torch.Tensor, S: torch.Tensor):
    """``(E[x1 | z], E[ε | z])`` for ``z = A x1 + S ε``, per-sample ``A, S`` of shape (B,), z (B, 16)."""
    m, s2 = MEAN.to(z.dtype), (STD ** 2).to(z.dtype)
    A, S = A.to(z.dtype)[:, None], S.to(z.dtype)[:, None]
    r = (z - A * m) / (A * A * s2 + S * S)
    return m + A * s2 * r, S * r


def exact(sigma0: float) -> Gaussian:
    return Gaussian(MEAN, STD, interpolant=Linear(sigma0))


def states(sigma0: float, n: int = 400, lo: float = 0.0, hi: float = 1.0, seed: int = 0,
           dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, t)``: ``n`` points of our interpolant's marginals at times spread over ``[lo, hi]``."""
    g = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    t[:4] = torch.tensor([lo, hi, (lo + hi) / 2, lo + 0.01 * (hi - lo)], dtype=F64)
    x1 = MEAN + STD * torch.randn(n, 16, generator=g, dtype=F64)
    x0 = sigma0 * torch.randn(n, 16, generator=g, dtype=F64)
    x = (1 - t)[:, None] * x0 + t[:, None] * x1
    return x.to(dtype), t.to(dtype)


def max_error(velocity, sigma0: float, shape=(16,), dtype=F64, **kw) -> float:
    x, t = states(sigma0, dtype=dtype, **kw)
    with torch.no_grad():
        got = velocity(x.reshape(-1, *shape), t).reshape(-1, 16)
    want = exact(sigma0).velocity(x.double(), t.double())
    return float((got.double() - want).abs().max())


# --- torchcfm ---------------------------------------------------------------------------------------

class ExactOnConcat(nn.Module):
    """torchcfm's MLP body: input ``[x, t]``, output the exact ``E[x1 − x0 | x_t]`` of its path."""

    def forward(self, xt):
        x, t = xt[:, :-1], xt[:, -1]
        x1, eps = posterior(x, t, 1 - t)
        return x1 - eps


class ExactTX(nn.Module):
    """A torchcfm ``(t, x)`` model (the call order of its ``UNetModelWrapper``)."""

    def forward(self, t, x, y=None):
        x1, eps = posterior(x, t, 1 - t)
        return x1 - eps


def torchcfm_exact(call: str):
    from torchcfm.models.models import MLP

    if call == "tx":
        return ExactTX()
    mlp = MLP(dim=16, time_varying=True)   # torchcfm's own class, its body replaced by the exact field
    mlp.net = ExactOnConcat()
    return mlp


def test_torchcfm_time_and_path_are_ours():
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), torch.rand(64, generator=g)
    cfm = ConditionalFlowMatcher(sigma=0.0)
    _, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1, t)
    assert torch.allclose(xt, Linear().interpolate(x0, x1, t), atol=1e-6)
    assert torch.allclose(ut, Linear().time_derivative(x0, x1, t), atol=1e-6)


@pytest.mark.parametrize("sigma0", SIGMA0S)
@pytest.mark.parametrize("call", ["concat", "tx"])
def test_torchcfm_adapter_is_the_exact_velocity(call, sigma0):
    model = torchcfm_exact(call)
    velocity = teachers.torchcfm(model, sigma0=sigma0)
    assert velocity.name == f"torchcfm[{call}]"  # the call order was detected from forward's signature
    assert max_error(velocity, sigma0) < 1e-12
    assert max_error(velocity, sigma0, dtype=torch.float32) < 2e-5


def test_torchcfm_passes_the_model_output_through_unchanged():
    """σ0 = 1: their path is ours, so b(x, t) is the model's output bit for bit (P = 0, Q = 1)."""
    from torchcfm.models.models import MLP

    torch.manual_seed(0)
    mlp = MLP(dim=2, w=16, time_varying=True)
    x, t = torch.randn(50, 2), torch.rand(50)
    with torch.no_grad():
        assert torch.equal(teachers.torchcfm(mlp)(x, t), mlp(torch.cat([x, t[:, None]], 1)))


def test_torchcfm_unet_takes_t_then_x():
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(0)
    unet = UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1,),
                            attention_resolutions="4", num_head_channels=8).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    velocity = teachers.torchcfm(unet)
    with torch.no_grad():
        assert velocity.name == "torchcfm[tx]" and torch.equal(velocity(x, t), unet(t, x))


# --- flow_matching ----------------------------------------------------------------------------------

def flow_matching_schedulers():
    from flow_matching.path.scheduler import (CondOTScheduler, CosineScheduler, LinearVPScheduler,
                                              PolynomialConvexScheduler, VPScheduler)

    return {"condot": CondOTScheduler(), "cosine": CosineScheduler(), "vp": VPScheduler(),
            "linear_vp": LinearVPScheduler(), "poly2": PolynomialConvexScheduler(2)}


def flow_matching_exact(scheduler, prediction: str):
    """A flow_matching ``ModelWrapper`` predicting, on the path ``x_t = σ_t x_0 + α_t x_1`` of
    ``scheduler``, ``dx_t`` (velocity), ``x_1`` (x1) or ``x_0`` (epsilon) exactly."""
    from flow_matching.utils import ModelWrapper

    class Exact(ModelWrapper):
        def forward(self, x, t, **extras):
            out = scheduler(t)
            x1, eps = posterior(x, out.alpha_t, out.sigma_t)
            if prediction == "x1":
                return x1
            if prediction == "epsilon":
                return eps
            return out.d_alpha_t.to(x.dtype)[:, None] * x1 + out.d_sigma_t.to(x.dtype)[:, None] * eps

    return Exact(nn.Identity())


def test_flow_matching_condot_path_is_ours():
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    g = torch.Generator().manual_seed(2)
    x0, x1, t = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), torch.rand(64, generator=g)
    sample = AffineProbPath(CondOTScheduler()).sample(x_0=x0, x_1=x1, t=t)
    assert torch.allclose(sample.x_t, Linear().interpolate(x0, x1, t), atol=1e-6)
    assert torch.allclose(sample.dx_t, Linear().time_derivative(x0, x1, t), atol=1e-6)


@pytest.mark.parametrize("sigma0", SIGMA0S)
@pytest.mark.parametrize("name", ["condot", "cosine", "vp", "linear_vp", "poly2"])
@pytest.mark.parametrize("prediction", ["velocity", "x1", "epsilon"])
def test_flow_matching_adapter_is_the_exact_velocity(name, prediction, sigma0):
    scheduler = flow_matching_schedulers()[name]
    velocity = teachers.flow_matching(flow_matching_exact(scheduler, prediction),
                                      scheduler=None if name == "condot" else scheduler,
                                      prediction=prediction, sigma0=sigma0)
    lo, hi = velocity.tau_range
    # ε- and x1-prediction divide by A and S, poly2's velocity by α̇σ − σ̇α = 2u: away from where they vanish
    edge = {"velocity": 0.02 if name == "poly2" else 0.0, "x1": 0.02, "epsilon": 0.02}[prediction]
    err = max_error(velocity, sigma0, lo=max(lo, edge), hi=min(hi, 1 - edge))
    assert err < 1e-9, err


def test_flow_matching_vp_scheduler_clamps_to_its_range():
    """VPScheduler's SNR at u = 0 is e^-5 / √(1 − e^-10) > 0: below the matching τ the velocity is the
    exact one at that τ (the model is never asked outside u ∈ [0, 1])."""
    scheduler = flow_matching_schedulers()["vp"]
    velocity = teachers.flow_matching(flow_matching_exact(scheduler, "velocity"), scheduler=scheduler)
    lo = velocity.tau_range[0]
    assert 0.005 < lo < 0.01 and velocity.tau_range[1] > 0.999
    x, _ = states(1.0, n=50)
    with torch.no_grad():
        got = velocity(x, torch.zeros(50, dtype=F64))
    assert torch.allclose(got, exact(1.0).velocity(x, torch.full((50,), lo, dtype=F64)), atol=1e-10)


# --- diffusers flow matching ------------------------------------------------------------------------

def diffusers_output(sample):
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput(sample=sample)


class ExactFlowModel(nn.Module):
    """A diffusers flow-matching model: ``model(sample, timestep)`` at noise level ``σ = timestep/N`` of
    ``x_σ = (1 − σ) x1 + σ ε``, predicting ``ε − x1`` exactly, returned as a diffusers output."""

    def __init__(self, num_train_timesteps: float = 1000.0):
        super().__init__()
        self.n = num_train_timesteps
        self.timesteps = []

    def forward(self, sample, timestep):
        self.timesteps.append(timestep.detach().clone())
        sigma = timestep.to(F64) / self.n
        flat = sample.reshape(sample.shape[0], -1)
        x1, eps = posterior(flat, 1 - sigma, sigma)
        return diffusers_output((eps - x1).reshape(sample.shape))


def test_diffusers_flow_noising_is_our_interpolant_reversed():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    g = torch.Generator().manual_seed(3)
    x1, noise = torch.randn(5, *IMAGE, generator=g), torch.randn(5, *IMAGE, generator=g)
    k = 300
    noisy = scheduler.scale_noise(x1, scheduler.timesteps[k:k + 1], noise)
    sigma = float(scheduler.sigmas[k])
    assert float(scheduler.timesteps[k]) == pytest.approx(1000 * sigma, rel=1e-6)
    ours = Linear().interpolate(noise, x1, torch.full((5,), 1 - sigma))
    assert torch.allclose(noisy, ours, atol=1e-6)


@pytest.mark.parametrize("sigma0", SIGMA0S)
def test_diffusers_flow_adapter_is_the_exact_velocity(sigma0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    velocity = teachers.diffusers_flow(ExactFlowModel(), FlowMatchEulerDiscreteScheduler(), sigma0=sigma0)
    assert max_error(velocity, sigma0, shape=IMAGE) < 1e-12
    assert max_error(velocity, sigma0, shape=IMAGE, dtype=torch.float32) < 2e-5


def test_diffusers_flow_with_shift_matches_the_schedulers_own_sampler():
    """With ``shift=3`` the scheduler visits shifted noise levels but always calls the model at
    ``timestep = σ · 1000`` of the state's true σ: its own Euler steps equal Euler steps of the adapted
    velocity on the grid ``t_i = 1 − σ_i`` (so the adapter is exact for any shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    model = ExactFlowModel()
    velocity = teachers.diffusers_flow(model, scheduler)
    x = torch.randn(20, *IMAGE, generator=torch.Generator().manual_seed(4))
    theirs, ours = x.clone(), x.clone()
    grid = 1.0 - scheduler.sigmas.double()
    for i, timestep in enumerate(scheduler.timesteps):
        out = model(theirs, timestep.expand(theirs.shape[0]))
        theirs = scheduler.step(out.sample, timestep, theirs).prev_sample
        ours = ours + float(grid[i + 1] - grid[i]) * velocity(ours, torch.full((20,), float(grid[i])))
    assert not torch.allclose(grid[1:-1], torch.linspace(0, 1, 7, dtype=F64)[1:-1], atol=0.05)  # shifted
    assert torch.allclose(theirs, ours, atol=2e-5), (theirs - ours).abs().max()


def test_diffusers_flow_refuses_inverted_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="invert_sigmas"):
        teachers.diffusers_flow(ExactFlowModel(), FlowMatchEulerDiscreteScheduler(invert_sigmas=True))


# --- diffusers VP (DDPM / DDIM) ---------------------------------------------------------------------

def continuous_abar(alphas_cumprod, timestep: torch.Tensor) -> torch.Tensor:
    """ᾱ at fractional timesteps: the log-SNR of the discrete schedule interpolated linearly with NumPy
    (an implementation independent of :class:`flowmaps.teachers.VPSchedule`)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = np.log(abar) - np.log1p(-abar)
    lam_t = np.interp(timestep.detach().double().numpy(), np.arange(abar.size), lam)
    return torch.from_numpy(1.0 / (1.0 + np.exp(-lam_t)))


class ExactVPModel(nn.Module):
    """A diffusers VP model: ``model(sample, timestep)`` on ``z = √ᾱ x1 + √(1 − ᾱ) ε`` predicting ε, v or x1
    exactly; ``discrete=True`` indexes ``alphas_cumprod`` at the nearest integer timestep (and records
    how far from an integer it was called)."""

    def __init__(self, scheduler, prediction_type: str, discrete: bool = False):
        super().__init__()
        self.abar, self.kind, self.discrete = scheduler.alphas_cumprod.double(), prediction_type, discrete
        self.offsets = []

    def forward(self, sample, timestep, class_labels=None):
        if self.discrete:
            n = timestep.double().round()
            self.offsets.append(float((timestep.double() - n).abs().max()))
            abar = self.abar[n.long()]
        else:
            abar = continuous_abar(self.abar, timestep)
        A, S = abar.sqrt(), (1 - abar).sqrt()
        flat = sample.reshape(sample.shape[0], -1)
        x1, eps = posterior(flat, A, S)
        out = {"epsilon": eps, "sample": x1,
               "v_prediction": A.to(flat.dtype)[:, None] * eps - S.to(flat.dtype)[:, None] * x1}[self.kind]
        return diffusers_output(out.reshape(sample.shape))


def vp_scheduler(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    return {"ddpm-linear-epsilon": lambda: DDPMScheduler(),
            "ddim-cosine-v": lambda: DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                   prediction_type="v_prediction"),
            "ddpm-scaled-sample": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, prediction_type="sample")}[name]()


VP_CASES = ("ddpm-linear-epsilon", "ddim-cosine-v", "ddpm-scaled-sample")


def test_diffusers_vp_noising_is_our_interpolant_scaled():
    """``add_noise`` at timestep n is our interpolant at ``τ = a/(a + s)`` times ``a + s``."""
    scheduler = vp_scheduler("ddpm-linear-epsilon")
    g = torch.Generator().manual_seed(5)
    x1, noise = torch.randn(4, 16, generator=g, dtype=F64), torch.randn(4, 16, generator=g, dtype=F64)
    for n in (0, 250, 999):
        abar = scheduler.alphas_cumprod[n].double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        z = scheduler.add_noise(x1, noise, torch.full((4,), n))
        ours = (a + s) * Linear().interpolate(noise, x1, torch.full((4,), float(a / (a + s)), dtype=F64))
        assert torch.allclose(z.double(), ours, atol=1e-6)


@pytest.mark.parametrize("sigma0", SIGMA0S)
@pytest.mark.parametrize("case", VP_CASES)
def test_diffusers_vp_adapter_is_the_exact_velocity(case, sigma0):
    scheduler = vp_scheduler(case)
    velocity = teachers.diffusers_vp(ExactVPModel(scheduler, scheduler.config.prediction_type), scheduler,
                                     sigma0=sigma0, noise_end="exact")
    lo, hi = velocity.tau_range
    assert 0 < lo < 0.1 and 0.9 < hi < 1
    assert max_error(velocity, sigma0, shape=IMAGE, lo=lo, hi=hi) < 1e-9


@pytest.mark.parametrize("case", VP_CASES)
def test_diffusers_vp_at_integer_timesteps_uses_the_discrete_schedule(case):
    """At ``τ_n = a_n/(a_n + s_n)`` the model is called at timestep n itself (to ~1e-9) and the velocity is
    exact with ``alphas_cumprod[n]`` read directly, no interpolation."""
    scheduler = vp_scheduler(case)
    model = ExactVPModel(scheduler, scheduler.config.prediction_type, discrete=True)
    velocity = teachers.diffusers_vp(model, scheduler, noise_end="exact")
    abar = scheduler.alphas_cumprod.double()[::37]
    tau = abar.sqrt() / (abar.sqrt() + (1 - abar).sqrt())
    x, _ = states(1.0, n=tau.numel())
    with torch.no_grad():
        got = velocity(x.reshape(-1, *IMAGE), tau).reshape(-1, 16)
    assert max(model.offsets) < 1e-8
    assert float((got - exact(1.0).velocity(x, tau)).abs().max()) < 1e-9


def test_diffusers_vp_clamps_outside_the_schedule():
    """noise_end="exact": the whole schedule, clamped at its ends (the default noise end of ε-models is
    tested in test_diffusion_samplers.py)."""
    scheduler = vp_scheduler("ddpm-linear-epsilon")
    velocity = teachers.diffusers_vp(ExactVPModel(scheduler, "epsilon"), scheduler, noise_end="exact")
    lo, hi = velocity.tau_range
    x, _ = states(1.0, n=30)
    for t, clamped in ((0.0, lo), (1.0, hi)):
        with torch.no_grad():
            got = velocity(x.reshape(-1, *IMAGE), torch.full((30,), t, dtype=F64)).reshape(-1, 16)
        want = exact(1.0).velocity(x, torch.full((30,), clamped, dtype=F64))
        assert torch.allclose(got, want, atol=1e-8)


def tiny_unet(out_channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_real_unet2d_as_vp_and_flow_teacher():
    """A real (random) UNet2DModel: the adapters call it as diffusers does and apply the formulas."""
    scheduler = vp_scheduler("ddpm-linear-epsilon")
    unet = tiny_unet()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    abar = scheduler.alphas_cumprod[torch.tensor([10, 400, 900] * 2)]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    tau = a / (a + s)
    with torch.no_grad():
        eps = unet((a + s)[:, None, None, None] * x, torch.tensor([10, 400, 900] * 2)).sample
        b = teachers.diffusers_vp(unet, scheduler, noise_end="exact")(x, tau)
        assert torch.allclose(b, (x - eps) / tau[:, None, None, None], atol=1e-4, rtol=1e-4)
        t = torch.rand(6, generator=torch.Generator().manual_seed(7))
        flow = teachers.diffusers_flow(unet)(x, t)
        assert torch.allclose(flow, -unet(x, 1000 * (1 - t)).sample, atol=1e-6)


def test_learned_variance_output_keeps_the_epsilon_channels():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(variance_type="learned_range")
    unet = tiny_unet(out_channels=2)
    x, tau = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    velocity = teachers.diffusers_vp(unet, scheduler, noise_end="exact")
    z, point = velocity.query(x, tau)
    with torch.no_grad():
        eps = unet(z, point.u.float()).sample[:, :1]
        assert torch.allclose(velocity(x, tau), (x - eps) / 0.5, atol=1e-5)


# --- the API: an adapted model is a teacher ---------------------------------------------------------

def test_an_adapted_model_distils_with_lmd_and_moves_with_to():
    """``teachers.torchcfm(model)`` is a velocity the objectives accept; the adapter is an nn.Module, so
    ``.to(dtype)`` converts the wrapped model too."""
    from torchcfm.models.models import MLP

    import flowmaps as fm

    torch.manual_seed(0)
    teacher = teachers.torchcfm(MLP(dim=2, w=16, time_varying=True)).to(F64)
    assert next(teacher.parameters()).dtype == F64
    model = fm.FlowMap(fm.MLP(dim=2, width=16, depth=2)).to(F64)
    out = LMD(Linear(), teacher)(model, torch.randn(32, 2, dtype=F64))
    out.loss.backward()
    assert torch.isfinite(out.loss) and any(p.grad is not None for p in model.parameters())


def test_bad_adapter_arguments_are_refused():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="sigma0"):
        teachers.torchcfm(ExactTX(), sigma0=[0.5, 1.0])
    with pytest.raises(ValueError, match="call"):
        teachers.torchcfm(ExactTX(), call="xt")
    with pytest.raises(ValueError, match="prediction_type"):
        teachers.diffusers_vp(ExactTX(), DDPMScheduler(), prediction_type="flow", noise_end="exact")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        teachers.diffusers_vp(ExactTX(), object(), noise_end="exact")
    with pytest.raises(TypeError, match="cond_kwarg"):
        teachers.torchcfm(torchcfm_exact("concat"))(torch.zeros(2, 16), torch.zeros(2), torch.zeros(2))


# --- installation ----------------------------------------------------------------------------------

def test_make_setup_installs_the_test_extra_and_no_torch_with_it():
    """The Makefile installs exactly the `test` extra of pyproject.toml, and the libraries that declare
    torch (torchcfm, flow-matching) with --no-deps, so the pinned CPU torch is never replaced."""
    root = Path(__file__).resolve().parents[1]
    extra = re.search(r"^test = \[(.*?)\]", (root / "pyproject.toml").read_text(), re.M | re.S).group(1)
    pinned = sorted(re.findall(r'"([^"]+)"', extra))
    make = (root / "Makefile").read_text()
    libs = {name: shlex.split(re.search(rf"^{name}\s*:=(.*)$", make, re.M).group(1))
            for name in ("TEST_LIBS", "TEST_LIBS_NODEPS")}
    assert sorted(libs["TEST_LIBS"] + libs["TEST_LIBS_NODEPS"]) == pinned
    assert {p.split("==")[0] for p in libs["TEST_LIBS_NODEPS"]} == {"torchcfm", "flow-matching"}
    assert "pip install --quiet --no-deps $(TEST_LIBS_NODEPS)" in make
    assert '-e ".[eval]" $(TEST_LIBS)' in make


# --- the closed-form errors, for the record -----------------------------------------------------------

def closed_form_errors() -> dict[str, tuple[float, float]]:
    """``{case: (max error in float64, in float32)}`` over 400 points of the marginals, σ0 = 1."""
    rows = {}
    for call in ("concat", "tx"):
        v = teachers.torchcfm(torchcfm_exact(call))
        rows[f"torchcfm[{call}]"] = (max_error(v, 1.0), max_error(v, 1.0, dtype=torch.float32))
    for name, scheduler in flow_matching_schedulers().items():
        v = teachers.flow_matching(flow_matching_exact(scheduler, "velocity"),
                                   scheduler=None if name == "condot" else scheduler)
        lo, hi = v.tau_range
        rows[f"flow_matching[{name}]"] = (max_error(v, 1.0, lo=lo, hi=hi),
                                          max_error(v, 1.0, lo=lo, hi=hi, dtype=torch.float32))
    from diffusers import FlowMatchEulerDiscreteScheduler

    v = teachers.diffusers_flow(ExactFlowModel(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    rows["diffusers_flow"] = (max_error(v, 1.0, shape=IMAGE),
                              max_error(v, 1.0, shape=IMAGE, dtype=torch.float32))
    for case in VP_CASES:
        scheduler = vp_scheduler(case)
        v = teachers.diffusers_vp(ExactVPModel(scheduler, scheduler.config.prediction_type), scheduler,
                                  noise_end="exact")
        lo, hi = v.tau_range
        rows[f"diffusers_vp[{case}]"] = (max_error(v, 1.0, shape=IMAGE, lo=lo, hi=hi),
                                         max_error(v, 1.0, shape=IMAGE, lo=lo, hi=hi, dtype=torch.float32))
    return rows


if __name__ == "__main__":
    scale = float(exact(1.0).velocity(*states(1.0)).abs().max())
    print(f"max |b| over the points: {scale:.3g}", file=sys.stderr)
    for case, (e64, e32) in closed_form_errors().items():
        print(f"{case:36s} float64 {e64:.2e}   float32 {e32:.2e}")
