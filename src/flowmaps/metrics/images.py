"""Metrics of image samples, computed on their features: the Fréchet distance between feature Gaussians
(FID-style) with :class:`FeatureStats` (the statistics a reference is made of), k-NN precision / recall
(Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020). The features come from an
extractor of :mod:`flowmaps.metrics.features`.

Conventions. Features are float64 CPU tensors ``(N, F)`` (NumPy arrays are accepted); every statistic is
computed in float64 and returned as a Python float. Nothing here unpickles: :class:`FeatureStats` files
are ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import _atomic_write
from .points import _as_tensor, _sqrtm_psd, _subsample

__all__ = ["frechet_distance", "FeatureStats", "FeatureStatsError", "precision_recall",
           "density_coverage", "PrecisionRecall", "DensityCoverage"]

STATS_FORMAT = "flowmaps-feature-stats"
STATS_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------- Fréchet distance

def _vector(x) -> np.ndarray:
    x = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    return np.atleast_1d(x).astype(np.float64, copy=False)


def _matrix(x) -> np.ndarray:
    x = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    return np.atleast_2d(x).astype(np.float64, copy=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein, squared) distance between ``N(μ1, Σ1)`` and ``N(μ2, Σ2)``:

        FD = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}),

    the quantity reported as FID when the Gaussians are fitted to Inception features. Means ``(d,)`` and
    covariances ``(d, d)`` (symmetric PSD), as NumPy arrays or tensors; computed in float64.

    The cross term uses only symmetric eigendecompositions: ``Σ1^{1/2}`` from the eigenvectors of
    ``Σ1``, then ``tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2} = Σ_i √λ_i`` over the eigenvalues of that symmetric PSD
    matrix, with round-off negative eigenvalues clipped to 0. Unlike ``scipy.linalg.sqrtm(Σ1 Σ2)`` (the
    usual FID code), this needs no ε-regularisation and yields no imaginary parts for singular
    covariances (more features than samples). Round-off makes identical inputs give ~1e-12·tr Σ, not
    exactly 0; a tiny negative result is returned as 0.0. Non-finite inputs raise :class:`ValueError`.
    """
    mu1, mu2 = _vector(mu1), _vector(mu2)
    s1, s2 = _matrix(sigma1), _matrix(sigma2)
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"Fréchet distance: shapes do not match: means {mu1.shape}, {mu2.shape}; "
                         f"covariances {s1.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("Fréchet distance: means or covariances hold NaN or infinite values")
    r1 = _sqrtm_psd(s1)
    cross = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((cross + cross.T) / 2)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())
    return max(value, 0.0)


class FeatureStatsError(ValueError):
    """A feature-statistics file that cannot be used; the message is one line naming the file."""


