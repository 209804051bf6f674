"""FlowMap X_{s,t}(x) = x + (t − s) v_{s,t}(x) (spec §2.2): identity at initialisation, diagonal velocity,
forward-mode derivatives against finite differences, and multi-step sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import F64, RK4_TOL, base_points, build_gmm
from flowmaps import MLP, FlowMap

B = 16


class Plain(nn.Module):
    """Hides every method of the wrapped network but ``forward`` (e.g. a fused ``forward_and_jvp``), so
    FlowMap differentiates it with ``torch.func.jvp``."""

    def __init__(self, net):
        super().__init__()
        self.inner = net

    def forward(self, x, s, t, cond=None):
        return self.inner(x, s, t) if cond is None else self.inner(x, s, t, cond=cond)


def random_flow_map(seed: int = 0, cond_dim: int = 0, plain: bool = False) -> FlowMap:
    """A float64 MLP flow map whose zero-initialised output layer is replaced by random weights, so that
    v_{s,t}(x) is a non-trivial smooth function of (x, s, t). ``plain`` forces the torch.func.jvp path."""
    torch.manual_seed(seed)
    net = MLP(2, width=32, depth=2, cond_dim=cond_dim, n_frequencies=8).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.out.weight.copy_(0.3 * torch.randn(net.out.weight.shape, generator=g, dtype=F64))
        net.out.bias.copy_(0.3 * torch.randn(net.out.bias.shape, generator=g, dtype=F64))
    return FlowMap(Plain(net) if plain else net)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(B, 2, dtype=F64, generator=g)
    s = torch.rand(B, dtype=F64, generator=g)
    t = torch.rand(B, dtype=F64, generator=g)
    return x, s, t, g


def test_identity_at_initialisation(inputs):
    x, s, t, _ = inputs
    fm = FlowMap(MLP(2, width=32, depth=2).double())
    # Zero-initialised output layer: v ≡ 0 exactly, so X_{s,t} = id exactly for every (s, t).
    assert torch.equal(fm(x, s, t), x)
    assert torch.equal(fm.velocity(x, t), torch.zeros_like(x))
    _, dX = fm.jvp(x, s, t, ds=1.0, dt=1.0)
    assert torch.equal(dX, torch.zeros_like(x))
    fm32 = FlowMap(MLP(2, width=16, depth=1))
    x32 = x.float()
    assert torch.equal(fm32(x32, 0.0, 1.0), x32)


def test_equal_times_is_identity_for_a_random_network(inputs):
    x, s, _, _ = inputs
    fm = random_flow_map()
    v = fm.v(x, s, s)
    assert v.abs().max() > 0.05            # the network is non-trivial ...
    assert torch.equal(fm(x, s, s), x)     # ... yet X_{s,s} = x + 0·v = x exactly


def test_forward_velocity_and_v_are_the_network(inputs):
    x, s, t, _ = inputs
    fm = random_flow_map()
    torch.testing.assert_close(fm.v(x, s, t), fm.net(x, s, t), atol=0, rtol=0)
    torch.testing.assert_close(fm(x, s, t), x + (t - s)[:, None] * fm.net(x, s, t), atol=1e-15, rtol=0)
    torch.testing.assert_close(fm.velocity(x, t), fm.net(x, t, t), atol=0, rtol=0)
    # Scalar times broadcast to every sample.
    torch.testing.assert_close(fm(x, 0.25, 0.75), fm(x, torch.full((B,), 0.25, dtype=F64),
                                                    torch.full((B,), 0.75, dtype=F64)), atol=0, rtol=0)
    with pytest.raises(ValueError):
        fm(x, torch.zeros(B + 1, dtype=F64), t)


def test_conditioning_is_passed_through(inputs):
    x, s, t, g = inputs
    fm = random_flow_map(cond_dim=3)
    cond = torch.randn(B, 3, dtype=F64, generator=g)
    torch.testing.assert_close(fm(x, s, t, cond), x + (t - s)[:, None] * fm.net(x, s, t, cond=cond),
                               atol=1e-15, rtol=0)
    other = fm(x, s, t, cond + 1.0)
    assert (other - fm(x, s, t, cond)).abs().max() > 1e-3
    _, dX = fm.jvp(x, s, t, dt=1.0, cond=cond)
    eps = 1e-6
    fd = (fm(x, s, t + eps, cond) - fm(x, s, t - eps, cond)) / (2 * eps)
    torch.testing.assert_close(dX, fd, atol=1e-6, rtol=1e-6)


TANGENT_SETS = [("ds",), ("dt",), ("dx",), ("ds", "dt"), ("dx", "dt"), ("dx", "ds"), ("dx", "ds", "dt")]


@pytest.mark.parametrize("which", TANGENT_SETS, ids=["+".join(w) for w in TANGENT_SETS])
@pytest.mark.parametrize("scalar_time_tangents", [False, True])
@pytest.mark.parametrize("plain", [False, True], ids=["net-default", "torch.func"])
def test_jvp_matches_central_differences(inputs, which, scalar_time_tangents, plain):
    x, s, t, g = inputs
    fm = random_flow_map(1, plain=plain)
    tangents = {"dx": torch.randn(B, 2, dtype=F64, generator=g)}
    if scalar_time_tangents:
        tangents.update(ds=0.7, dt=-1.3)
    else:
        tangents.update(ds=torch.randn(B, dtype=F64, generator=g), dt=torch.randn(B, dtype=F64, generator=g))
    kw = {k: tangents[k] for k in which}
    dx = kw.get("dx", torch.zeros_like(x))
    ds = torch.as_tensor(kw.get("ds", 0.0), dtype=F64)
    dt = torch.as_tensor(kw.get("dt", 0.0), dtype=F64)

    def along(f, eps):
        return f(x + eps * dx, s + eps * ds, t + eps * dt)

    # Central differences with eps = 1e-6 in float64: truncation (eps²/6)|∂³f| ≲ 1e-12·(2π·8)³ ≈ 1e-7
    # for the highest Fourier time feature (frequency 8), rounding ~1e-16/eps = 1e-10.
    eps = 1e-6
    X, dX = fm.jvp(x, s, t, **kw)
    torch.testing.assert_close(X, fm(x, s, t), atol=1e-15, rtol=0)
    fd = (along(fm, eps) - along(fm, -eps)) / (2 * eps)
    torch.testing.assert_close(dX, fd, atol=1e-6, rtol=1e-6)
    v, dv = fm.v_jvp(x, s, t, **kw)
    torch.testing.assert_close(v, fm.v(x, s, t), atol=0, rtol=0)
    fd_v = (along(fm.v, eps) - along(fm.v, -eps)) / (2 * eps)
    torch.testing.assert_close(dv, fd_v, atol=1e-6, rtol=1e-6)
    assert dX.abs().max() > 1e-2           # the derivative being compared is not trivially zero


def test_jvp_product_rule_on_the_diagonal(inputs):
    """Spec §2.2: ∂_t X_{s,t}|_{t=s} = v_{s,s} = b_s and ∂_s X_{s,t}|_{s=t} = −v_{t,t}."""
    x, s, _, _ = inputs
    fm = random_flow_map(2)
    _, d_t = fm.jvp(x, s, s, dt=1.0)
    _, d_s = fm.jvp(x, s, s, ds=1.0)
    torch.testing.assert_close(d_t, fm.velocity(x, s), atol=1e-14, rtol=0)
    torch.testing.assert_close(d_s, -fm.velocity(x, s), atol=1e-14, rtol=0)


def test_jvp_without_tangents_returns_zero(inputs):
    x, s, t, _ = inputs
    fm = random_flow_map()
    v, dv = fm.v_jvp(x, s, t)
    torch.testing.assert_close(v, fm.v(x, s, t), atol=0, rtol=0)
    assert torch.equal(dv, torch.zeros_like(v))
    X, dX = fm.jvp(x, s, t)
    torch.testing.assert_close(X, fm(x, s, t), atol=1e-15, rtol=0)
    assert torch.equal(dX, torch.zeros_like(X))


@pytest.mark.parametrize("plain", [False, True], ids=["net-default", "torch.func"])
def test_parameter_gradient_flows_through_the_jvp_tangent(inputs, plain):
    """Reverse-over-forward (needed by LMD/FMM): d/dθ of ⟨w, ∂_t X⟩ equals its finite difference in θ."""
    x, s, t, g = inputs
    fm = random_flow_map(3, plain=plain)
    w = torch.randn(B, 2, dtype=F64, generator=g)
    param = (fm.net.inner if plain else fm.net).body[0].bias   # a hidden layer: non-linear dependence
    _, dX = fm.jvp(x, s, t, dt=1.0)
    (grad,) = torch.autograd.grad((w * dX).sum(), param)
    direction = torch.randn(param.shape, dtype=F64, generator=g)
    eps = 1e-6

    def objective(delta):
        with torch.no_grad():
            param.add_(delta * direction)
            _, d = fm.jvp(x, s, t, dt=1.0)
            param.sub_(delta * direction)
        return (w * d).sum()

    fd = (objective(eps) - objective(-eps)) / (2 * eps)
    # Central difference in θ with eps = 1e-6: truncation O(eps²) ≈ 1e-12·|∂³|, rounding ~1e-10.
    torch.testing.assert_close((grad * direction).sum(), fd, atol=1e-7, rtol=1e-7)
    assert grad.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

def test_sample_steps_and_grid_agree(inputs):
    x, _, _, _ = inputs
    fm = random_flow_map()
    torch.testing.assert_close(fm.sample(x), fm(x, 0.0, 1.0), atol=0, rtol=0)   # default: one jump
    for k in (1, 3, 5):
        torch.testing.assert_close(fm.sample(x, steps=k),
                                   fm.sample(x, grid=torch.linspace(0, 1, k + 1, dtype=F64)), atol=0, rtol=0)
    grid = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    manual = fm(fm(fm(x, 0.0, 0.3), 0.3, 0.7), 0.7, 1.0)
    torch.testing.assert_close(fm.sample(x, grid=grid), manual, atol=0, rtol=0)
    torch.testing.assert_close(fm.sample(x, grid=[0.0, 0.3, 0.7, 1.0]), manual, atol=0, rtol=0)


def test_sample_return_path(inputs):
    x, _, _, _ = inputs
    fm = random_flow_map()
    out, path = fm.sample(x, steps=4, return_path=True)
    assert path.shape == (5, B, 2)
    assert torch.equal(path[0], x) and torch.equal(path[-1], out)
    for i in range(4):
        torch.testing.assert_close(path[i + 1], fm(path[i], i / 4, (i + 1) / 4), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [
    dict(grid=torch.tensor([[0.0, 1.0]])),            # not 1-D
    dict(grid=torch.tensor([0.0])),                   # a single time
    dict(grid=torch.tensor([-0.1, 1.0])),             # outside [0, 1]
    dict(grid=torch.tensor([0.0, 1.2])),
    dict(grid=torch.tensor([0.0, float("nan"), 1.0])),
    dict(grid=torch.tensor([0.0, 1.0]), steps=1),     # both steps and grid
    dict(steps=0),
    dict(steps=2.5),
])
def test_sample_rejects_bad_grids(inputs, bad):
    x, _, _, _ = inputs
    with pytest.raises(ValueError):
        random_flow_map().sample(x, **bad)


def test_exact_map_inverse_of_sample_returns_base_points():
    gmm = build_gmm("trig-svec")
    fm = gmm.as_flow_map()
    x0 = base_points(gmm, 64, torch.Generator().manual_seed(0))
    x1 = fm.sample(x0, steps=1)
    torch.testing.assert_close(x1, gmm.flow(x0, 0.0, 1.0), atol=1e-14, rtol=0)
    # Each jump is a 64-step RK4 solve (global error ≲3e-5, conftest), so base points are recovered to RK4_TOL.
    torch.testing.assert_close(fm.inverse(x1), x0, atol=RK4_TOL, rtol=0)
    torch.testing.assert_close(fm.inverse(x1, steps=3), x0, atol=RK4_TOL, rtol=0)
    # inverse(steps=k) is sample() on the decreasing uniform grid.
    torch.testing.assert_close(fm.inverse(x1, steps=3),
                               fm.sample(x1, grid=torch.linspace(1, 0, 4, dtype=F64)), atol=0, rtol=0)
    assert (x1 - x0).abs().max() > 1.0     # the map is far from the identity


def test_exact_map_sampling_is_step_count_independent():
    """Semigroup: 1, 2 and 4 jumps of the exact map give the same samples (to integrator precision)."""
    gmm = build_gmm("linear")
    fm = gmm.as_flow_map()
    x0 = base_points(gmm, 64, torch.Generator().manual_seed(1))
    one = fm.sample(x0, steps=1)
    torch.testing.assert_close(fm.sample(x0, steps=2), one, atol=RK4_TOL, rtol=0)
    torch.testing.assert_close(fm.sample(x0, steps=4), one, atol=RK4_TOL, rtol=0)
    # A non-uniform grid too.
    torch.testing.assert_close(fm.sample(x0, grid=[0.0, 0.1, 0.5, 0.95, 1.0]), one, atol=RK4_TOL, rtol=0)
