"""ODE baselines (Euler, Heun, RK4, dopri5) on the Gaussian target, whose flow map is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import F64, base_points, build_gmm
from flowmaps import solve_ode
from flowmaps.solvers import NFE_PER_STEP, uniform_grid


class Counted:
    """Wrap a velocity b(x, t) and count its calls."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)         # per-sample times, as the solvers promise
        return self.velocity(x, t)


@pytest.fixture
def problem(gaussian):
    x0 = base_points(gaussian, 256, torch.Generator().manual_seed(0))
    return gaussian, x0, gaussian.flow(x0, 0.0, 1.0)


@pytest.mark.parametrize("method,order,steps", [("euler", 1, (32, 64)), ("heun", 2, (32, 64)),
                                                ("rk4", 4, (16, 32))])
def test_fixed_step_convergence_order(problem, method, order, steps):
    g, x0, exact = problem
    errs = [(solve_ode(g.velocity, x0, method, steps=k).x - exact).abs().max().item() for k in steps]
    observed = math.log2(errs[0] / errs[1])
    # Asymptotic regime: the observed order is within 0.3 of the nominal one (measured 0.98/2.03/4.0–4.3
    # at these step counts); a method of the wrong order is off by ≥ 1.
    assert abs(observed - order) < 0.35, (errs, observed)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_fixed_step_nfe(problem, method):
    g, x0, _ = problem
    for k in (1, 3, 8):
        counted = Counted(g.velocity)
        sol = solve_ode(counted, x0, method, steps=k)
        assert sol.nfe == counted.calls == NFE_PER_STEP[method] * k
    assert NFE_PER_STEP == {"euler": 1, "heun": 2, "rk4": 4}


def test_dopri5_accuracy_and_nfe(problem):
    g, x0, exact = problem
    errs = []
    for tol in (1e-5, 1e-8):
        counted = Counted(g.velocity)
        sol = solve_ode(counted, x0, "dopri5", rtol=tol, atol=tol)
        assert sol.nfe > 0 and sol.nfe == counted.calls
        errs.append((sol.x - exact).abs().max().item())
        # dopri5 controls the local error per step to ~tol; the global error over the tens of accepted
        # steps is measured at ~10·tol on this problem; 100·tol bounds it with margin.
        assert errs[-1] < 100 * tol, (tol, errs[-1])
    assert errs[1] < 1e-2 * errs[0]                 # tightening the tolerance does tighten the error


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5"])
def test_backward_integration_inverts_the_forward_map(problem, method):
    g, x0, exact = problem
    kw = dict(steps=400) if method != "dopri5" else dict(rtol=1e-9, atol=1e-9)
    back = solve_ode(g.velocity, exact, method, t0=1.0, t1=0.0, **kw).x
    # Against the closed-form inverse X_{1,0}. Tolerances: ~3-5x the global error extrapolated with each
    # method's order from its forward error at 64 steps (Euler 0.07, Heun 7e-4, RK4 1e-8; see the
    # convergence test) to 400 steps — Euler 1e-2, Heun 2e-5, RK4 7e-12 — and 100·tol for dopri5.
    tol = {"euler": 3e-2, "heun": 1e-4, "rk4": 3e-11, "dopri5": 1e-7}[method]
    torch.testing.assert_close(back, x0, atol=tol, rtol=0)
    torch.testing.assert_close(g.flow(exact, 1.0, 0.0), x0, atol=1e-12, rtol=0)


def test_explicit_decreasing_grid_and_path(problem):
    g, x0, exact = problem
    grid = torch.linspace(1.0, 0.0, 51, dtype=F64)
    sol = solve_ode(g.velocity, exact, "rk4", grid=grid, return_path=True)
    assert sol.path.shape == (51, 256, 2) and sol.nfe == 4 * 50
    assert torch.equal(sol.path[0], exact) and torch.equal(sol.path[-1], sol.x)
    # Intermediate states are the flow from t = 1 to the grid times (RK4 on 50 steps: ~1e-7).
    torch.testing.assert_close(sol.path[25], g.flow(exact, 1.0, 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(sol.x, x0, atol=1e-6, rtol=0)
    # A grid overrides steps; a non-uniform grid is followed as given.
    nonuniform = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0], dtype=F64)
    a = solve_ode(g.velocity, x0, "euler", grid=nonuniform, steps=99)
    x = x0
    for i in range(4):
        h = nonuniform[i + 1] - nonuniform[i]
        x = x + h * g.velocity(x, nonuniform[i])
    torch.testing.assert_close(a.x, x, atol=1e-14, rtol=0)
    assert a.nfe == 4


def test_invalid_arguments_raise(problem):
    g, x0, _ = problem
    with pytest.raises(ValueError):
        solve_ode(g.velocity, x0, "midpoint", steps=4)
    with pytest.raises(ValueError):
        solve_ode(g.velocity, x0, "rk4", steps=0)
    with pytest.raises(ValueError):
        solve_ode(g.velocity, x0, "rk4", grid=torch.tensor([0.0]))
    with pytest.raises(ValueError):
        uniform_grid(1.5)


def test_uniform_grid():
    torch.testing.assert_close(uniform_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    torch.testing.assert_close(uniform_grid(2, 1.0, 0.0), torch.tensor([1.0, 0.5, 0.0], dtype=F64))


def test_gmm_rk4_solver_matches_gmm_flow():
    """solve_ode's RK4 and the RK4 inside GaussianMixture.flow are the same scheme on the same grid."""
    gmm = build_gmm("trig-s0.5", steps=40)
    x0 = base_points(gmm, 32, torch.Generator().manual_seed(3))
    sol = solve_ode(gmm.velocity, x0, "rk4", steps=40)
    # Same arithmetic up to the order of summation: rounding only.
    torch.testing.assert_close(sol.x, gmm.flow(x0, 0.0, 1.0), atol=1e-12, rtol=0)