@dataclass
class FeatureStats:
    """Mean ``mu (F,)`` and unbiased covariance ``sigma (F, F)`` (float64) of ``n`` feature vectors, and
    which extractor produced them (``extractor`` name, ``fingerprint`` of its weights; "" if unknown).

    Saved as an ``.npz`` (``np.savez``: arrays ``mu``, ``sigma``, ``n`` and a JSON string ``meta``)
    and read with ``np.load(allow_pickle=False)``, so loading never unpickles. Reference statistics of a
    data set are computed once (:func:`compute_feature_stats`) and reused across evaluations.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str = ""
    fingerprint: str = ""

    def __post_init__(self):
        self.mu = _vector(self.mu)
        self.sigma = _matrix(self.sigma)
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FeatureStats: mu {self.mu.shape} and sigma {self.sigma.shape} do not match")
        self.n = int(self.n)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features, extractor: str = "", fingerprint: str = "") -> "FeatureStats":
        """Statistics of ``features (N, F)`` (``N ≥ 2``): sample mean and covariance with ``N − 1``."""
        x = _as_tensor(features).numpy()
        if x.shape[0] < 2:
            raise ValueError(f"FeatureStats needs at least 2 feature vectors, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError("FeatureStats: features hold NaN or infinite values")
        return cls(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), x.shape[0], extractor,
                   fingerprint)

    def frechet_to(self, other: "FeatureStats") -> float:
        """:func:`frechet_distance` to ``other``; refuses statistics of different extractors (fingerprints
        that differ when both are known) or dimensions, whose distance would mean nothing."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise ValueError(f"feature statistics come from different extractors ({self.extractor} "
                             f"{self.fingerprint} vs {other.extractor} {other.fingerprint}); recompute "
                             "one of them with the other's extractor")
        if self.dim != other.dim:
            raise ValueError(f"feature dimensions differ: {self.dim} vs {other.dim}")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` at exactly ``path`` (atomically: temporary file, then rename)."""
        path = Path(path)
        meta = json.dumps({"format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION,
                           "extractor": self.extractor, "fingerprint": self.fingerprint})
        _atomic_write(path, lambda handle: np.savez(handle, mu=self.mu, sigma=self.sigma,
                                                    n=np.int64(self.n), meta=np.array(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read a file written by :meth:`save`; raises :class:`FeatureStatsError` (one line) for anything
        else, including pickles and ``.npz`` files holding object arrays (never unpickled)."""
        path = Path(path)
        if not path.is_file():
            raise FeatureStatsError(f"feature statistics not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise FeatureStatsError(f"{path}: a single .npy array, not a feature-statistics .npz")
            with data:
                missing = {"mu", "sigma", "n", "meta"} - set(data.files)
                if missing:
                    raise FeatureStatsError(f"{path}: not a feature-statistics file (missing "
                                            f"{sorted(missing)})")
                mu, sigma, n, meta = data["mu"], data["sigma"], data["n"], data["meta"]
        except FeatureStatsError:
            raise
        except ValueError as err:  # object arrays / pickled data with allow_pickle=False, bad headers
            what = "holds pickled data or object arrays" if "pickle" in str(err) else "is not valid"
            raise FeatureStatsError(f"{path}: {what}; refusing to load it (feature statistics are "
                                    "plain float arrays)") from None
        except (OSError, EOFError, KeyError) as err:
            raise FeatureStatsError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
        if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or n.dtype.kind not in "iu" or n.ndim != 0 \
                or meta.dtype.kind != "U" or meta.ndim != 0:
            raise FeatureStatsError(f"{path}: unexpected array types in a feature-statistics file")
        try:
            info = json.loads(str(meta[()]))
        except json.JSONDecodeError:
            raise FeatureStatsError(f"{path}: its 'meta' field is not valid JSON") from None
        if not isinstance(info, dict) or info.get("format") != STATS_FORMAT:
            raise FeatureStatsError(f"{path}: not a flowmaps feature-statistics file")
        if info.get("format_version") != STATS_FORMAT_VERSION:
            raise FeatureStatsError(f"{path}: feature-statistics format {info.get('format_version')!r} "
                                    f"is not supported (this library reads {STATS_FORMAT_VERSION})")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FeatureStatsError(f"{path}: holds NaN or infinite values")
        try:
            return cls(mu, sigma, int(n), str(info.get("extractor", "")), str(info.get("fingerprint", "")))
        except ValueError as err:
            raise FeatureStatsError(f"{path}: {err}") from None


# ------------------------------------------------------------- precision / recall, density / coverage

class PrecisionRecall(NamedTuple):
    """What :func:`precision_recall` returns: the fractions of fakes on the real manifold
    (``precision``) and of reals on the fake manifold (``recall``)."""

    precision: float
    recall: float


class DensityCoverage(NamedTuple):
    """What :func:`density_coverage` returns: ``density`` (≈ 1 when the laws agree) and ``coverage``
    (in [0, 1])."""

    density: float
    coverage: float


def _feature_pair(real, fake, k: int, max_samples: int, generator) -> tuple[Tensor, Tensor]:
    x, y = _as_tensor(real), _as_tensor(fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    x, y = _subsample(x, max_samples, generator), _subsample(y, max_samples, generator)
    if k < 1 or x.shape[0] <= k or y.shape[0] <= k:
        raise ValueError(f"k-NN metrics need k >= 1 and more than k samples per set (k={k}, sizes "
                         f"{x.shape[0]} and {y.shape[0]})")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("k-NN metrics: features hold NaN or infinite values")
    return x, y


# Relative slack on the k-NN radii: cdist's matrix-product path rounds d(a, b) and d(b, a) differently
# (~1e-16 |x|² in d²), so without it the k-th neighbour itself, at exactly the radius, could fall
# outside the ball depending on which way round its distance was computed (identical sets would give
# density 1.198 instead of 6/5). 1e-9 is far below any real gap between distances.
_RADIUS_SLACK = 1e-9


def _knn_radii(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest *other* row (times ``1 + 1e-9``)."""
    radii = []
    for i in range(0, x.shape[0], chunk):
        block = torch.cdist(x[i:i + chunk], x)
        rows = torch.arange(block.shape[0])
        block[rows, rows + i] = math.inf
        radii.append(block.kthvalue(k, dim=1).values)
    return torch.cat(radii) * (1.0 + _RADIUS_SLACK)


def _ball_counts(queries: Tensor, centres: Tensor, radii: Tensor,
                 chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each query, how many balls ``B(centre_i, radius_i)`` (closed) hold it; for each centre,
    whether its ball holds any query."""
    counts, covered = [], torch.zeros(centres.shape[0], dtype=torch.bool)
    for i in range(0, queries.shape[0], chunk):
        inside = torch.cdist(queries[i:i + chunk], centres) <= radii[None, :]
        counts.append(inside.sum(dim=1))
        covered |= inside.any(dim=0)
    return torch.cat(counts), covered


def precision_recall(real_features, fake_features, k: int = 3, max_samples: int = 2000,
                     generator: torch.Generator | None = None) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates:

        precision = (1/M) Σ_j 1[∃ i: |y_j − x_i| ≤ NND_k(x_i)]   (fakes on the real manifold)
        recall    = (1/N) Σ_i 1[∃ j: |x_i − y_j| ≤ NND_k(y_j)]   (reals on the fake manifold)

    where ``NND_k`` is the distance to the k-th nearest neighbour within the same set. Sets larger than
    ``max_samples`` are subsampled without replacement (with ``generator``); distances in float64 with
    ``torch.cdist`` in row chunks. Identical sets give (1, 1); far-apart sets (0, 0). Both values depend
    on ``k`` and on the sample sizes, so compare runs at the same settings.
    """
    x, y = _feature_pair(real_features, fake_features, k, max_samples, generator)
    fake_in_real, _ = _ball_counts(y, x, _knn_radii(x, k))
    real_in_fake, _ = _ball_counts(x, y, _knn_radii(y, k))
    return PrecisionRecall(float((fake_in_real > 0).double().mean()),
                           float((real_in_fake > 0).double().mean()))


def density_coverage(real_features, fake_features, k: int = 5, max_samples: int = 2000,
                     generator: torch.Generator | None = None) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020), both built on the real k-NN balls only:

        density  = 1/(k M) Σ_j Σ_i 1[|y_j − x_i| ≤ NND_k(x_i)]   (≈ 1 when the laws agree; can exceed 1)
        coverage = (1/N) Σ_i 1[∃ j: |y_j − x_i| ≤ NND_k(x_i)]    (in [0, 1])

    Subsampling and distances as in :func:`precision_recall`; the paper's default ``k = 5``.
    """
    x, y = _feature_pair(real_features, fake_features, k, max_samples, generator)
    counts, covered = _ball_counts(y, x, _knn_radii(x, k))
    return DensityCoverage(float(counts.double().sum() / (k * y.shape[0])),
                           float(covered.double().mean()))
