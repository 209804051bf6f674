"""Every objective evaluated at the exact flow map (spec §6.4): the residual losses vanish to integrator
precision, and the regression losses (Velocity, FMM's Lagrangian term) equal the irreducible variance
E|İ_t − b_t(I_t)|². A perturbed map gives clearly non-zero residuals, so the zero tests can fail.

The per-sample ``terms(model, x0, x1, s, t, cond=None)`` are evaluated directly, with x0 from the
interpolant's base, x1 from the reference's sampler and (s, t) from the objective's own time sampler.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import F64, RK4_TOL, build_gaussian, build_gmm
from flowmaps import FlowMap, Linear
from flowmaps.objectives import EMD, FMM, LMD, PFMM, TimeSampler, Velocity
from flowmaps.objectives.pfmm import _BandSampler

N = 64
# A pointwise residual ≤ RK4_TOL per coordinate of the 64-step exact GMM map (conftest) gives a squared
# 2-D residual ≤ 2·RK4_TOL².
GMM_SQ_TOL = 2 * RK4_TOL**2
# Gaussian: closed-form map; only rounding, amplified by 1/|t − s| in the chord slope (|t − s| ≳ 1e-4
# for these draws), so residuals ≲ 1e-11; squared tolerance (1e-9)².
GAUSS_SQ_TOL = 1e-18


def draw(ref, interpolant, sampler, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = ref.sample(n, g, dtype=F64)
    x0 = interpolant.sample_base(x1, g)
    s, t = sampler(n, x1, g)
    return x0, x1, s, t


def irreducible(ref, interpolant, x0, x1, t):
    """Per-sample |İ_t − b_t(I_t)|², the pointwise value of the regression losses at their minimiser."""
    i_t, di_t = interpolant(x0, x1, t)
    return (di_t - ref.velocity(i_t, t)).pow(2).sum(1)


class Shifted(nn.Module):
    """v_{s,t}(x) + c + slope·t: the exact mean velocity with a small error. (A constant error alone nearly
    cancels in FMM's round trip X_{s,t}∘X_{t,s} when the map is close to a translation, hence the slope.)"""

    def __init__(self, net, c=0.1, slope=0.0):
        super().__init__()
        self.net, self.c, self.slope = net, c, slope

    def forward(self, x, s, t):
        return self.net(x, s, t) + self.c + self.slope * t[:, None]


# ------------------------------------------------------------------------------------------------
# LMD / EMD / PFMM: the residual vanishes at the exact map
# ------------------------------------------------------------------------------------------------

def test_lmd_vanishes_at_exact_map(gmm_jvp):
    obj = LMD(gmm_jvp.interpolant, gmm_jvp)              # teacher: the exact velocity (.velocity)
    x0, x1, s, t = draw(gmm_jvp, obj.interpolant, obj.times)
    assert (s <= t).all()                                # default domain: the triangle
    r = obj.terms(gmm_jvp.as_flow_map(), x0, x1, s, t, cond=None)["lagrangian"]
    assert r.shape == (N,) and r.max() < GMM_SQ_TOL, r.max()


@pytest.mark.parametrize("semigradient,domain", [(False, "triangle"), (True, "square")])
def test_lmd_variants_vanish_at_exact_map(semigradient, domain):
    gmm = build_gmm("linear-s0.5")
    obj = LMD(gmm.interpolant, gmm.velocity, times=domain, semigradient=semigradient)
    x0, x1, s, t = draw(gmm, obj.interpolant, obj.times, seed=1)
    if domain == "square":
        assert (s > t).any()                             # backward maps are exercised too
    r = obj.terms(gmm.as_flow_map(), x0, x1, s, t, cond=None)["lagrangian"]
    assert r.max() < GMM_SQ_TOL, r.max()


@pytest.mark.parametrize("form", ["semigradient", "full", "v"])
def test_emd_vanishes_at_exact_map(gmm_jvp, form):
    obj = EMD(gmm_jvp.interpolant, gmm_jvp, form=form)
    x0, x1, s, t = draw(gmm_jvp, obj.interpolant, obj.times, seed=2)
    r = obj.terms(gmm_jvp.as_flow_map(), x0, x1, s, t, cond=None)["eulerian"]
    # The v-form residual is −R (same size as the map-form residual R), spec §3.2.
    assert r.shape == (N,) and r.max() < GMM_SQ_TOL, r.max()


@pytest.mark.parametrize("form", ["velocity", "map"])
def test_pfmm_with_exact_frozen_teacher_vanishes(gmm, form):
    obj = PFMM(gmm.interpolant, gmm, initial_range=0.25, form=form)
    exact = gmm.as_flow_map()
    obj.stage, obj.frozen = 1, exact                     # later stage: the teacher is a frozen map
    x0, x1, s, t = draw(gmm, obj.interpolant, _BandSampler(obj.max_gap), seed=3)
    assert (t - s).max() <= 0.5 + 1e-12 and (t - s).max() > 0.3
    r = obj.terms(exact, x0, x1, s, t, cond=None)["progressive"]
    # Semigroup v_{s,t} = ½[v_{s,u} + v_{u,t}(X_{s,u})], u = (s+t)/2: each slope is a 64-step RK4 solve of an
    # interval ≤ 0.5, accurate well within RK4_TOL.
    assert r.max() < GMM_SQ_TOL, r.max()


def test_pfmm_call_with_exact_frozen_teacher_has_zero_loss():
    gmm = build_gmm("trig")
    obj = PFMM(gmm.interpolant, gmm.velocity, initial_range=0.25)
    exact = gmm.as_flow_map()
    obj.stage, obj.frozen = 2, exact                     # δ_2 = min(1, 0.25·4) = 1: the whole triangle
    assert obj.max_gap == 1.0
    out = obj(exact, gmm.sample(N, torch.Generator().manual_seed(0), dtype=F64),
              generator=torch.Generator().manual_seed(1))
    assert out.loss.item() < GMM_SQ_TOL and set(out.terms) == {"progressive"}


def test_pfmm_stage0_euler_teacher_residual_is_first_order_in_the_range():
    """Stage 0: teacher = Euler steps of b. At the exact map the residual is
    v_{s,t} − ½[b_s + b_u(x + (u − s) b_s)] = (t − s)/4 · (∂_t b + ∇b·b) + O((t − s)²): non-zero, and its
    mean square falls 4x per halving of the band width δ."""
    gmm = build_gmm("linear")
    exact = gmm.as_flow_map()
    means = []
    for delta in (0.1, 0.05, 0.025):
        obj = PFMM(gmm.interpolant, gmm, initial_range=delta)
        assert obj.stage == 0 and obj.frozen is None and obj.max_gap == delta
        # Same seed for every δ: common random numbers, only the width of the band changes.
        x0, x1, s, t = draw(gmm, obj.interpolant, _BandSampler(obj.max_gap), n=2000, seed=4)
        means.append(obj.terms(exact, x0, x1, s, t, cond=None)["progressive"].mean().item())
    ratios = [means[i] / means[i + 1] for i in range(2)]
    # Leading order E|r|² ∝ δ² (ratio 4); the O(δ) corrections and the clipping of s at the ends of
    # [0, 1] move it by at most ~20% at these widths.
    assert all(3.2 < q < 4.8 for q in ratios), (means, ratios)
    assert means[-1] > 1e3 * GMM_SQ_TOL                  # clearly non-zero even at the smallest δ


# ------------------------------------------------------------------------------------------------
# FMM and Velocity: the regression terms equal the irreducible variance
# ------------------------------------------------------------------------------------------------

def test_fmm_at_exact_map(gmm_jvp):
    obj = FMM(gmm_jvp.interpolant)
    x0, x1, s, t = draw(gmm_jvp, obj.interpolant, obj.times, seed=5)
    assert (s > t).any() and (s < t).any()               # default domain: the full square
    terms = obj.terms(gmm_jvp.as_flow_map(), x0, x1, s, t, cond=None)
    assert terms["invertibility"].max() < GMM_SQ_TOL, terms["invertibility"].max()
    # ∂_t X_{s,t}(X_{t,s}(I_t)) = b_t(I_t) pointwise, so |dt_x − İ_t|² = |b_t(I_t) − İ_t|² + δ with
    # |δ| ≤ 2|b − İ|·|e| + |e|², |e| ≤ √2·RK4_TOL.
    irr = irreducible(gmm_jvp, obj.interpolant, x0, x1, t)
    e = math.sqrt(2) * RK4_TOL
    assert ((terms["lagrangian"] - irr).abs() <= 2 * irr.sqrt() * e + e**2).all()
    assert irr.mean() > 0.1                              # the irreducible variance is far from zero
    torch.testing.assert_close(terms["lagrangian"].mean(), irr.mean(), atol=3 * irr.sqrt().mean().item() * e,
                               rtol=0)


def test_velocity_objective_at_exact_velocity(gmm):
    obj = Velocity(gmm.interpolant)
    x0, x1, s, t = draw(gmm, obj.interpolant, obj.times, seed=6)
    assert torch.equal(s, t)                             # default domain: the diagonal
    irr = irreducible(gmm, obj.interpolant, x0, x1, t)
    # Through a FlowMap (its diagonal v_{t,t} is the 0-length RK4 chord: b_t up to rounding) ...
    via_map = obj.terms(gmm.as_flow_map(), x0, x1, s, t, cond=None)["velocity"]
    torch.testing.assert_close(via_map, irr, atol=1e-11, rtol=1e-12)
    # ... and as a plain velocity callable b(x, t).
    via_fn = obj.terms(lambda x, tt: gmm.velocity(x, tt), x0, x1, s, t, cond=None)["velocity"]
    torch.testing.assert_close(via_fn, irr, atol=0, rtol=0)


def gaussian_irreducible_variance(g, t):
    """Closed form E[|İ_t − b_t(I_t)|² | t] = Σ_d Var(İ_t) − Cov(İ_t, I_t)²/Var(I_t) per dimension."""
    it = g.interpolant
    a, b, da, db = it.alpha(t)[:, None], it.beta(t)[:, None], it.dalpha(t)[:, None], it.dbeta(t)[:, None]
    v0, v1 = g.sigma0**2, g.std**2
    var_dot = da**2 * v0 + db**2 * v1
    cov = a * da * v0 + b * db * v1
    var = a**2 * v0 + b**2 * v1
    return (var_dot - cov**2 / var).sum(1)


def test_velocity_loss_at_exact_velocity_is_the_closed_form_irreducible_variance(gaussian):
    obj = Velocity(gaussian.interpolant)
    n = 20_000
    x0, x1, s, t = draw(gaussian, obj.interpolant, obj.times, n=n, seed=7)
    loss = obj.terms(gaussian.as_flow_map(), x0, x1, s, t, cond=None)["velocity"]
    want = gaussian_irreducible_variance(gaussian, t)
    # Monte Carlo: E[loss − want] = 0 exactly; 5 standard errors (P ≈ 6e-7).
    diff = loss - want
    assert diff.mean().abs() < 5 * diff.std() / math.sqrt(n), (diff.mean(), diff.std())
    # Power: the loss of a velocity off by 0.5 exceeds it by |0.5|²·d = 0.5 in expectation, 10–18
    # standard errors (0.027–0.049 for these two cases), so the same 5-s.e. criterion rejects it.
    worse = obj.terms(lambda x, tt: gaussian.velocity(x, tt) + 0.5, x0, x1, s, t, cond=None)["velocity"]
    assert (worse - want).mean() > 5 * (worse - want).std() / math.sqrt(n)


# ------------------------------------------------------------------------------------------------
# The same checks on the Gaussian reference (closed-form map, so exact up to rounding)
# ------------------------------------------------------------------------------------------------

def test_gaussian_reference_residuals_vanish(gaussian):
    it, exact = gaussian.interpolant, gaussian.as_flow_map()
    checks = [
        (LMD(it, gaussian), "lagrangian"),
        (LMD(it, gaussian, times="square", semigradient=False), "lagrangian"),
        (EMD(it, gaussian, form="semigradient"), "eulerian"),
        (EMD(it, gaussian, form="full", times="square"), "eulerian"),
        (EMD(it, gaussian, form="v"), "eulerian"),
    ]
    for k, (obj, key) in enumerate(checks):
        x0, x1, s, t = draw(gaussian, it, obj.times, seed=10 + k)
        r = obj.terms(exact, x0, x1, s, t, cond=None)[key]
        assert r.max() < GAUSS_SQ_TOL, (obj, r.max())
    pfmm = PFMM(it, gaussian, initial_range=0.5)
    pfmm.stage, pfmm.frozen = 1, exact
    x0, x1, s, t = draw(gaussian, it, _BandSampler(pfmm.max_gap), seed=20)
    assert pfmm.terms(exact, x0, x1, s, t, cond=None)["progressive"].max() < GAUSS_SQ_TOL


def test_gaussian_reference_fmm(gaussian):
    it, exact = gaussian.interpolant, gaussian.as_flow_map()
    obj = FMM(it)
    x0, x1, s, t = draw(gaussian, it, obj.times, seed=21)
    terms = obj.terms(exact, x0, x1, s, t, cond=None)
    assert terms["invertibility"].max() < GAUSS_SQ_TOL
    torch.testing.assert_close(terms["lagrangian"], irreducible(gaussian, it, x0, x1, t), atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# Sanity: a perturbed map is not a minimiser, so the zero tests above can fail
# ------------------------------------------------------------------------------------------------

def test_perturbed_map_gives_clearly_nonzero_residuals(gaussian):
    """The map with v + 0.1 is not a minimiser: every residual is far above both exactness tolerances
    (the Gaussian's and the GMM's; the objectives' code is the same for both references)."""
    it, exact = gaussian.interpolant, gaussian.as_flow_map()
    wrong = FlowMap(Shifted(gaussian.as_network(), 0.1, slope=0.1))
    floor = 1e3 * GMM_SQ_TOL                            # three orders above the GMM exactness tolerance

    lmd = LMD(it, gaussian)
    x0, x1, s, t = draw(gaussian, it, lmd.times, seed=30)
    assert lmd.terms(exact, x0, x1, s, t, cond=None)["lagrangian"].max() < GAUSS_SQ_TOL
    assert lmd.terms(wrong, x0, x1, s, t, cond=None)["lagrangian"].mean() > floor
    for form in ("semigradient", "full", "v"):
        emd = EMD(it, gaussian, form=form)
        assert emd.terms(wrong, x0, x1, s, t, cond=None)["eulerian"].mean() > floor

    pfmm = PFMM(it, gaussian, initial_range=0.25)
    pfmm.stage, pfmm.frozen = 1, exact
    x0b, x1b, sb, tb = draw(gaussian, it, _BandSampler(pfmm.max_gap), seed=31)
    assert pfmm.terms(wrong, x0b, x1b, sb, tb, cond=None)["progressive"].mean() > floor

    fmm = FMM(it)
    x0f, x1f, sf, tf = draw(gaussian, it, fmm.times, seed=32)
    terms = fmm.terms(wrong, x0f, x1f, sf, tf, cond=None)
    assert terms["invertibility"].mean() > floor
    irr = irreducible(gaussian, it, x0f, x1f, tf)
    assert (terms["lagrangian"] - irr).abs().mean() > floor

    velocity = Velocity(it)
    x0v, x1v, sv, tv = draw(gaussian, it, velocity.times, seed=33)
    diff = velocity.terms(wrong, x0v, x1v, sv, tv, cond=None)["velocity"] - irreducible(gaussian, it, x0v, x1v, tv)
    assert diff.abs().mean() > floor


def test_perturbed_map_gives_nonzero_pfmm_residual_on_the_gmm():
    gmm = build_gmm("linear")
    pfmm = PFMM(gmm.interpolant, gmm, initial_range=0.25)
    pfmm.stage, pfmm.frozen = 1, gmm.as_flow_map()
    x0, x1, s, t = draw(gmm, gmm.interpolant, _BandSampler(pfmm.max_gap), seed=34)
    r = pfmm.terms(FlowMap(Shifted(gmm.as_network(), 0.1)), x0, x1, s, t, cond=None)["progressive"]
    # v + 0.1 against the exact chord: |0.1·(1, 1)|² = 0.02 up to the integrator error.
    assert abs(r.mean().item() - 0.02) < 1e-3


def test_fmm_invertibility_weight_and_objective_call():
    """λ_inv scales the invertibility term (0 drops it, as in [C1]); the loss of ``__call__`` is the batch
    mean of w(s, t) · Σ terms over the objective's own draws."""
    g = build_gaussian("trig-svec")
    it = g.interpolant
    wrong = FlowMap(Shifted(g.as_network(), 0.1, slope=0.1))
    x0, x1, s, t = draw(g, it, TimeSampler("square"), seed=40)
    base = FMM(it).terms(wrong, x0, x1, s, t, cond=None)
    scaled = FMM(it, invertibility_weight=2.5).terms(wrong, x0, x1, s, t, cond=None)
    torch.testing.assert_close(scaled["invertibility"], 2.5 * base["invertibility"], atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(scaled["lagrangian"], base["lagrangian"], atol=0, rtol=0)
    assert set(FMM(it, invertibility_weight=0.0).terms(wrong, x0, x1, s, t, cond=None)) == {"lagrangian"}
    with pytest.raises(ValueError):
        FMM(it, invertibility_weight=-1.0)

    weight = lambda ss, tt: 1.0 + ss + 2 * tt  # noqa: E731
    obj = FMM(it, weight=weight)
    x1 = g.sample(N, torch.Generator().manual_seed(41), dtype=F64)
    out = obj(wrong, x1, generator=torch.Generator().manual_seed(42))
    gen = torch.Generator().manual_seed(42)                # replay the objective's draws
    x0 = it.sample_base(x1, gen)
    s, t = obj.times(N, x1, gen)
    terms = obj.terms(wrong, x0, x1, s, t, cond=None)
    want = (weight(s, t) * (terms["lagrangian"] + terms["invertibility"])).mean()
    torch.testing.assert_close(out.loss, want, atol=1e-12, rtol=1e-12)
    assert out.terms["invertibility"] == pytest.approx(terms["invertibility"].mean().item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Identities between objective forms that hold for any map (random network)
# ------------------------------------------------------------------------------------------------

def random_mlp_flow_map(seed=0):
    from flowmaps import MLP

    torch.manual_seed(seed)
    net = MLP(2, width=32, depth=2).double()
    with torch.no_grad():
        net.out.weight.normal_(0.0, 0.3)
        net.out.bias.normal_(0.0, 0.3)
    return FlowMap(net)


def test_emd_forms_and_lmd_semigradient_have_equal_values_for_any_map():
    """With X = x + (t − s) v: ∂_s X + ∇X b = −v + b + (t − s)(∂_s v + ∇v b), i.e. the v-form residual is
    exactly −R (spec §3.2), so the three EMD forms differ only in their gradients, not in their values;
    likewise LMD with and without the semigradient. PFMM's map form is (t − s)² times its velocity form."""
    gmm = build_gmm("trig-svec", steps=16)
    model = random_mlp_flow_map()
    x0, x1, s, t = draw(gmm, gmm.interpolant, TimeSampler("square"), seed=50)
    values = [EMD(gmm.interpolant, gmm, form=f).terms(model, x0, x1, s, t, cond=None)["eulerian"]
              for f in ("semigradient", "full", "v")]
    assert values[0].mean() > 1e-2                       # a random map is far from the flow map
    # Same quantity through different JVP bookkeeping: equal to rounding.
    torch.testing.assert_close(values[1], values[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(values[2], values[0], atol=1e-12, rtol=1e-10)
    lmd = [LMD(gmm.interpolant, gmm, semigradient=sg).terms(model, x0, x1, s, t, cond=None)["lagrangian"]
           for sg in (True, False)]
    torch.testing.assert_close(lmd[0], lmd[1], atol=0, rtol=0)
    x0, x1, s, t = draw(gmm, gmm.interpolant, _BandSampler(0.5), seed=51)
    vel, mp = (PFMM(gmm.interpolant, gmm, form=f).terms(model, x0, x1, s, t, cond=None)["progressive"]
               for f in ("velocity", "map"))
    torch.testing.assert_close(mp, (t - s) ** 2 * vel, atol=1e-15, rtol=1e-12)


def test_pfmm_stages_band_and_teacher_refresh():
    """Spec §3.5 / Q21: stage k = ⌊step / stage_steps⌋, |t − s| ≤ δ_k = min(1, δ_0 2^k), and from stage 1 on
    the teacher is a frozen copy of the student taken at the start of the stage."""
    gmm = build_gmm("linear", steps=8)
    model = random_mlp_flow_map(1)
    obj = PFMM(gmm.interpolant, gmm, initial_range=0.125, stage_steps=10)
    obj.begin_step(model, 0)
    assert obj.stage == 0 and obj.frozen is None and obj.max_gap == 0.125
    obj.begin_step(model, 10)
    assert obj.stage == 1 and obj.max_gap == 0.25
    frozen = obj.frozen
    assert frozen is not model and not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(8, 2, dtype=F64)
    torch.testing.assert_close(frozen.v(x, 0.2, 0.4), model.v(x, 0.2, 0.4), atol=0, rtol=0)
    with torch.no_grad():
        model.net.out.bias.add_(1.0)                      # the student moves on ...
    obj.begin_step(model, 19)
    assert obj.frozen is frozen                           # ... the teacher stays for the whole stage
    assert (frozen.v(x, 0.2, 0.4) - model.v(x, 0.2, 0.4)).abs().min() > 0.5
    # The stage-1 teacher slope is the frozen map's v (not the Euler velocity).
    s, u = torch.full((8,), 0.2, dtype=F64), torch.full((8,), 0.4, dtype=F64)
    torch.testing.assert_close(obj.teacher_slope(x, s, u, None), frozen.v(x, s, u), atol=0, rtol=0)
    obj.begin_step(model, 20)
    assert obj.stage == 2 and obj.frozen is not frozen and obj.max_gap == 0.5
    obj.begin_step(model, 50)
    assert obj.max_gap == 1.0                             # capped at the whole interval
    # Band sampling: s ≤ t in [0, 1] with t − s ≤ δ.
    s, t = _BandSampler(0.25)(10_000, x, torch.Generator().manual_seed(0))
    assert (s <= t).all() and (s >= 0).all() and (t <= 1).all() and (t - s).max() <= 0.25
    assert (t - s).max() > 0.24                           # the band is used up to its width


def test_pfmm_band_samplers_weight_long_jumps_as_documented():
    """'gap' draws the jump length uniformly on [0, δ]; [C1]'s 'clip' band makes long jumps rare
    (at δ = 1, P(t − s > 0.9) = 2 · 0.1 · 0.05 = 0.01 instead of 0.1)."""
    like = torch.empty(0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    s, t = _BandSampler(1.0, "gap")(n, like, g)
    assert (s >= 0).all() and (t <= 1).all() and (s <= t).all()
    gap = t - s
    assert abs(float((gap > 0.9).double().mean()) - 0.1) < 0.005
    assert abs(float(gap.mean()) - 0.5) < 0.005
    s_half, t_half = _BandSampler(0.25, "gap")(n, like, g)
    assert float((t_half - s_half).max()) <= 0.25 and abs(float((t_half - s_half).mean()) - 0.125) < 0.002
    s, t = _BandSampler(1.0, "clip")(n, like, g)
    assert abs(float((t - s > 0.9).double().mean()) - 0.01) < 0.002
    assert PFMM(Linear(), lambda x, t: x).band == "gap"
