"""Sample-quality metrics: exact W2 (POT), energy distance, histogram KL against an exact density, map
error, and the closed-form W2 between Gaussians (for tests). Inputs are tensors or arrays ``(N, d)``
(a 1-D input is ``(N, 1)``); every metric computes in float64 on the CPU and returns a Python float.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["wasserstein2", "energy_distance", "histogram_kl", "checkerboard_kl",
           "checkerboard_log_density", "mean_map_error", "gaussian_w2"]


def _as_tensor(x) -> Tensor:
    """``(N, d)`` float64 CPU tensor, detached; a 1-D input is one feature ``(N, 1)``."""
    x = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if x.ndim == 0:
        raise ValueError("metrics need samples of shape (N, d), got a scalar")
    return x.reshape(x.shape[0], -1).to(device="cpu", dtype=torch.float64)


def _pair(x, y) -> tuple[Tensor, Tensor]:
    x, y = _as_tensor(x), _as_tensor(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"empty sample set (sizes {x.shape[0]} and {y.shape[0]})")
    return x, y


def _subsample(x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """At most ``n`` rows of ``x``, drawn without replacement (``x`` itself if it is small enough)."""
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:n]]


def wasserstein2(x, y, max_samples: int = 2000, generator: torch.Generator | None = None) -> float:
    """2-Wasserstein distance between the empirical measures of ``x`` and ``y``:

        W2(μ̂, ν̂)² = min_{π ∈ Π(a, b)} Σ_ij π_ij |x_i − y_j|²,   a = 1/n, b = 1/m (uniform weights),

    solved exactly by the network simplex (POT ``ot.emd2`` on the ``ot.dist`` squared Euclidean cost,
    float64); returns ``W2`` (the square root of the optimal cost).

    Sets larger than ``max_samples`` are first subsampled without replacement (with ``generator``), so
    the value is then an *estimate* of W2 between the underlying laws. Even without subsampling an
    empirical W2 overestimates the population one (the empirical measures are not transported onto each
    other at zero cost even when the laws agree: ``E W2(μ̂_n, μ̂'_n)² ~ log n / n`` in 2-D and slower in
    higher dimension), so compare methods at the same ``max_samples``. Non-finite inputs give ``nan``.
    ``ot.dist`` forms the cost as ``|x|² + |y|² − 2 x·y``, so a zero distance comes out as ~1e-8·|x|.
    """
    import ot

    x, y = _pair(x, y)
    x = _subsample(x, max_samples, generator).numpy()
    y = _subsample(y, max_samples, generator).numpy()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    cost = ot.dist(x, y, metric="sqeuclidean")
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    return math.sqrt(max(float(ot.emd2(a, b, cost, numItermax=10_000_000)), 0.0))


def _mean_pairwise(a: Tensor, b: Tensor, same: bool, chunk: int = 1024) -> float:
    """``mean_{i,j} |a_i − b_j|``; with ``same`` (``b is a``) the U-statistic mean over ``i ≠ j``."""
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        block = torch.cdist(a[i:i + chunk], b)
        if same:  # the diagonal is 0 in exact arithmetic; the matmul path of cdist leaves round-off
            rows = torch.arange(block.shape[0])
            block[rows, rows + i] = 0.0
        total += block.sum().item()
    n, m = a.shape[0], b.shape[0]
    return total / (n * (n - 1)) if same else total / (n * m)


def energy_distance(x, y, max_samples: int = 4000, generator: torch.Generator | None = None) -> float:
    """The **squared** energy distance (Székely's ``E``-statistic; the quantity that is 0 iff the laws
    agree, not its square root):

        D² = 2 E|X − Y| − E|X − X'| − E|Y − Y'|,

    estimated with the cross term averaged over all ``n·m`` pairs and the within-sample terms as
    U-statistics over ``i ≠ j`` (``Σ_{i≠j} |x_i − x_j| / (n(n − 1))``). Every term is then unbiased, so
    the estimate is unbiased for ``D²`` and can be slightly negative when the laws agree (fluctuations of
    order ``1/n``). Sets larger than ``max_samples`` are subsampled first; pairwise distances are
    computed with ``torch.cdist`` in row chunks (memory ``O(chunk · m)``). Needs at least 2 samples each.
    """
    x, y = _pair(x, y)
    x, y = _subsample(x, max_samples, generator), _subsample(y, max_samples, generator)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"energy distance needs at least 2 samples per set, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    return (2 * _mean_pairwise(x, y, False) - _mean_pairwise(x, x, True)
            - _mean_pairwise(y, y, True))


def histogram_kl(samples, log_density_fn: Callable[[Tensor], Tensor], bins: int = 50,
                 low: float = -1.0, high: float = 1.0, eps: float = 1e-8,
                 subdivisions: int = 1) -> float:
    """Histogram KL of spec Q11 against an exact 2-D density ``ρ = exp(log_density_fn)``:

        KL(ρ ‖ ρ̂_hist) = Σ_ij ΔA ρ̄_ij log(ρ̄_ij / ρ̂_ij),   ΔA = ((high − low)/bins)²,

    on the ``bins × bins`` grid over ``[low, high]²``. ``ρ̂_ij`` is the histogram density of the samples
    (count / (N ΔA)) and ``ρ̄_ij`` the reference density of bin ``ij``: with ``subdivisions = 1`` its value
    ``ρ(x_ij)`` at the bin centre (the spec's formula, a midpoint rule), with ``s > 1`` the mean of ``ρ`` on
    the ``s × s`` midpoint sub-grid of the bin (exact bin average for densities that are constant on
    sub-cells, see :func:`checkerboard_kl`).

    * ``N`` is the *total* number of samples: samples outside the square (or non-finite) count in the
      total but in no bin, so mass that leaves the square is penalised.
    * Empty bins (ε-smoothing): ``eps`` probability mass is added to every bin and the masses are divided
      by ``1 + eps·bins²``. An empty bin with ``ρ̄ > 0`` then costs ``ΔA ρ̄ log(ΔA ρ̄ / eps)`` (finite);
      with ``eps = 1e-8`` and 64k samples (one sample = 1.6e-5 of mass) occupied bins are unaffected.
    * Bins with ``ρ̄_ij = 0`` contribute 0 (``0 log 0 = 0``).
    * It is a true KL between binned measures (≥ 0, = 0 iff the binned masses agree, up to ``eps``) when
      ``Σ ΔA ρ̄ = 1``, i.e. the window holds all the reference mass; otherwise it is a truncated sum.

    ``log_density_fn`` maps a float64 tensor ``(M, 2)`` to ``(M,)`` (e.g.
    ``flowmaps.exact.GaussianMixture(...).log_prob``); ``-inf`` marks zero density.
    """
    x = _as_tensor(samples)
    if x.shape[1] != 2:
        raise ValueError(f"histogram KL needs 2-D samples, got dimension {x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("histogram KL needs at least one sample")
    if not high > low or bins < 1 or subdivisions < 1 or not eps >= 0:
        raise ValueError("histogram KL needs high > low, bins >= 1, subdivisions >= 1, eps >= 0")
    width = (high - low) / bins
    area = width * width
    # Histogram: count / N per bin (N = all samples), ε-smoothed, as a density.
    inside = ((x >= low) & (x < high)).all(dim=1)
    ij = ((x[inside] - low) / width).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(bins * bins, dtype=torch.float64)
    counts.index_add_(0, ij[:, 0] * bins + ij[:, 1], torch.ones(ij.shape[0], dtype=torch.float64))
    mass = (counts / x.shape[0] + eps) / (1.0 + eps * bins * bins)
    q = mass / area
    # Reference: ρ averaged on an s × s midpoint sub-grid of each bin (s = 1: the bin centre).
    s = int(subdivisions)
    fine = low + (torch.arange(bins * s, dtype=torch.float64) + 0.5) * (width / s)
    grid = torch.stack(torch.meshgrid(fine, fine, indexing="ij"), dim=-1).reshape(-1, 2)
    rho = torch.as_tensor(log_density_fn(grid)).to(torch.float64).reshape(-1).exp()
    p = rho.reshape(bins, s, bins, s).mean(dim=(1, 3)).reshape(-1)
    keep = p > 0
    return float((area * p[keep] * (p[keep].log() - q[keep].log())).sum())


def checkerboard_log_density(x: Tensor) -> Tensor:
    """Exact log-density of the ``[−1, 1]²`` 4×4 checkerboard (spec Q12): the 8 kept cells (``⌊4u⌋ +
    ⌊4v⌋`` even, ``u = (x + 1)/2``) have area 1/4 each, so ``ρ1 = 1/2`` on them and 0 elsewhere
    (``log 0 = −inf``). Points on a cell edge take the cell given by ``floor``."""
    cell = ((x + 1.0) * 2.0).floor()
    inside = ((x >= -1) & (x < 1)).all(dim=1)
    kept = inside & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
    return torch.where(kept, torch.full_like(x[:, 0], math.log(0.5)),
                       torch.full_like(x[:, 0], -math.inf))


def checkerboard_kl(samples, bins: int = 50, eps: float = 1e-8, subdivisions: int = 4) -> float:
    """Checkerboard KL of spec §5.2.3 / Q11, ``KL(ρ1 ‖ ρ̂_hist)`` on a ``bins × bins`` grid over
    ``[−1, 1]²`` via :func:`histogram_kl` (total-count normalisation, ``eps`` smoothing: see there).
    Our resolution of Q11 — **not verified against [P2] eq. (103)**.

    Bin reference density: the spec evaluates ``ρ1`` at the bin centres ``x_ij``, which is exact only
    when the bins align with the cells (``bins`` a multiple of 4). With ``bins = 50`` a cell is 12.5 bins
    wide, so the centres of bin rows/columns 12 and 37 sit *on* the cell edges ``±1/2`` and ``ρ1(x_ij)``
    there is 1/2 or 0 depending on round-off, while those bins truly hold density 1/4. This costs exact
    samples ≈ 0.06 of spurious KL. The default ``subdivisions = 4`` therefore uses the exact bin average
    ``ρ̄1_ij`` (the 4×4 midpoint sub-grid resolves every cell edge, which falls at a multiple of 1/4 of a
    bin width, exactly), making the formula exact for any ``bins`` and identical to the spec's centre
    rule whenever ``bins % 4 == 0``; ``subdivisions = 1`` gives the literal centre rule.

    Reference values (no-noise limit, N → ∞): exact checkerboard samples → 0; uniform on the square
    (``ρ̂ = 1/4``) → ``log 2 · (1 − m)``, where ``m`` is the ``ρ1``-mass of the bins that straddle a cell
    edge (their ``ρ̄1 = 1/4 = ρ̂``, so they contribute 0): ``m = 0`` (KL = ``log 2``) when ``bins % 4 == 0``,
    ``m = (1/4)(4 · 2 · 0.04 − 4 · 0.04²) = 0.0784`` (KL ≈ 0.6388) for 50 bins. At finite ``N`` the
    histogram noise adds a positive bias ``≈ Σ_ij ρ̄1_ij / (2 N ρ̂_ij)`` over occupied bins, i.e.
    ``(K − 1)/(2N)`` for exact samples with ``K`` occupied bins (K = 1348, bias ≈ 0.0105 for 50 bins and
    N = 64k), and ``(2 · 1152 + 196)/(2N) ≈ 0.0195`` for the uniform square at the same settings.
    """
    return histogram_kl(samples, checkerboard_log_density, bins=bins, low=-1.0, high=1.0, eps=eps,
                        subdivisions=subdivisions)


def mean_map_error(x_hat, x_ref) -> float:
    """``(1/N) Σ_n |x̂_n − x_ref,n|``: mean over samples of the Euclidean norm of the difference (over all
    non-batch dimensions)."""
    a, b = _as_tensor(x_hat), _as_tensor(x_ref)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).norm(dim=1).mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (negative round-off
    eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_w2(m1, s1, m2, s2) -> float:
    """Closed-form W2 between ``N(m1, S1)`` and ``N(m2, S2)`` (Bures):

        W2² = |m1 − m2|² + tr(S1 + S2 − 2 (S1^{1/2} S2 S1^{1/2})^{1/2}).

    Means are ``(d,)``, covariances ``(d, d)`` symmetric PSD (scalars allowed for d = 1: variances).
    Returns W2 (not squared)."""
    m1, m2 = np.atleast_1d(np.asarray(m1, float)), np.atleast_1d(np.asarray(m2, float))
    s1, s2 = np.atleast_2d(np.asarray(s1, float)), np.atleast_2d(np.asarray(s2, float))
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: means {m1.shape}, {m2.shape}; covariances {s1.shape}, "
                         f"{s2.shape}")
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    value = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))
    return math.sqrt(max(value, 0.0))
