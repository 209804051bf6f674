"""γ-sampling (spec §4: re-noising along the interpolant between jumps) and time grids tuned after
training (:func:`flowmaps.tune_grid`), against exact answers.

What must hold: re-noising a sample of ``I_u`` back to ``t`` gives exactly the law of ``I_t``; the
γ-sampler run on the exact Gaussian flow map outputs exactly the data law (its output is affine in the
base point and the fresh noises, so its mean and covariance are computed exactly, not estimated); γ = 0
is the deterministic composition bit for bit, γ = 1 is the consistency-model multistep sampler; NFE stays
k; a seeded run repeats bit for bit. A tuned grid keeps its endpoints and order, finds a known optimum,
and is never worse than the uniform grid on its tuning points.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flowmaps as fm
from flowmaps.exact import Gaussian
from flowmaps.flowmap import renoise
from flowmaps.tuning import composition_error, grid_from_logits, self_reference

F64 = torch.float64


class FixedNoise:
    """An interpolant whose ``sample_base`` returns prescribed noises in turn (the rest delegated):
    the γ-sampler's output is then a deterministic function of them."""

    def __init__(self, interpolant, noises):
        self.inner, self.noises = interpolant, list(noises)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample_base(self, like, generator=None):
        return self.noises.pop(0) * self.inner.base_scale(like)


def exact_output_moments(model, interpolant, grid, gamma, dim):
    """Mean and covariance of the γ-sampler's output for base ``x0 ~ N(0, σ0²)``: the output is affine,
    ``A x0 + Σ_i C_i ξ_i + d``, so ``d``, ``A`` and ``C_i`` follow from unit inputs exactly."""
    jumps = len(grid) - 1
    n_noise = jumps - 1

    def run(x0, noises):
        return model.sample(x0, grid=grid, gamma=gamma, interpolant=FixedNoise(interpolant, noises))

    zero = torch.zeros(1, dim, dtype=F64)
    d = run(zero, [zero] * n_noise)[0]
    eye = torch.eye(dim, dtype=F64)
    sigma0 = interpolant.sigma0.to(F64).expand(dim)
    a = torch.stack([run(eye[j:j + 1], [zero] * n_noise)[0] - d for j in range(dim)], dim=1)
    cov = a @ torch.diag(sigma0**2) @ a.T
    for i in range(n_noise):
        # ξ_i enters through σ0 ξ_i inside the sampler; the unit input gives C_i σ0 e_j.
        c = torch.stack([run(zero, [zero] * i + [eye[j:j + 1]] + [zero] * (n_noise - i - 1))[0] - d
                         for j in range(dim)], dim=1)
        cov = cov + c @ c.T
    return d, cov


