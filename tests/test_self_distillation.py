"""The self-distillation step (LSD, ESD, PSD, MeanFlow, shortcut, CT; LMD and EMD as its instances),
checked against exact answers:

* at the exact flow map of the spec §6.3 mixture (its exact velocity on the diagonal), every off-diagonal
  residual vanishes to integrator precision and the diagonal term equals the irreducible variance;
* for the İ-sourced residuals (MeanFlow, CT) the *expected* semigradient vanishes at the exact map
  (Monte Carlo, within its standard error) and is clearly non-zero at a perturbed map;
* every objective's parameter gradient equals one computed independently with the teacher term frozen by
  hand (a deep copy under no_grad), so a misplaced or missing stop-gradient fails here;
* switch combinations that make no sense are refused with one line.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import jvp as func_jvp

from conftest import F64, RK4_TOL, build_gmm
import flowmaps as fm
from flowmaps import FlowMap
from flowmaps._tensor import expand_as_data, sq_norm
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import (CT, EMD, ESD, LMD, LSD, PSD, DyadicPairs, MeanFlow, SelfDistillation,
                                 SelfDistillationTimes, Shortcut, TimeSampler)

N = 64
GMM_SQ_TOL = 2 * RK4_TOL**2


def draw(ref, objective, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = ref.sample(n, g, dtype=F64)
    x0 = objective.interpolant.sample_base(x1, g)
    s, t = objective.times(n, x1, g)
    objective.generator = g
    return x0, x1, s, t


def irreducible(ref, x0, x1, t):
    i_t, di_t = ref.interpolant(x0, x1, t)
    return (di_t - ref.velocity(i_t, t)).pow(2).sum(1)


# ------------------------------------------------------------------------------------------------
# The exact map: residuals vanish, the diagonal term is the irreducible variance
# ------------------------------------------------------------------------------------------------

EXACT_CASES = {
    # name: options of SelfDistillation (the source is the exact map's own diagonal or its EMA)
    "lsd": dict(residual="lagrangian"),
    "lsd-v": dict(residual="lagrangian", form="v"),
    "lsd-full": dict(residual="lagrangian", stopgrad="none"),
    "lsd-square": dict(residual="lagrangian", domain="square"),
    "esd": dict(residual="eulerian"),
    "esd-source": dict(residual="eulerian", stopgrad="source"),
    "esd-v": dict(residual="eulerian", form="v"),
    "psd-u": dict(residual="progressive", gamma="uniform"),
    "psd-m": dict(residual="progressive", gamma="midpoint"),
    "shortcut-ema": dict(residual="progressive", gamma="midpoint", sampler="dyadic", source="ema"),
    "lsd-ema-logitnormal": dict(residual="lagrangian", source="ema", sampler="logit_normal",
                                time_mean=0.4, time_std=1.0),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
@pytest.mark.parametrize("gmm_case", ["linear", "trig-svec"])
def test_every_residual_vanishes_at_the_exact_map(case, gmm_case):
    gmm = build_gmm(gmm_case)
    exact = gmm.as_flow_map()
    objective = SelfDistillation(gmm.interpolant, eta=0.25, **EXACT_CASES[case])
    objective.begin_step(exact, 0)  # an EMA source snapshots the (exact) model
    x0, x1, s, t = draw(gmm, objective, seed=3)
    n_d = objective.times.n_diagonal(N)
    assert n_d == 16 and torch.equal(s[:n_d], t[:n_d]) and (s[n_d:] != t[n_d:]).all()
    if EXACT_CASES[case].get("domain") == "square":
        assert (s[n_d:] > t[n_d:]).any()
    else:
        assert (s <= t).all()
    terms = objective.terms(exact, x0, x1, s, t, cond=None)
    off = terms[objective.term_name][n_d:]
    assert off.max() < GMM_SQ_TOL, off.max()
    assert (terms[objective.term_name][:n_d] == 0).all() and (terms["diagonal"][n_d:] == 0).all()
    irr = irreducible(gmm, x0[:n_d], x1[:n_d], t[:n_d])
    torch.testing.assert_close(terms["diagonal"][:n_d], irr, atol=1e-10, rtol=1e-10)
    assert irr.mean() > 0.1  # the irreducible variance is far from zero


class Offset(nn.Module):
    """``v_{s,t}(x) + c``: wrong by ``c`` in every coordinate, on the diagonal too."""

    def __init__(self, net, c):
        super().__init__()
        self.net, self.c = net, c

    def forward(self, x, s, t):
        return self.net(x, s, t) + self.c


@pytest.mark.parametrize("gmm_case", ["linear", "trig-svec"])
def test_a_teacher_diagonal_vanishes_at_the_exact_map_where_flow_matching_keeps_its_variance(gmm_case):
    """LMD with a diagonal term (``eta > 0``): with ``diagonal="teacher"`` the target is ``b̂_t(I_t)``
    itself, so at the exact map both terms vanish; the flow-matching target ``İ_t`` leaves the
    irreducible variance. Perturbing the diagonal makes the teacher term equal to the perturbation."""
    gmm = build_gmm(gmm_case)
    exact = gmm.as_flow_map()
    teacher_diag = LMD(gmm.interpolant, gmm.velocity, eta=0.25, diagonal="teacher")
    flow_matching = LMD(gmm.interpolant, gmm.velocity, eta=0.25)
    x0, x1, s, t = draw(gmm, teacher_diag, seed=5)
    n_d = teacher_diag.times.n_diagonal(N)
    terms = teacher_diag.terms(exact, x0, x1, s, t, cond=None)
    assert terms["diagonal"].abs().max() < 1e-20 and terms["lagrangian"].max() < GMM_SQ_TOL
    fm_terms = flow_matching.terms(exact, x0, x1, s, t, cond=None)
    torch.testing.assert_close(fm_terms["diagonal"][:n_d], irreducible(gmm, x0[:n_d], x1[:n_d], t[:n_d]),
                               atol=1e-10, rtol=1e-10)
    terms = teacher_diag.terms(FlowMap(Offset(exact.net, 0.3)), x0, x1, s, t, cond=None)
    torch.testing.assert_close(terms["diagonal"][:n_d], torch.full((n_d,), 0.09 * x1.shape[1],
                                                                     dtype=F64), atol=1e-10, rtol=0)


class Shifted(nn.Module):
    """v_{s,t}(x) + c·(t − s) + slope·s: exact on the diagonal, wrong off it."""

    def __init__(self, net, c=0.2, slope=0.1):
        super().__init__()
        self.net, self.c, self.slope = net, c, slope

    def forward(self, x, s, t):
        return self.net(x, s, t) + self.c * (t - s)[:, None] + self.slope * (s * (t - s))[:, None]


@pytest.mark.parametrize("case", ["lsd", "lsd-v", "esd", "esd-v", "psd-u", "psd-m"])
def test_residuals_see_a_map_that_is_wrong_off_the_diagonal(case):
    """The zero of the test above is not vacuous: a map exact on its diagonal but wrong off it has
    clearly non-zero residuals."""
    gmm = build_gmm("linear")
    model = FlowMap(Shifted(gmm.as_network()))
    objective = SelfDistillation(gmm.interpolant, eta=0.25, **EXACT_CASES[case])
    x0, x1, s, t = draw(gmm, objective, seed=4)
    off = objective.terms(model, x0, x1, s, t, cond=None)[objective.term_name][16:]
    assert off.mean() > 1e4 * GMM_SQ_TOL, off.mean()


def test_lmd_and_emd_with_the_exact_teacher_are_instances_of_the_same_step():
    gmm = build_gmm("linear")
    exact = gmm.as_flow_map()
    for objective in (LMD(gmm.interpolant, gmm), EMD(gmm.interpolant, gmm, form="v"),
                      LSD(gmm.interpolant, source="teacher", teacher=gmm, eta=0.0)):
        assert isinstance(objective, SelfDistillation) and objective.times.eta == 0.0
        x0, x1, s, t = draw(gmm, objective, seed=5)
        terms = objective.terms(exact, x0, x1, s, t, cond=None)
        assert list(terms) == [objective.term_name] and terms[objective.term_name].max() < GMM_SQ_TOL


# ------------------------------------------------------------------------------------------------
# İ-sourced objectives: the expected semigradient vanishes at the exact map
# ------------------------------------------------------------------------------------------------

class PerSampleShift(nn.Module):
    """v_{s,t}(x) + θ_i φ(x, s, t) with one scalar θ_i per sample: the gradient of Σ_i ℓ_i with respect
    to θ is the vector of per-sample semigradients along the perturbation φ."""

    def __init__(self, net, theta):
        super().__init__()
        self.net = net
        self.theta = nn.Parameter(theta)

    def forward(self, x, s, t):
        phi = torch.stack([torch.sin(x[:, 1] + 2 * s), torch.cos(x[:, 0] - t)], dim=1)
        return self.net(x, s, t) + self.theta[:, None] * phi


@pytest.mark.parametrize("name", ["meanflow", "ct"])
def test_conditional_source_semigradient_vanishes_in_expectation_at_the_exact_map(name):
    gmm = build_gmm("linear", steps=32)
    n = 3000
    objective = {"meanflow": MeanFlow(gmm.interpolant, eta=0.0, weighting="none"),
                 "ct": CT(gmm.interpolant)}[name]
    x0, x1, s, t = draw(gmm, objective, n=n, seed=6)
    assert objective.source.kind == "conditional" and (s < t).all()

    def per_sample_gradients(theta0):
        model = FlowMap(PerSampleShift(gmm.as_network(), torch.full((n,), theta0, dtype=F64)))
        loss = objective.terms(model, x0, x1, s, t, cond=None)[objective.term_name].sum()
        (grad,) = torch.autograd.grad(loss, [model.net.theta])
        return grad

    at_exact = per_sample_gradients(0.0)
    mean, se = at_exact.mean().item(), at_exact.std().item() / math.sqrt(n)
    assert abs(mean) < 3.5 * se, (mean, se)
    assert at_exact.std() > 0.05  # single-sample gradients are not zero: only their mean is
    perturbed = per_sample_gradients(0.3)
    p_mean, p_se = perturbed.mean().item(), perturbed.std().item() / math.sqrt(n)
    assert abs(p_mean) > 8 * p_se, (p_mean, p_se)


# ------------------------------------------------------------------------------------------------
# Stop-gradients: every objective's gradient against the teacher term frozen by hand
# ------------------------------------------------------------------------------------------------

def small_model(seed=0, dim=2):
    torch.manual_seed(seed)
    net = fm.MLP(dim, width=24, depth=2).double()
    with torch.no_grad():  # a non-trivial map (the output layer starts at zero)
        net.out.weight.normal_(0, 0.3)
        net.out.bias.normal_(0, 0.1)
    return FlowMap(net)


def grads(loss, model):
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()),
                                                                    allow_unused=True))]


def assert_same_grads(a, b, tol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def max_grad_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def frozen(model):
    copy_ = copy.deepcopy(model)
    copy_.requires_grad_(False)
    return copy_


def map_jvp(model, x, s, t, dx=None, ds=None, dt=None):
    """An independent JVP of X(x, s, t) = x + (t − s) v(x, s, t), by torch.func on a plain function."""
    def fn(x_, s_, t_):
        return x_ + expand_as_data(t_ - s_, x_) * model.net(x_, s_, t_)
    z = lambda p, d: torch.zeros_like(p) if d is None else d * torch.ones_like(p) if not torch.is_tensor(d) else d  # noqa: E731
    return func_jvp(fn, (x, s, t), (z(x, dx), z(s, ds), z(t, dt)))


def v_jvp(model, x, s, t, dx=None, ds=None, dt=None):
    z = lambda p, d: torch.zeros_like(p) if d is None else d * torch.ones_like(p) if not torch.is_tensor(d) else d  # noqa: E731
    return func_jvp(lambda x_, s_, t_: model.net(x_, s_, t_), (x, s, t), (z(x, dx), z(s, ds), z(t, dt)))


def hand_off_diagonal(name, model, teacher, x0, x1, s, t, interpolant, gamma=None):
    """The off-diagonal per-sample loss with every teacher quantity computed from ``teacher`` (a frozen
    copy, or the external teacher), independently of the library's residual code."""
    i_s, di_s = interpolant(x0, x1, s)
    gap = expand_as_data(t - s, i_s)
    if name in ("lsd", "lmd"):
        x_st, dt_x = map_jvp(model, i_s, s, t, dt=1.0)
        with torch.no_grad():
            target = teacher(x_st, t)
        return sq_norm(dt_x - target)
    if name == "lsd-v":
        v = model.net(i_s, s, t)
        with torch.no_grad():
            _, dt_v = v_jvp(teacher.model, i_s, s, t, dt=1.0)
            target = teacher(i_s + gap * v, t) - gap * dt_v
        return sq_norm(v - target)
    if name in ("esd", "ct", "emd"):
        b = di_s if name == "ct" else teacher(i_s, s).detach()
        _, ds_x = map_jvp(model, i_s, s, t, ds=1.0)
        with torch.no_grad():
            _, advection = map_jvp(teacher.model, i_s, s, t, dx=b)
        return sq_norm(ds_x + advection)
    if name == "emd-full":
        b = teacher(i_s, s).detach()
        return sq_norm(map_jvp(model, i_s, s, t, dx=b, ds=1.0)[1])
    if name in ("meanflow", "emd-v"):
        b = di_s if name == "meanflow" else teacher(i_s, s).detach()
        v = model.net(i_s, s, t)
        with torch.no_grad():
            _, dv = v_jvp(teacher.model, i_s, s, t, dx=b, ds=1.0)
        return sq_norm(v - (b + gap * dv))
    if name in ("psd", "shortcut"):
        u = gamma * s + (1 - gamma) * t
        with torch.no_grad():
            net = teacher.model.net
            v_su = net(i_s, s, u)
            x_su = i_s + expand_as_data(u - s, i_s) * v_su
            g = expand_as_data(gamma, i_s)
            target = (1 - g) * v_su + g * net(x_su, u, t)
        return sq_norm(model.net(i_s, s, t) - target)
    raise ValueError(name)


