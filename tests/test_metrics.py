"""Sample-quality metrics (flowmaps.metrics) against closed forms, hand-computed examples and the exact
densities of the checkerboard and a Gaussian mixture. Self-contained (no conftest fixtures).

Tolerances of the Monte-Carlo tests are derived in the comments; the seeds are fixed, so each test is
deterministic, and each tolerance is several standard deviations of the estimator (measured over 20
seeds where no formula is at hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmaps.data import checkerboard
from flowmaps.exact import GaussianMixture
from flowmaps.metrics import (checkerboard_kl, checkerboard_log_density, energy_distance, gaussian_w2,
                              histogram_kl, mean_map_error, wasserstein2)

torch.set_num_threads(1)
F64 = torch.float64


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_samples(n, mean, cov, gen):
    mean, cov = torch.as_tensor(mean, dtype=F64), torch.as_tensor(cov, dtype=F64)
    return mean + torch.randn(n, mean.numel(), generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T


# --------------------------------------------------------------------------------------------- W2

def test_gaussian_w2_closed_form():
    # Same covariance: W2 = |m1 − m2|. Commuting (diagonal) covariances: W2² = |Δm|² + |√s1 − √s2|².
    assert gaussian_w2([0, 0], np.eye(2), [3, 4], np.eye(2)) == pytest.approx(5.0, abs=1e-12)
    w = gaussian_w2([1.0], 4.0, [0.0], 1.0)                               # 1-D: variances 4 and 1
    assert w == pytest.approx(math.sqrt(1 + (2 - 1) ** 2), abs=1e-12)
    s1, s2 = np.diag([0.25, 9.0]), np.diag([1.0, 1.0])
    assert gaussian_w2([0, 0], s1, [0, 0], s2) == pytest.approx(math.sqrt(0.5**2 + 2**2), abs=1e-12)
    # Rotation invariance with a non-commuting pair: rotating both laws leaves W2 unchanged.
    a = np.array([[1.0, 0.3], [0.3, 0.5]])
    b = np.diag([0.5, 2.0])
    rot = np.array([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]])
    base = gaussian_w2([0, 0], a, [1, -0.5], b)
    assert gaussian_w2([0, 0], rot @ a @ rot.T, rot @ [1, -0.5], rot @ b @ rot.T) == \
        pytest.approx(base, abs=1e-10)
    assert gaussian_w2([0, 0], a, [0, 0], a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        gaussian_w2([0, 0], a, [0, 0, 0], b)


def test_w2_hand_example_unequal_sizes():
    # x = {0, 1, 2} (mass 1/3 each), y = {0, 3} (mass 1/2 each). In 1-D the optimal plan is the monotone
    # one: ∫₀¹ (F⁻¹(u) − G⁻¹(u))² du = (1/6)(1−0)² + (1/6)(1−3)² + (1/3)(2−3)² = 7/6.
    x = np.array([[0.0], [1.0], [2.0]])
    y = np.array([[3.0], [0.0]])
    assert wasserstein2(x, y) == pytest.approx(math.sqrt(7 / 6), abs=1e-12)
    assert wasserstein2(x[:, 0], y[:, 0]) == pytest.approx(math.sqrt(7 / 6), abs=1e-12)  # 1-D input


def test_w2_identity_shift_and_1d_sorting():
    gen = seeded(0)
    x = torch.randn(500, 2, generator=gen, dtype=F64)
    # ot.dist forms |x|² + |y|² − 2x·y, so a zero cost carries float64 round-off ~1e-16·|x|²; W2 is its
    # square root, hence ~1e-8 rather than 0.
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-7)
    assert wasserstein2(x, x[torch.randperm(500, generator=gen)]) == pytest.approx(0.0, abs=1e-7)
    # A translated copy: for any matching σ, Σ|x_i − x_σ(i) − c|² = Σ|x_i − x_σ(i)|² + n|c|² (the cross
    # term Σ(x_i − x_σ(i))·c vanishes), minimised by σ = id, so W2 = |c| exactly.
    c = torch.tensor([0.3, -1.2], dtype=F64)
    assert wasserstein2(x, x + c) == pytest.approx(float(c.norm()), abs=1e-9)
    # 1-D, equal sizes: the optimal plan matches order statistics (exact, independent of POT).
    a = torch.randn(300, generator=gen, dtype=F64)
    b = 0.5 * torch.randn(300, generator=gen, dtype=F64) ** 3 + 1
    sorted_w2 = float((a.sort().values - b.sort().values).pow(2).mean().sqrt())
    assert wasserstein2(a[:, None], b[:, None].float()) == pytest.approx(sorted_w2, rel=1e-6)
    # float32 input b: the cost is computed in float64 after the cast, so only b's rounding (1e-7) enters.


def test_w2_samples_approach_closed_form():
    m1, s1 = [0.0, 0.0], [[1.0, 0.3], [0.3, 0.5]]
    m2, s2 = [1.0, -0.5], [[0.5, 0.0], [0.0, 2.0]]
    exact = gaussian_w2(m1, s1, m2, s2)                    # 1.384
    n = 2000
    gen = seeded(0)
    x, y = gaussian_samples(n, m1, s1, gen), gaussian_samples(n, m2, s2, gen)
    est = wasserstein2(x, y, max_samples=n)
    # At n = 2000 the empirical W2 has sd ≈ 0.031 (20 seeds) and a positive bias ≈ 0.01 (2-D:
    # E W2(μ̂, μ̂')² ≈ 0.023 for two samples of one law, adding ≈ 0.023/(2·W2)). Tolerance 0.12 ≈ 4 sd.
    assert abs(est - exact) < 0.12
    # A clearly different target is clearly resolved: W2 to N(m2 + (2, 0), S2) is ≥ 2 − 1.38 > 0.6 away.
    far = gaussian_samples(n, [3.0, -0.5], s2, gen)
    assert wasserstein2(x, far, max_samples=n) > exact + 0.4


def test_w2_subsampling_is_reproducible():
    x = torch.randn(3000, 2, generator=seeded(1))
    y = torch.randn(3000, 2, generator=seeded(2)) + 1
    a = wasserstein2(x, y, max_samples=500, generator=seeded(7))
    b = wasserstein2(x, y, max_samples=500, generator=seeded(7))
    assert a == b
    # The subsample estimate of W2(N(0,I), N((1,1),I)) = √2: 500-point sd ≈ 0.05 → tolerance 0.25.
    assert abs(a - math.sqrt(2)) < 0.25
    with pytest.raises(ValueError, match="dimensions differ"):
        wasserstein2(x, y[:, :1])
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert math.isnan(wasserstein2(nan[:100], y[:100]))   # non-finite samples: nan, not an error


# --------------------------------------------------------------------------------------------- energy

def test_energy_distance_hand_examples():
    # 1-D: x = {0, 1}, y = {3, 5}. Cross mean (3 + 5 + 2 + 4)/4 = 3.5; within-x U-statistic
    # (|0−1| + |1−0|)/2 = 1; within-y 2. D² = 2·3.5 − 1 − 2 = 4.
    assert energy_distance([[0.0], [1.0]], [[3.0], [5.0]]) == pytest.approx(4.0, abs=1e-12)
    # 2-D: x = {(0,0), (3,4)}, y = {(6,8), (6,8)}. Cross (10 + 10 + 5 + 5)/4 = 7.5, within-x 5,
    # within-y 0: D² = 15 − 5 − 0 = 10. (A V-statistic would give 15 − 2.5 − 0 = 12.5.)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = np.array([[6.0, 8.0], [6.0, 8.0]])
    assert energy_distance(x, y) == pytest.approx(10.0, abs=1e-12)
    assert energy_distance(y, x) == pytest.approx(10.0, abs=1e-12)       # symmetric
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance([[0.0]], [[1.0], [2.0]])


def test_energy_distance_chunking_matches_direct():
    # Larger than one cdist chunk (1024 rows): compare with a direct O(n²) computation.
    gen = seeded(3)
    x = torch.randn(1500, 3, generator=gen, dtype=F64)
    y = torch.randn(1100, 3, generator=gen, dtype=F64) * 1.3
    n, m = len(x), len(y)
    direct = (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).sum() / (n * (n - 1))
              - torch.cdist(y, y).sum() / (m * (m - 1)))
    assert energy_distance(x, y) == pytest.approx(float(direct), abs=1e-6)


def _abs_mean_normal(mu: float, var: float) -> float:
    """E|Z| for Z ~ N(mu, var) (folded normal mean)."""
    s = math.sqrt(var)
    return s * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * var)) + mu * (1 - 2 * norm.cdf(-mu / s))


def test_energy_distance_gaussians():
    # 1-D X ~ N(0,1), Y ~ N(1,1): X − Y ~ N(−1, 2) and X − X' ~ N(0, 2), so
    # D² = 2 E|N(1,2)| − 2 E|N(0,2)| = 0.5418 in closed form.
    exact = 2 * _abs_mean_normal(1.0, 2.0) - 2 * _abs_mean_normal(0.0, 2.0)
    n = 2000
    gen = seeded(0)
    x = torch.randn(n, 1, generator=gen, dtype=F64)
    y = torch.randn(n, 1, generator=gen, dtype=F64) + 1
    z = torch.randn(n, 1, generator=gen, dtype=F64)
    # Different laws: a non-degenerate U-statistic, sd ≈ 0.037 at n = 2000 (20 seeds) → tolerance 0.15.
    assert abs(energy_distance(x, y) - exact) < 0.15
    # Same law: degenerate U-statistic, fluctuations O(1/n); sd ≈ 0.0018 at n = 2000 (20 seeds) →
    # |D²| < 0.01 (5.5 sd), far below the 0.54 of the shifted pair.
    same = energy_distance(x, z)
    assert abs(same) < 0.01
    # 2-D, same law vs a mild scale change: the changed law is resolved clearly.
    a = torch.randn(n, 2, generator=gen, dtype=F64)
    b = torch.randn(n, 2, generator=gen, dtype=F64)
    c = 1.5 * torch.randn(n, 2, generator=gen, dtype=F64)
    assert abs(energy_distance(a, b)) < 0.01 < 0.05 < energy_distance(a, c)


# --------------------------------------------------------------------------------------------- histogram KL

def test_histogram_kl_hand_example():
    # Reference uniform on [−1, 1]² (ρ = 1/4) on a 2×2 grid (ΔA = 1, reference mass 1/4 per bin).
    # Samples: 3 in bin (0,0), 1 in bin (1,1), 1 outside the square (N = 5 counts it).
    # Masses q = (count/5 + ε)/(1 + 4ε); KL = Σ (1/4) log((1/4)/q).
    samples = torch.tensor([[-0.5, -0.5], [-0.2, -0.9], [-0.99, -0.01], [0.5, 0.5], [3.0, 0.0]])
    uniform = lambda x: torch.full((x.shape[0],), math.log(0.25), dtype=x.dtype)  # noqa: E731
    eps = 1e-3
    q = (np.array([3 / 5, 0, 0, 1 / 5]) + eps) / (1 + 4 * eps)
    want = float(np.sum(0.25 * np.log(0.25 / q)))
    assert histogram_kl(samples, uniform, bins=2, eps=eps) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="2-D samples"):
        histogram_kl(torch.zeros(5, 3), uniform)


def test_checkerboard_log_density_definition():
    pts = torch.tensor([[-0.9, -0.9], [-0.6, -0.1], [-0.1, -0.1], [0.9, 0.9], [0.6, 0.9], [1.5, 0.0],
                        [0.1, -0.6]], dtype=F64)
    # cells ⌊4u⌋ with u = (x+1)/2: (0,0) kept, (0,1) not, (1,1) kept, (3,3) kept, (3,3) kept, outside,
    # (2,0) kept.
    want = torch.tensor([0.5, 0, 0.5, 0.5, 0.5, 0, 0.5], dtype=F64)
    assert torch.equal(checkerboard_log_density(pts).exp(), want)
    # Density integrates to 1: 8 cells of area 1/4 at density 1/2 (midpoint rule on an aligned grid).
    c = -1 + (torch.arange(400, dtype=F64) + 0.5) / 200
    grid = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    assert float(checkerboard_log_density(grid).exp().sum() / 200**2) == pytest.approx(1.0, abs=1e-12)


def test_checkerboard_kl_exact_vs_uniform():
    n = 64_000
    gen = seeded(0)
    exact_samples = checkerboard(n, gen)
    uniform = torch.rand(n, 2, generator=gen) * 2 - 1
    # Exact samples: the binned KL is 0 in the limit; the histogram noise adds ≈ (K − 1)/(2N) with
    # K = 1348 occupied bins at 50 bins (1152 interior kept bins + 196 bins straddling the edges ±1/2),
    # i.e. 0.0105, with sd ≈ 0.0004 (20 seeds). Tolerance ±0.003 (7 sd); the mismatched uniform is ~0.66.
    kl_exact = checkerboard_kl(exact_samples)
    assert abs(kl_exact - 1347 / (2 * n)) < 0.003
    # Uniform on the square: ρ̂ = 1/4, so every interior kept bin costs ΔA·½·log 2 and the 196
    # straddling bins (ρ̄1 = 1/4) nothing: KL = log 2 · (1 − m) with straddle mass
    # m = ¼·(4·2·0.04 − 4·0.04²) = 0.0784, plus noise bias (2·1152 + 196)/(2N) = 0.0195;
    # sd ≈ 0.0043 (20 seeds) → tolerance 0.02.
    want_uniform = math.log(2) * (1 - 0.0784) + (2 * 1152 + 196) / (2 * n)
    assert abs(checkerboard_kl(uniform) - want_uniform) < 0.02
    # Aligned bins (48 = 4·12): no straddling bins, KL → log 2; bias (2·1152)/(2N) = 0.018.
    assert abs(checkerboard_kl(uniform, bins=48) - (math.log(2) + 2304 / (2 * n))) < 0.02
    # With aligned bins the bin-average reference equals the spec's bin-centre rule exactly...
    assert checkerboard_kl(exact_samples, bins=48, subdivisions=1) == \
        pytest.approx(checkerboard_kl(exact_samples, bins=48), rel=1e-12)
    # ...while at 50 bins the centre rule puts ρ1 ∈ {0, ½} on bins that hold ¼ (centres on the edges),
    # which alone adds ≈ 98 bins · ΔA · ½ · log 2 ≈ 0.054 to exact samples.
    assert checkerboard_kl(exact_samples, subdivisions=1) > kl_exact + 0.03


def test_checkerboard_kl_penalises_mass_outside():
    # Appending M samples outside the square scales every bin mass by N/(N + M) and nothing else, so KL
    # grows by Σ ΔA ρ̄1 · log((N + M)/N) = log((N + M)/N) exactly (up to ε = 1e-8 per bin).
    n, m = 64_000, 16_000
    x = checkerboard(n, seeded(5))
    outside = torch.full((m, 2), 1.5)
    outside[::2] = float("nan")                          # non-finite samples count as outside too
    diff = checkerboard_kl(torch.cat([x, outside])) - checkerboard_kl(x)
    assert diff == pytest.approx(math.log((n + m) / n), abs=1e-5)
    # Collapsed samples (all in one bin): finite thanks to ε, and huge.
    assert 5.0 < checkerboard_kl(torch.full((1000, 2), -0.9)) < math.inf


def test_histogram_kl_gmm():
    means = [[-1.5, -1.0], [1.5, 0.5], [0.0, 1.8]]
    stds = [0.5, 0.6, 0.4]
    weights = [0.3, 0.5, 0.2]
    gmm = GaussianMixture(means, stds=stds, weights=weights)
    shifted = GaussianMixture(np.array(means) + 0.5, stds=stds, weights=weights)
    n = 64_000
    gen = seeded(0)
    kl = lambda s: histogram_kl(s, gmm.log_prob, bins=50, low=-4.0, high=4.0)  # noqa: E731
    same = kl(gmm.sample(n, generator=gen))
    moved = kl(shifted.sample(n, generator=gen))
    # Samples of the reference itself: the noise bias is ≈ (K − 1)/(2N) ≤ 2499/128000 = 0.0195 over the
    # 2500 bins; the midpoint quadrature and the 7e-6 of mass outside [−4, 4]² are negligible. Over 20
    # seeds: mean 0.0196, sd 0.001 → bound 0.03.
    assert 0 < same < 0.03
    # A 0.5-shift of every mean (≈ a std) is a large KL (≈ 1.0 here), far above the noise floor.
    assert moved > 0.5