@pytest.mark.parametrize("interpolant", [fm.Linear(torch.tensor([1.0, 0.7], dtype=F64)),
                                         fm.Trigonometric(1.3)], ids=["linear-svec", "trig"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_gamma_sampler_on_the_exact_gaussian_map_outputs_the_data_law(interpolant, gamma):
    target = Gaussian([1.5, -0.5], [0.4, 1.2], interpolant=interpolant)
    model = target.as_flow_map()
    grid = torch.tensor([0.0, 0.2, 0.45, 0.8, 1.0], dtype=F64)
    mean, cov = exact_output_moments(model, interpolant, grid, gamma, 2)
    torch.testing.assert_close(mean, target.mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.diag(target.std**2), atol=1e-12, rtol=0)


def test_renoising_without_the_noise_term_would_fail_the_moment_check():
    """The check above can fail: re-noising with the deterministic part only loses variance."""
    interpolant = fm.Linear()
    target = Gaussian([1.0, 0.0], [0.3, 0.5], interpolant=interpolant)
    model = target.as_flow_map()
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    zero = torch.zeros(1, 2, dtype=F64)
    # Zero "fresh noise": the output is the deterministic part of the sampler only.
    one = model.sample(torch.eye(2, dtype=F64), grid=grid, gamma=0.5,
                       interpolant=FixedNoise(interpolant, [zero]))
    base = model.sample(zero, grid=grid, gamma=0.5, interpolant=FixedNoise(interpolant, [zero]))
    var = ((one - base) ** 2).sum(0)
    assert (var < target.std**2 * 0.99).all()


@pytest.mark.parametrize("u,t", [(0.9, 0.3), (1.0, 0.5), (0.6, 0.6)])
def test_renoise_maps_the_law_of_I_u_to_the_law_of_I_t(u, t):
    """Exact moments for Gaussian data: (β_t/β_u) I_u + noise has mean β_t m and variance α_t² σ0² + β_t² S."""
    interpolant = fm.Trigonometric(torch.tensor([0.8, 1.5], dtype=F64))
    m, s = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    it = lambda f, v: f(torch.tensor(v, dtype=F64))  # noqa: E731
    a_u, b_u, a_t, b_t = it(interpolant.alpha, u), it(interpolant.beta, u), it(interpolant.alpha, t), \
        it(interpolant.beta, t)
    zero = torch.zeros(1, 2, dtype=F64)
    # I_u = α_u σ0 z + β_u (m + S^{1/2} w) is affine in (z, w, ξ): propagate the three unit inputs.
    mean = renoise(b_u * m[None], u, t, FixedNoise(interpolant, [zero]))[0]
    gain = float(b_t / b_u)
    noise = renoise(zero, u, t, FixedNoise(interpolant, [torch.ones(1, 2, dtype=F64)]))[0]
    var = gain**2 * (a_u**2 * interpolant.sigma0**2 + b_u**2 * s**2) + noise**2
    torch.testing.assert_close(mean, b_t * m, atol=1e-13, rtol=0)
    torch.testing.assert_close(var, a_t**2 * interpolant.sigma0**2 + b_t**2 * s**2, atol=1e-13, rtol=0)


class CountingNet(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, s, t, cond=None):
        self.calls += 1
        return self.inner(x, s, t)


def test_gamma_zero_is_the_deterministic_composition_and_nfe_stays_k():
    torch.manual_seed(0)
    net = fm.MLP(2, width=16, depth=2)
    with torch.no_grad():
        net.out.weight.normal_()
    model = fm.FlowMap(CountingNet(net))
    x0 = torch.randn(32, 2)
    plain = model.sample(x0, steps=4)
    same = model.sample(x0, steps=4, gamma=0.0, interpolant=fm.Linear(),
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, same)
    model.net.calls = 0
    model.sample(x0, steps=4, gamma=0.5, interpolant=fm.Linear(), generator=torch.Generator())
    assert model.net.calls == 4


def test_gamma_one_is_the_consistency_multistep_sampler():
    torch.manual_seed(1)
    net = fm.MLP(2, width=16, depth=2).double()
    with torch.no_grad():
        net.out.weight.normal_()
    model, interpolant = fm.FlowMap(net), fm.Linear()
    x0 = torch.randn(8, 2, dtype=F64)
    grid = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    got = model.sample(x0, grid=grid, gamma=1.0, interpolant=interpolant,
                       generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x1 = model(x0, 0.0, 1.0)                                   # jump to the data
    x = 0.4 * x1 + 0.6 * torch.randn(x1.shape, generator=g, dtype=F64)   # I_0.4 = 0.6 x0 + 0.4 x1
    want = model(x, 0.4, 1.0)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=0)


def test_gamma_sampling_is_reproducible_from_its_seed_and_checks_its_input():
    torch.manual_seed(2)
    net = fm.MLP(2, width=16, depth=2)
    with torch.no_grad():
        net.out.weight.normal_()
    model = fm.FlowMap(net)
    x0 = torch.randn(16, 2)
    run = lambda seed: model.sample(x0, steps=3, gamma=0.5, interpolant=fm.Linear(),  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    with pytest.raises(ValueError, match="interpolant"):
        model.sample(x0, steps=2, gamma=0.5)
    with pytest.raises(ValueError, match="gamma"):
        model.sample(x0, steps=2, gamma=1.5, interpolant=fm.Linear())


# --- tuned grids -------------------------------------------------------------------------------------

class LeftRiemann(nn.Module):
    """``v_{s,t}(x) = s²``: each jump is an Euler step of ``b_t = t²`` from its start, so k jumps give the
    left Riemann sum ``Σ h_i t_i²`` of ``∫_0^1 t² dt = 1/3``. With two jumps ``(0, τ, 1)`` the sum is
    ``τ² − τ³``, whose best value (closest to 1/3) is at ``τ = 2/3``."""

    def forward(self, x, s, t, cond=None):
        return (s**2)[:, None].expand_as(x)


def test_grid_from_logits_keeps_endpoints_and_order():
    grid = grid_from_logits(torch.tensor([3.0, -2.0, 0.5, 0.0], dtype=F64))
    assert grid[0] == 0.0 and grid[-1] == 1.0 and grid.numel() == 5
    assert (grid[1:] > grid[:-1]).all()
    torch.testing.assert_close(grid_from_logits(torch.zeros(4, dtype=F64)),
                               torch.linspace(0, 1, 5, dtype=F64))


def test_tune_grid_finds_the_known_optimum_and_beats_uniform():
    model = fm.FlowMap(LeftRiemann())
    x0 = torch.zeros(64, 1, dtype=F64)
    reference = x0 + 1.0 / 3.0
    grid = fm.tune_grid(model, 2, x0, reference, iters=300, lr=0.05)
    assert grid.dtype == F64 and grid[0] == 0.0 and grid[-1] == 1.0
    assert abs(float(grid[1]) - 2.0 / 3.0) < 0.02
    uniform = torch.linspace(0, 1, 3, dtype=F64)
    tuned_err = composition_error(model, x0, reference, grid)
    assert tuned_err < composition_error(model, x0, reference, uniform) - 0.02
    assert abs(tuned_err - (1 / 3 - 4 / 27)) < 1e-3
    assert torch.equal(fm.tune_grid(model, 1, x0, reference), torch.tensor([0.0, 1.0], dtype=F64))


def test_tune_grid_on_the_exact_map_never_leaves_it_worse_and_restores_grad_flags():
    torch.manual_seed(0)
    net = fm.MLP(2, width=16, depth=2)
    with torch.no_grad():
        net.out.weight.normal_(std=0.3)
    model = fm.FlowMap(net)
    x0 = torch.randn(256, 2)
    reference = self_reference(model, x0, steps=32)
    uniform = torch.linspace(0, 1, 5, dtype=F64)
    grid = fm.tune_grid(model, 4, x0, reference, iters=40)
    assert (grid[1:] > grid[:-1]).all() and grid[0] == 0 and grid[-1] == 1
    assert composition_error(model, x0, reference, grid) <= composition_error(model, x0, reference,
                                                                              uniform)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="shape"):
        fm.tune_grid(model, 2, x0, reference[:10])
