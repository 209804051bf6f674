"""Interpolants I_t = α_t x0 + β_t x1 (spec §1.1): boundary conditions, derivatives, base sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp

from flowmaps import Custom, Linear, Trigonometric
from flowmaps.interpolants import make_interpolant

F64 = torch.float64
T = torch.linspace(0.0, 1.0, 41, dtype=F64)


def quad_alpha(t):
    return (1 - t) ** 2


def quad_beta(t):
    return 1 - (1 - t) ** 2


def quad_dalpha(t):
    return -2 * (1 - t)


def quad_dbeta(t):
    return 2 * (1 - t)


# name -> (constructor, analytic α, β, α̇, β̇) written out independently of the library (spec §1.1 table).
CASES = {
    "linear": (Linear, lambda t: 1 - t, lambda t: t,
               lambda t: -torch.ones_like(t), lambda t: torch.ones_like(t)),
    "trig": (Trigonometric, lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2),
             lambda t: -(math.pi / 2) * torch.sin(math.pi * t / 2),
             lambda t: (math.pi / 2) * torch.cos(math.pi * t / 2)),
    "custom-autodiff": (lambda: Custom(quad_alpha, quad_beta),
                        quad_alpha, quad_beta, quad_dalpha, quad_dbeta),
    "custom-given": (lambda: Custom(quad_alpha, quad_beta, quad_dalpha, quad_dbeta),
                     quad_alpha, quad_beta, quad_dalpha, quad_dbeta),
}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


def test_boundary_conditions(case):
    it = case[0]()
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    # Exact up to float64 rounding (cos(π/2) = 6e-17).
    torch.testing.assert_close(it.alpha(ends), torch.tensor([1.0, 0.0], dtype=F64), atol=1e-15, rtol=0)
    torch.testing.assert_close(it.beta(ends), torch.tensor([0.0, 1.0], dtype=F64), atol=1e-15, rtol=0)


def test_schedule_and_derivatives_match_formulas(case):
    make, alpha, beta, dalpha, dbeta = case
    it = make()
    # Values and derivatives equal the analytic formulas up to rounding (1e-13 over O(1) values).
    for got, want in ((it.alpha(T), alpha(T)), (it.beta(T), beta(T)),
                      (it.dalpha(T), dalpha(T)), (it.dbeta(T), dbeta(T))):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=0)


def test_derivatives_match_forward_mode_autodiff(case):
    it = case[0]()
    ones = torch.ones_like(T)
    # torch.func.jvp differentiates the schedule exactly, so they agree to rounding.
    _, da = jvp(it.alpha, (T,), (ones,))
    _, db = jvp(it.beta, (T,), (ones,))
    torch.testing.assert_close(it.dalpha(T), da, atol=1e-13, rtol=0)
    torch.testing.assert_close(it.dbeta(T), db, atol=1e-13, rtol=0)


def test_custom_autodiff_derivative_of_a_nonpolynomial_schedule():
    # α = cos²(πt/2), β = sin²(πt/2): α̇ = −(π/2) sin(πt), β̇ = (π/2) sin(πt).
    it = Custom(lambda t: torch.cos(math.pi * t / 2) ** 2, lambda t: torch.sin(math.pi * t / 2) ** 2)
    torch.testing.assert_close(it.dalpha(T), -(math.pi / 2) * torch.sin(math.pi * T), atol=1e-13, rtol=0)
    torch.testing.assert_close(it.dbeta(T), (math.pi / 2) * torch.sin(math.pi * T), atol=1e-13, rtol=0)


@pytest.mark.parametrize("which", ["dalpha", "dbeta"])
def test_custom_wrong_derivative_raises(which):
    correct = {"dalpha": quad_dalpha, "dbeta": quad_dbeta}
    derivs = dict(correct)
    derivs[which] = lambda t: -correct[which](t)  # wrong sign
    with pytest.raises(ValueError, match=which):
        Custom(quad_alpha, quad_beta, **derivs)


def test_custom_slightly_wrong_derivative_raises():
    # A 1% error is far above the central-difference accuracy of the check (O(h²) = 1e-10).
    with pytest.raises(ValueError):
        Custom(quad_alpha, quad_beta, lambda t: 1.01 * quad_dalpha(t), quad_dbeta)


@pytest.mark.parametrize("alpha,beta", [
    (lambda t: 0.9 * (1 - t), lambda t: t),        # α_0 = 0.9
    (lambda t: 1 - 0.9 * t, lambda t: t),          # α_1 = 0.1
    (lambda t: 1 - t, lambda t: 0.1 + 0.9 * t),    # β_0 = 0.1
    (lambda t: 1 - t, lambda t: 0.9 * t),          # β_1 = 0.9
    (lambda t: t, lambda t: 1 - t),                # time reversed (t = 0 must be the base)
])
def test_custom_violated_boundary_condition_raises(alpha, beta):
    with pytest.raises(ValueError, match="boundary"):
        Custom(alpha, beta)


@pytest.mark.parametrize("sigma0", [0.0, -1.0, float("nan"), float("inf"), (1.0, 0.0)])
def test_invalid_sigma0_raises(sigma0):
    with pytest.raises(ValueError):
        Linear(torch.tensor(sigma0, dtype=F64) if isinstance(sigma0, tuple) else sigma0)


def test_make_interpolant():
    assert isinstance(make_interpolant("linear"), Linear)
    assert isinstance(make_interpolant("trig", 0.5), Trigonometric)
    assert float(make_interpolant("trigonometric", 0.5).sigma0) == 0.5
    with pytest.raises(ValueError):
        make_interpolant("cosine")


@pytest.mark.parametrize("sigma0", [0.5, (0.5, 2.0, 1.0)])
def test_sample_base_has_std_sigma0(sigma0):
    n, d = 100_000, 3
    s0 = torch.tensor(sigma0, dtype=F64) if isinstance(sigma0, tuple) else torch.full((d,), sigma0, dtype=F64)
    it = Trigonometric(torch.tensor(sigma0, dtype=F64) if isinstance(sigma0, tuple) else sigma0)
    like = torch.empty(n, d, dtype=F64)
    x = it.sample_base(like, torch.Generator().manual_seed(0))
    assert x.shape == (n, d) and x.dtype == F64
    # Monte-Carlo: the sample mean has standard error σ0/√n, the sample std σ0/√(2n) (Gaussian);
    # 5 standard errors is a < 1e-6 two-sided event per coordinate.
    z_mean = x.mean(0) / (s0 / math.sqrt(n))
    z_std = (x.std(0) - s0) / (s0 / math.sqrt(2 * n))
    assert z_mean.abs().max() < 5, z_mean
    assert z_std.abs().max() < 5, z_std
    # Independent coordinates: off-diagonal correlations have standard error 1/√n.
    corr = torch.corrcoef(x.T)
    off = corr[~torch.eye(d, dtype=torch.bool)]
    assert off.abs().max() * math.sqrt(n) < 5


def test_sample_base_dtype_and_generator():
    it = Linear(0.5)
    like = torch.empty(7, 2, dtype=torch.float32)
    a = it.sample_base(like, torch.Generator().manual_seed(3))
    b = it.sample_base(like, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and a.shape == (7, 2)
    assert torch.equal(a, b)


def test_interpolate_and_time_derivative_values(case):
    make, alpha, beta, dalpha, dbeta = case
    it = make()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, dtype=F64, generator=g)
    x1 = torch.randn(16, 3, dtype=F64, generator=g)
    t = torch.rand(16, dtype=F64, generator=g)
    t[0], t[1] = 0.0, 1.0
    i_t, di_t = it(x0, x1, t)
    torch.testing.assert_close(i_t, alpha(t)[:, None] * x0 + beta(t)[:, None] * x1, atol=1e-13, rtol=0)
    torch.testing.assert_close(di_t, dalpha(t)[:, None] * x0 + dbeta(t)[:, None] * x1, atol=1e-13, rtol=0)
    torch.testing.assert_close(it.interpolate(x0, x1, t), i_t, atol=0, rtol=0)
    torch.testing.assert_close(it.time_derivative(x0, x1, t), di_t, atol=0, rtol=0)
    # Endpoints: I_0 = x0 (base), I_1 = x1 (data).
    torch.testing.assert_close(i_t[0], x0[0], atol=1e-15, rtol=0)
    torch.testing.assert_close(i_t[1], x1[1], atol=1e-15, rtol=0)
    # İ_t is the per-sample time derivative of I_t (forward mode, exact).
    _, d_interp = jvp(lambda tt: it.interpolate(x0, x1, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(di_t, d_interp, atol=1e-13, rtol=0)


def test_interpolate_broadcasts_over_image_shaped_data():
    it = Trigonometric()
    x0, x1 = torch.randn(4, 2, 3, 3, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    i_t = it.interpolate(x0, x1, t)
    for k in range(4):
        want = math.cos(math.pi * t[k] / 2) * x0[k] + math.sin(math.pi * t[k] / 2) * x1[k]
        torch.testing.assert_close(i_t[k], want, atol=1e-14, rtol=0)


def test_the_base_scale_is_copied_to_a_device_once():
    """A copy from host memory makes the host wait for the device: sigma0 is copied once per dtype
    and device, not at every step (checked on the meta device: no data, but the copies)."""
    import flowmaps as fm
    from flowmaps.train.host_syncs import HostSyncs

    interpolant, like = fm.Linear(sigma0=0.5), torch.empty(2, 3, device="meta")
    with HostSyncs("meta") as syncs:
        for _ in range(3):
            interpolant.base_scale(like)
    assert syncs.count == 1, syncs.sites
    interpolant.sigma0 = torch.tensor(2.0, dtype=torch.float64)
    assert float(interpolant.base_scale(torch.empty(1))) == 2.0


def test_times_given_as_numbers_are_filled_on_the_device():
    """``batch_times(0.5, x)`` (the map's time arguments) fills the times where ``x`` lives instead of
    making a host tensor and copying it: no tensor is made from Python numbers."""
    from flowmaps._tensor import batch_times
    from flowmaps.train.host_syncs import HostSyncs

    x = torch.zeros(3, 2, dtype=torch.float64)
    with HostSyncs("cpu") as syncs:
        times = batch_times(0.5, x)
    assert not syncs.host_made and syncs.count == 0, syncs.host_made
    assert times.dtype == torch.float64 and torch.equal(times, torch.full((3,), 0.5, dtype=torch.float64))
