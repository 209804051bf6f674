"""Shared fixtures of the mathematical test suite.

Reference problems (spec §6.3): the 2-D, 3-component Gaussian mixture with weights (0.5, 0.3, 0.2), means
(2, 0), (−1, 1.5), (0, −2) and covariances [[0.3, 0.1], [0.1, 0.2]], diag(0.05, 0.4), 0.1·I, whose exact
mean is (0.7, 0.05) and covariance [[1.995, −0.435], [−0.435, 1.7125]]; and a diagonal Gaussian, whose flow
map is affine and known in closed form. Every exactness test runs in float64.

Time convention: t = 0 base (noise), t = 1 data; X_{s,t}(x) = x + (t − s) v_{s,t}(x).
"""

from __future__ import annotations

import pytest
import torch

from flowmaps import Linear, Trigonometric
from flowmaps.exact import Gaussian, GaussianMixture

torch.set_num_threads(1)

F64 = torch.float64

GMM_WEIGHTS = (0.5, 0.3, 0.2)
GMM_MEANS = ((2.0, 0.0), (-1.0, 1.5), (0.0, -2.0))
GMM_COVS = (((0.3, 0.1), (0.1, 0.2)), ((0.05, 0.0), (0.0, 0.4)), ((0.1, 0.0), (0.0, 0.1)))
GMM_MEAN = (0.7, 0.05)                               # spec §6.3, exact
GMM_COV = ((1.995, -0.435), (-0.435, 1.7125))        # spec §6.3, exact

SIGMA0_VECTOR = (0.7, 1.3)                           # per-dimension base scale (spec Q17)

# RK4 steps of the exact GMM flow in the exactness tests. Forward-mode JVPs through the integrator cost
# ~25x a forward solve, so this is kept modest. RK4 is fourth order (test_exact checks the order); the
# global error of GaussianMixture.flow over the whole of [0, 1] at 64 steps is at most ~3e-5 (max over
# base points, every case here, against a 1000-step solve); tolerances below are set from that.
EXACT_STEPS = 64
RK4_TOL = 2e-4  # pointwise tolerance for identities of the 64-step exact map (10x its global error)


def make_interpolant(kind: str, sigma0=1.0):
    return {"linear": Linear, "trig": Trigonometric}[kind](
        torch.tensor(sigma0, dtype=F64) if isinstance(sigma0, tuple) else sigma0)


# (interpolant kind, sigma0): Linear and Trigonometric, the plain base, the scaled base σ0 = 0.5 of [C2],
# and a per-dimension σ0 vector.
INTERPOLANT_CASES = {
    "linear": ("linear", 1.0),
    "trig": ("trig", 1.0),
    "linear-s0.5": ("linear", 0.5),
    "trig-s0.5": ("trig", 0.5),
    "linear-svec": ("linear", SIGMA0_VECTOR),
    "trig-svec": ("trig", SIGMA0_VECTOR),
}
# A cheaper subset for the tests that differentiate through the RK4 integrator.
JVP_CASES = ("linear", "trig-svec")


def build_gmm(case: str, steps: int = EXACT_STEPS) -> GaussianMixture:
    kind, sigma0 = INTERPOLANT_CASES[case]
    return GaussianMixture(GMM_MEANS, covs=GMM_COVS, weights=GMM_WEIGHTS,
                           interpolant=make_interpolant(kind, sigma0), steps=steps)


def build_gaussian(case: str) -> Gaussian:
    kind, sigma0 = INTERPOLANT_CASES[case]
    return Gaussian(mean=(0.5, -1.0), std=(0.6, 1.5), interpolant=make_interpolant(kind, sigma0))


@pytest.fixture(params=list(INTERPOLANT_CASES))
def interpolant_case(request) -> str:
    return request.param


@pytest.fixture
def interpolant(interpolant_case):
    return make_interpolant(*INTERPOLANT_CASES[interpolant_case])


@pytest.fixture
def gmm(interpolant_case) -> GaussianMixture:
    """The spec §6.3 mixture for every interpolant case (RK4 flow with EXACT_STEPS steps)."""
    return build_gmm(interpolant_case)


@pytest.fixture(params=JVP_CASES)
def gmm_jvp(request) -> GaussianMixture:
    """The spec §6.3 mixture for the cheaper subset of cases (used where JVPs go through RK4)."""
    return build_gmm(request.param)


@pytest.fixture(params=["linear", "trig-svec"])
def gaussian(request) -> Gaussian:
    """Diagonal Gaussian target N((0.5, −1), diag(0.6², 1.5²)): closed-form velocity and flow map."""
    return build_gaussian(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def base_points(reference, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` float64 draws of the reference's base ``N(0, σ0² I)``."""
    like = torch.zeros(n, reference.dim, dtype=F64)
    return reference.interpolant.sample_base(like, generator)
