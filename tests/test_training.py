"""Each objective trains: on a small 2-D Gaussian mixture, a learned flow map beats Euler on the exact velocity.

Problem: the spec §6.3 three-component mixture, linear interpolant, σ0 = 1. The error of a map is the
mean ``|X̂_{0,1}(x) − X_{0,1}(x)|`` over 2000 base points against the exact map (RK4, 200 steps, error
< 1e-6, far below every threshold). For scale, Euler with the *exact* velocity gives about
1.80 / 0.78 / 0.41 / 0.21 / 0.10 at 1 / 2 / 4 / 8 / 16 steps, and the untrained (identity) map about 2.

Thresholds are tied to those Euler errors, computed in the test, not typed in: a one-step map must beat
``k`` Euler steps of the exact teacher, with ``k`` chosen per objective from how hard the objective is
at this budget (LMD: 8 steps; PFMM: 2 steps at one jump and 8 at two or more; EMD and FMM from samples alone: 4 steps; semigradient EMD,
which needs a small learning rate: 2 steps). The training budgets
are seconds on one CPU thread; with that budget every objective measured between 1.5× and 3× below
its threshold across the seeds we tried, so the margins are not tuned to a lucky seed.
"""

import pytest
import torch

import flowmaps as fm
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import EMD, FMM, LMD, PFMM, Velocity

torch.set_num_threads(1)

STEPS = 1500


@pytest.fixture(scope="module")
def problem():
    return spec_mixture()


def spec_mixture(euler_steps=(1, 2, 4, 8, 16)) -> dict:
    """The spec §6.3 mixture: interpolant, exact reference, 2000 float64 base points, their exact
    endpoints, and the exact velocity's Euler error at each of ``euler_steps``."""
    interp = fm.Linear()
    gmm = GaussianMixture(
        means=[[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]],
        covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]], [[0.1, 0.0], [0.0, 0.1]]],
        weights=[0.5, 0.3, 0.2], interpolant=interp)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    exact = gmm.flow(x0, 0.0, 1.0)
    euler = {k: _error(fm.solve_ode(gmm.velocity, x0, "euler", steps=k).x, exact) for k in euler_steps}
    return dict(interp=interp, gmm=gmm, x0=x0, exact=exact, euler=euler)


def _error(x, exact):
    return (x.double() - exact).norm(dim=1).mean().item()


def _train(problem, objective, steps=STEPS, seed=0, lr=2e-3, n_frequencies=0):
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(2, width=128, depth=3, n_frequencies=n_frequencies))
    gmm = problem["gmm"]
    history = fm.fit(model, objective, lambda n, generator: gmm.sample(n, generator=generator),
                     steps=steps, batch_size=256, lr=lr, lr_decay_start=steps // 4, grad_clip=1.0,
                     seed=seed)
    with torch.no_grad():
        errors = {k: _error(model.sample(problem["x0"].float(), steps=k), problem["exact"])
                  for k in (1, 2, 4)}
    return model, history, errors


def _report(name, errors, euler):
    print(f"\n{name}: map error 1-step {errors[1]:.3f}, 4-step {errors[4]:.3f}; exact-velocity Euler "
          + ", ".join(f"{k}: {v:.3f}" for k, v in euler.items()))


def test_lmd_beats_eight_euler_steps(problem):
    _, history, errors = _train(problem, LMD(problem["interp"], problem["gmm"]))
    _report("LMD", errors, problem["euler"])
    assert history[-1] < history[0]
    assert errors[1] < problem["euler"][8]
    assert errors[4] < problem["euler"][8]


def test_emd_semigradient_beats_euler(problem):
    """The default semigradient EMD (eq. 29) is stable only at a smaller learning rate: at 1e-3 with Adam it
    diverged on this problem (measured), at 3e-4 it trains steadily but slower than LMD, so it gets twice
    the steps and a one-step threshold of two Euler steps (still ~2.3x below one Euler step)."""
    # It needs Fourier features of the times (MLP's default is raw times): measured 1-step error 0.31
    # with 8 frequencies, 0.72 with 2 (up to 1 cycle), 1.15 with raw times.
    _, _, errors = _train(problem, EMD(problem["interp"], problem["gmm"]), steps=2 * STEPS, lr=3e-4,
                          n_frequencies=8)
    _report("EMD (semigradient)", errors, problem["euler"])
    assert errors[1] < problem["euler"][2]
    assert errors[4] < problem["euler"][4]


def test_emd_full_gradient_beats_four_euler_steps(problem):
    """Eq. (28), the convex full-gradient form, trains fast and stably on this low-dimensional problem."""
    _, _, errors = _train(problem, EMD(problem["interp"], problem["gmm"], form="full"), lr=1e-3)
    _report("EMD (full)", errors, problem["euler"])
    assert errors[1] < problem["euler"][4]
    assert errors[4] < problem["euler"][4]