class FrozenVelocity:
    """A frozen copy's diagonal as a callable b(x, t), keeping the copy for its JVPs."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t):
        return self.model.net(x, t, t)


GRADIENT_CASES = {
    "lsd": lambda i: LSD(i, weighting="none"),
    "lsd-v": lambda i: LSD(i, form="v", weighting="none"),
    "esd": lambda i: ESD(i, weighting="none"),
    "psd": lambda i: PSD(i, weighting="none"),
    "meanflow": lambda i: MeanFlow(i, weighting="none", sampler="uniform"),
    "ct": lambda i: CT(i, eta=0.5),
    "shortcut": lambda i: Shortcut(i),
}


@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_gradient_equals_the_teacher_term_frozen_by_hand(name):
    interpolant = fm.Linear()
    ref = GaussianMixture([[1.5, 0.0], [-1.0, 1.0]], stds=[0.4, 0.3], interpolant=interpolant)
    model = small_model(1)
    objective = GRADIENT_CASES[name](interpolant)
    objective.begin_step(model, 0)
    if name == "shortcut":  # let the EMA teacher differ from the model
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        objective.begin_step(model, 1)
    x0, x1, s, t = draw(ref, objective, n=48, seed=7)
    n_d = objective.times.n_diagonal(48)
    gen_state = objective.generator.get_state()
    loss = sum(objective.terms(model, x0, x1, s, t, cond=None).values()).sum()
    got = grads(loss, model)

    teacher_model = objective.source.ema if name == "shortcut" else frozen(model)
    gamma = None
    if name in ("psd", "shortcut"):  # the same intermediate times the objective drew
        g = torch.Generator().set_state(gen_state)
        gamma = (torch.full((48 - n_d,), 0.5, dtype=F64) if name == "shortcut" else
                 torch.rand(48 - n_d, generator=g, dtype=F64))
    i_t, di_t = interpolant(x0[:n_d], x1[:n_d], t[:n_d])
    hand = sq_norm(model.net(i_t, t[:n_d], t[:n_d]) - di_t).sum()
    hand = hand + hand_off_diagonal(name, model, FrozenVelocity(teacher_model), x0[n_d:], x1[n_d:],
                                    s[n_d:], t[n_d:], interpolant, gamma).sum()
    want = grads(hand, model)
    assert_same_grads(got, want)
    # The check has teeth: the same loss without the stop-gradient has a different gradient.
    if name in ("lsd", "esd", "psd", "lsd-v"):
        no_sg = SelfDistillation(interpolant, residual=objective.residual, eta=objective.times.eta,
                                 stopgrad="none" if name in ("lsd", "esd") else "target",
                                 form=objective.form, gamma=objective.gamma)
        if name in ("lsd", "esd"):
            loss2 = sum(no_sg.terms(model, x0, x1, s, t, cond=None).values()).sum()
            assert max_grad_difference(grads(loss2, model), want) > 1e-4


@pytest.mark.parametrize("name", ["lmd", "lmd-v", "emd", "emd-full", "emd-v"])
def test_distillation_gradient_ignores_the_teacher(name):
    """LMD/EMD against a teacher *network* whose output depends on its input: the student's gradient is
    the one with the teacher's values frozen by hand. Removing the stop-gradient of the teacher (its
    evaluation at the transported point, or of b) changes it."""
    interpolant = fm.Linear()
    ref = GaussianMixture([[1.5, 0.0], [-1.0, 1.0]], stds=[0.4, 0.3], interpolant=interpolant)
    teacher_model = small_model(5)  # trainable parameters left on: only the sg protects them
    teacher = FrozenVelocity(teacher_model)
    model = small_model(2)
    objective = {"lmd": LMD(interpolant, teacher), "lmd-v": LMD(interpolant, teacher, form="v"),
                 "emd": EMD(interpolant, teacher), "emd-full": EMD(interpolant, teacher, form="full"),
                 "emd-v": EMD(interpolant, teacher, form="v")}[name]
    x0, x1, s, t = draw(ref, objective, n=40, seed=8)
    loss = objective.terms(model, x0, x1, s, t, cond=None)[objective.term_name].sum()
    got = grads(loss, model)
    assert all(p.grad is None for p in teacher_model.parameters())
    if name == "lmd-v":
        i_s = interpolant.interpolate(x0, x1, s)
        gap = expand_as_data(t - s, i_s)
        v = model.net(i_s, s, t)
        with torch.no_grad():
            _, dt_v = v_jvp(model, i_s, s, t, dt=1.0)
            target = teacher(i_s + gap * v, t) - gap * dt_v
        hand = sq_norm(v - target).sum()
    else:
        class Wrapped:  # the student's frozen copy for the advective JVPs, the teacher for b
            def __init__(self):
                self.model = frozen(model)

            def __call__(self, x, t_):
                return teacher(x, t_)
        hand = hand_off_diagonal(name, model, Wrapped(), x0, x1, s, t, interpolant).sum()
    assert_same_grads(got, grads(hand, model))
    if name == "lmd":  # without the sg the teacher's input carries the gradient
        full = LMD(interpolant, teacher, semigradient=False)
        loss2 = full.terms(model, x0, x1, s, t, cond=None)["lagrangian"].sum()
        assert max_grad_difference(grads(loss2, model), got) > 1e-4


# ------------------------------------------------------------------------------------------------
# Time samplers and weightings
# ------------------------------------------------------------------------------------------------

def test_the_batch_split_puts_eta_of_the_batch_on_the_diagonal_first():
    times = SelfDistillationTimes(0.75, TimeSampler("triangle"))
    like = torch.zeros(100, 2, dtype=F64)
    s, t = times(100, like, torch.Generator().manual_seed(0))
    assert times.n_diagonal(100) == 75
    assert torch.equal(s[:75], t[:75]) and (s[75:] < t[75:]).all()
    # η = 0 is the distillation sampler itself, draw for draw
    s0, t0 = SelfDistillationTimes(0.0, TimeSampler("triangle"))(50, like, torch.Generator().manual_seed(1))
    s1, t1 = TimeSampler("triangle")(50, like, torch.Generator().manual_seed(1))
    assert torch.equal(s0, s1) and torch.equal(t0, t1)


def test_gap_annealing_curriculum():
    times = SelfDistillationTimes(0.5, TimeSampler("triangle"), fm_steps=10, anneal_steps=100)
    like = torch.zeros(4000, 1, dtype=F64)
    g = torch.Generator().manual_seed(0)
    times.begin_step(5)
    s, t = times(4000, like, g)
    assert times.n_diagonal(4000) == 4000 and torch.equal(s, t)  # flow matching alone
    times.begin_step(35)                                          # δ = 0.25
    s, t = times(4000, like, g)
    gaps = (t - s)[2000:]
    assert gaps.max() <= 0.25 + 1e-12 and gaps.max() > 0.24 and (gaps > 0).all()
    times.begin_step(500)                                         # δ = 1: the whole triangle
    s, t = times(4000, like, g)
    assert (t - s)[2000:].max() > 0.9


def test_dyadic_pairs_lie_on_the_shortcut_grid():
    s, t = DyadicPairs(7)(20000, torch.zeros(1, dtype=F64), torch.Generator().manual_seed(0))
    gap = t - s
    k = -torch.log2(gap / 2)
    assert torch.equal(k, k.round()) and set(k.round().int().tolist()) == set(range(1, 8))
    # a jump of length 2d starts at a multiple of 2d (Frans et al.'s targets_shortcut.py), not of d
    assert torch.equal(s / gap, (s / gap).round()) and (t <= 1).all() and (s >= 0).all()
    assert (s == 0).any() and torch.isclose(t, torch.ones_like(t)).any()  # both ends are reached
    counts = torch.bincount(k.round().int())[1:]
    assert counts.min() > 0.8 * 20000 / 7                      # equal shares of the levels


def test_learned_weight_starts_at_zero_and_its_minimiser_is_the_log_loss():
    from flowmaps.objectives import LearnedWeight

    head = LearnedWeight(16).double()
    s = torch.rand(200, dtype=F64)
    t = s + (1 - s) * torch.rand(200, dtype=F64)
    loss = torch.full((200,), 3.0, dtype=F64)
    torch.testing.assert_close(head.apply(loss, s, t), loss)   # w ≡ 0 at initialisation
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        head.apply(loss, s, t).mean().backward()
        opt.step()
    torch.testing.assert_close(head(s, t), torch.full((200,), math.log(3.0), dtype=F64), atol=2e-2,
                               rtol=0)


def test_adaptive_and_tangent_weightings():
    from flowmaps.objectives import AdaptiveWeight, TangentNormalization

    loss = torch.tensor([0.5, 4.0], dtype=F64, requires_grad=True)
    weighted = AdaptiveWeight(p=1.0, eps=1e-3).apply(loss)
    (g,) = torch.autograd.grad(weighted.sum(), [loss])
    torch.testing.assert_close(g, 1 / (loss.detach() + 1e-3))   # the gradient of log(ℓ + ε)
    normed = TangentNormalization(c=0.1, warmup=100)
    (g,) = torch.autograd.grad(normed.apply(loss).sum(), [loss])
    torch.testing.assert_close(g, 1 / (loss.detach().sqrt() + 0.1))
    assert normed.warmup_factor(0) == 0.0 and normed.warmup_factor(50) == 0.5
    assert normed.warmup_factor(500) == 1.0


# ------------------------------------------------------------------------------------------------
# Nonsense switch combinations
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    (dict(residual="lagrangian", source="conditional"), "transported point"),
    (dict(residual="progressive", source="conditional"), "source must be self or ema"),
    (dict(residual="progressive", source="teacher", teacher=lambda x, t: x), "PFMM"),
    (dict(residual="eulerian", source="conditional", stopgrad="source"), "unbiased"),
    (dict(residual="eulerian", form="v", stopgrad="none"), "v-form"),
    (dict(residual="lagrangian", source="teacher", teacher=lambda x, t: x, stopgrad="none",
          eta=0.0), "stopgrad=none"),
    (dict(residual="lagrangian", eta=0.0), "eta must be > 0"),
    (dict(residual="lagrangian", weighting="tangent"), "form=v"),
    (dict(residual="progressive", guidance=2.0, null_label=10), "guidance"),
    (dict(residual="lagrangian", source="teacher"), "teacher"),
    (dict(residual="lagrangian", teacher=lambda x, t: x), "source='teacher'"),
    (dict(residual="lagrange"), "residual"),
    (dict(residual="lagrangian", diagonal="teacher"), "diagonal=teacher"),
    (dict(residual="lagrangian", diagonal="velocity"), "diagonal"),
    (dict(sampler="dyadic", domain="square"), "dyadic"),
    (dict(eta=1.0), "eta"),
    (dict(guidance=2.0), "null_label"),
])
def test_switch_combinations_that_make_no_sense_are_refused(options, message):
    with pytest.raises(ValueError, match=message) as err:
        SelfDistillation(fm.Linear(), **options)
    assert "\n" not in str(err.value)