def test_pfmm_beats_eight_euler_steps(problem):
    objective = PFMM(problem["interp"], problem["gmm"], initial_range=1 / 16, stage_steps=STEPS // 6)
    _, _, errors = _train(problem, objective)
    _report("PFMM", errors, problem["euler"])
    assert objective.stage == 5 and objective.max_gap == 1.0  # the range doubled to cover [0, 1]
    # Compounded teacher errors make the one-step map the weakest (the last, full-range stage is short);
    # two or more steps beat eight Euler steps.
    assert errors[1] < problem["euler"][2]
    assert errors[2] < problem["euler"][8]
    assert errors[4] < problem["euler"][8]


def test_fmm_from_samples_beats_four_euler_steps(problem):
    _, _, errors = _train(problem, FMM(problem["interp"]))
    _report("FMM", errors, problem["euler"])
    assert errors[1] < problem["euler"][4]
    assert errors[4] < problem["euler"][4]


def test_velocity_objective_learns_the_velocity(problem):
    """Flow matching from samples: the learned diagonal approaches the exact b_t(x) on interpolant points."""
    gmm, interp = problem["gmm"], problem["interp"]
    model, _, _ = _train(problem, Velocity(interp), steps=1000)
    g = torch.Generator().manual_seed(3)
    x1 = gmm.sample(2000, generator=g)
    t = torch.rand(2000, generator=g)
    it = interp.interpolate(interp.sample_base(x1, g), x1, t)
    with torch.no_grad():
        err = (model.velocity(it, t) - gmm.velocity(it, t)).norm(dim=1).mean().item()
        scale = gmm.velocity(it, t).norm(dim=1).mean().item()
    # A relative L1 velocity error under 25% after 1000 steps; the untrained map has 100%.
    assert err < 0.25 * scale


def test_fit_is_reproducible_from_its_seed(problem):
    interp, gmm = problem["interp"], problem["gmm"]

    def run(seed):
        torch.manual_seed(0)
        model = fm.FlowMap(fm.MLP(2, width=32, depth=2))
        hist = fm.fit(model, LMD(interp, gmm), lambda n, generator: gmm.sample(n, generator=generator),
                      steps=5, batch_size=64, seed=seed)
        return hist, torch.cat([p.flatten() for p in model.parameters()])

    h1, p1 = run(7)
    h2, p2 = run(7)
    h3, _ = run(8)
    assert h1 == h2 and torch.equal(p1, p2)
    assert h1 != h3


def test_fit_accepts_a_tensor_dataset_and_rejects_bad_data(problem):
    data = problem["gmm"].sample(500)
    model = fm.FlowMap(fm.MLP(2, width=16, depth=1))
    hist = fm.fit(model, FMM(problem["interp"]), data, steps=3, batch_size=32)
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(hist)))
    bad = data.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fm.fit(model, FMM(problem["interp"]), bad, steps=1)


def test_non_finite_losses_are_skipped_then_stop(problem):
    class Exploding(Velocity):
        def terms(self, model, x0, x1, s, t, cond):
            out = super().terms(model, x0, x1, s, t, cond)
            return {k: v * float("inf") for k, v in out.items()}

    model = fm.FlowMap(fm.MLP(2, width=16, depth=1))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        fm.fit(model, Exploding(problem["interp"]), problem["gmm"].sample(100), steps=10,
               max_bad_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fit_returns_the_ema_model(problem):
    """fit keeps the EMA of the weights (ema_decay 0.999 by default, as the CLI) and hands it back: the
    result is still the loss list, with .ema (eval mode, no gradients) equal to an EMA computed here
    step by step from the raw weights; the raw weights are the same with or without it."""
    interp, gmm = problem["interp"], problem["gmm"]

    def data(n, generator):
        return gmm.sample(n, generator=generator)

    def fresh():
        torch.manual_seed(0)
        return fm.FlowMap(fm.MLP(2, width=16, depth=2))

    model = fresh()
    result = fm.fit(model, LMD(interp, gmm), data, steps=12, batch_size=32, seed=4, ema_decay=0.9)
    assert isinstance(result, list) and len(result) == 12 and all(isinstance(v, float) for v in result)
    assert result.model is model and result.best is result.ema
    assert not result.ema.training and not any(p.requires_grad for p in result.ema.parameters())
    # the same run one step at a time, averaging by hand
    torch.manual_seed(0)
    again = fresh()
    trainer = fm.Trainer(again, LMD(interp, gmm), data, batch_size=32, seed=4)
    ema = [p.detach().clone() for p in again.parameters()]
    for k in range(12):
        trainer.step()
        decay = min(0.9, (1 + k) / (10 + k))
        ema = [e + (1 - decay) * (p.detach() - e) for e, p in zip(ema, again.parameters())]
    for mine, theirs, raw in zip(ema, result.ema.parameters(), model.parameters()):
        torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-7)
        assert not torch.equal(theirs, raw)  # the EMA is not the raw weights
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    without = fm.fit(fresh(), LMD(interp, gmm), data, steps=12, batch_size=32, seed=4, ema_decay=None)
    assert without.ema is None and without.best is without.model
    assert all(torch.equal(a, b) for a, b in zip(without.model.parameters(), model.parameters()))
    assert list(without) == list(result)
