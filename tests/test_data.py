"""Datasets (flowmaps.data): the 2-D generators, the registry, load_array on good and bad files, and the
Standardizer. Self-contained (no conftest fixtures)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2, kstest

from flowmaps.data import (DATASETS, Standardizer, checkerboard, eight_gaussians, load_array,
                           make_dataset, moons, spirals)

torch.set_num_threads(1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- generators

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_generator_shape_dtype_reproducible(name):
    fn = DATASETS[name]
    a, b = fn(500, seeded(3)), fn(500, seeded(3))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)                            # same seed, same data, bit for bit
    assert not torch.equal(a, fn(500, seeded(4)))       # another seed, other data
    assert torch.equal(make_dataset(name, 500, seeded(3)), a)
    assert fn(1, seeded(0)).shape == (1, 2)


def test_registry_names_and_unknown_name():
    assert set(DATASETS) == {"checkerboard", "eight_gaussians", "moons", "spirals"}
    with pytest.raises(ValueError) as err:
        make_dataset("swissroll", 10)
    msg = str(err.value)
    assert "swissroll" in msg and all(name in msg for name in DATASETS)
    with pytest.raises(ValueError, match="number of samples"):
        make_dataset("moons", 0)


def _checker_cells(x: torch.Tensor) -> torch.Tensor:
    """Spec Q12 definition, independently of the sampler: u = (x + 1)/2, cell (⌊4u⌋, ⌊4v⌋)."""
    return torch.floor(4 * (x.double() + 1) / 2).long()


def test_checkerboard_support_and_balance():
    n = 80_000
    x = checkerboard(n, seeded(0))
    assert ((x >= -1) & (x < 1)).all()
    cell = _checker_cells(x)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()     # every point in a kept cell
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16).double()
    kept = counts[[i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]]
    assert kept.sum() == n and (kept > 0).all()           # all 8 kept cells are used
    # The 8 cell counts are multinomial(n, 1/8): Pearson's statistic is ~ χ²(7). Reject only above its
    # 0.999 quantile (24.3), so a correct sampler fails with probability 1e-3 for a random seed (and this
    # seed is fixed). A sampler biased by 2% on one cell would give ≈ (0.02·n/8)²/(n/8) = 40 > 24.3.
    expected = n / 8
    stat = float(((kept - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(0.999, df=7)


def test_checkerboard_uniform_inside_cells():
    # Within its cell a point must be uniform: the offsets frac(4u) ∈ [0, 1) of both coordinates follow
    # U(0, 1). Kolmogorov–Smirnov at n = 20k: reject at p < 1e-3 (a false failure has probability 1e-3).
    x = checkerboard(20_000, seeded(1)).double()
    offsets = 4 * (x + 1) / 2 - _checker_cells(x)
    for k in range(2):
        assert kstest(offsets[:, k].numpy(), "uniform").pvalue > 1e-3


def test_eight_gaussians_modes():
    radius, std = 3.0, 0.05
    x = eight_gaussians(8000, seeded(0), radius=radius, std=std).double()
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centres = radius * torch.stack([angles.cos(), angles.sin()], 1)
    dist = torch.cdist(x, centres)
    nearest = dist.argmin(1)
    resid = x - centres[nearest]
    # Modes are 2·3·sin(π/8) = 2.3 apart, 46 stds, so every point is assigned to its own mode. Each
    # residual coordinate is N(0, std²): the sample std over 16k values is within ±1.1% (1 sd = 0.56%).
    assert torch.bincount(nearest, minlength=8).min() > 8000 / 8 * 0.8
    assert abs(float(resid.std()) / std - 1) < 0.03
    assert abs(float(resid.mean())) < 5 * std / math.sqrt(16_000)


def test_moons_noise_free_lie_on_the_two_arcs():
    # moons(noise=0) = 1.5·(p − (0.5, 0.25)) with p on the upper unit half circle (centre (0, 0), y ≥ 0) or
    # on the lower one (centre (1, 0.5), y ≤ 0.5): invert the affine map and check the radius.
    x = moons(2000, seeded(0), noise=0.0).double()
    p = x / 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)
    r_upper = p.norm(dim=1)
    r_lower = (p - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    upper = (r_upper - 1).abs() < 1e-5
    lower = (r_lower - 1).abs() < 1e-5
    assert (upper | lower).all()
    assert (p[upper & ~lower, 1] >= -1e-6).all() and (p[lower & ~upper, 1] <= 0.5 + 1e-6).all()
    # Both moons used about equally: Binomial(2000, 1/2) has sd 22; allow ±5 sd.
    assert abs(int(upper.sum()) - 1000) < 110
    # Centred: the mean of the noise-free moons is 1.5·((0.5, 0.25) − (0.5, 0.25)) = 0 in expectation
    # (E cos θ = 0, E sin θ = 2/π on both arcs); coordinates have sd ≤ 1.5, so |mean| < 5·1.5/√2000.
    assert x.mean(0).abs().max() < 5 * 1.5 / math.sqrt(2000)


def test_spirals_noise_free_follow_the_arms():
    turns = 1.5
    x = spirals(2000, seeded(0), turns=turns, noise=0.0).double()
    r = x.norm(dim=1) / 2                                   # radius 2r, r ∈ [0, 1]
    assert (r <= 1 + 1e-6).all()
    theta = 2 * math.pi * turns * r
    # The polar angle equals θ (arm 0) or θ + π (arm 1) modulo 2π.
    phi = torch.atan2(x[:, 1], x[:, 0])
    d0 = torch.remainder(phi - theta + math.pi, 2 * math.pi) - math.pi
    d1 = torch.remainder(phi - theta, 2 * math.pi) - math.pi
    big = r > 1e-3                                          # the angle is undefined at the origin
    assert (torch.minimum(d0.abs(), d1.abs())[big] < 1e-4).all()


# --------------------------------------------------------------------------------------------- load_array

def test_load_npy_roundtrip(tmp_path):
    arr = np.random.default_rng(0).normal(size=(7, 3))
    np.save(tmp_path / "a.npy", arr)
    x = load_array(tmp_path / "a.npy")
    assert x.dtype == torch.float32 and x.shape == (7, 3)
    assert torch.equal(x, torch.from_numpy(arr).float())
    np.save(tmp_path / "ints.npy", np.arange(6, dtype=np.int64).reshape(3, 2))
    assert torch.equal(load_array(str(tmp_path / "ints.npy")), torch.arange(6.0).reshape(3, 2))
    np.save(tmp_path / "one.npy", np.array([1.0, 2.0, 3.0]))  # 1-D → one feature
    assert load_array(tmp_path / "one.npy").shape == (3, 1)


def test_load_csv_with_and_without_header(tmp_path):
    rows = "1.5,-2\n3,4e-1\n\n-0.25, 7\n"                 # a blank line and spaces are tolerated
    want = torch.tensor([[1.5, -2.0], [3.0, 0.4], [-0.25, 7.0]])
    (tmp_path / "plain.csv").write_text(rows)
    (tmp_path / "head.csv").write_text("x,y\n" + rows)
    (tmp_path / "bom.CSV").write_text("\ufeff" + rows, encoding="utf-8")  # BOM, upper-case suffix
    for name in ("plain.csv", "head.csv", "bom.CSV"):
        x = load_array(tmp_path / name)
        assert x.dtype == torch.float32 and torch.equal(x, want), name
    (tmp_path / "col.csv").write_text("v\n1\n2\n")
    assert load_array(tmp_path / "col.csv").shape == (2, 1)


def _bad(path, exc, *words):
    with pytest.raises(exc) as err:
        load_array(path)
    msg = str(err.value)
    assert "\n" not in msg, msg                           # one-line messages
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def test_load_array_bad_inputs(tmp_path):
    _bad(tmp_path / "missing.npy", FileNotFoundError, "not found", "missing.npy")
    (tmp_path / "d.txt").write_text("1,2\n")
    _bad(tmp_path / "d.txt", ValueError, "unsupported", ".txt")
    (tmp_path / "empty.csv").write_text("")
    _bad(tmp_path / "empty.csv", ValueError, "empty")
    (tmp_path / "blank.csv").write_text("\n  \n")
    _bad(tmp_path / "blank.csv", ValueError, "empty")
    (tmp_path / "empty.npy").write_bytes(b"")
    _bad(tmp_path / "empty.npy", ValueError, "empty")
    (tmp_path / "head_only.csv").write_text("x,y\n")
    _bad(tmp_path / "head_only.csv", ValueError, "no data rows")
    np.save(tmp_path / "zero_rows.npy", np.zeros((0, 3)))
    _bad(tmp_path / "zero_rows.npy", ValueError, "no data", "(0, 3)")
    (tmp_path / "words.csv").write_text("x,y\n1,2\n3,abc\n")
    _bad(tmp_path / "words.csv", ValueError, "non-numeric", "line 3")
    (tmp_path / "typo_first.csv").write_text("1,2x\n3,4\n")  # a numeric field: not a header
    _bad(tmp_path / "typo_first.csv", ValueError, "non-numeric", "line 1")
    (tmp_path / "semi.csv").write_text("1;2\n3;4\n")
    _bad(tmp_path / "semi.csv", ValueError, "comma")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    _bad(tmp_path / "ragged.csv", ValueError, "columns")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    _bad(tmp_path / "cube.npy", ValueError, "2-D", "(2, 3, 4)")
    np.save(tmp_path / "scalar.npy", np.float64(1.0))
    _bad(tmp_path / "scalar.npy", ValueError, "2-D")
    arr = np.ones((4, 2))
    arr[0, 0], arr[1, 1], arr[2, 0] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "nan.npy", arr)
    _bad(tmp_path / "nan.npy", ValueError, "1 NaN", "2 infinite")
    (tmp_path / "nan.csv").write_text("1,nan\n2,3\n")
    _bad(tmp_path / "nan.csv", ValueError, "1 NaN", "0 infinite")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _bad(tmp_path / "obj.npy", ValueError, "pickle")
    import pickle
    (tmp_path / "pickled.npy").write_bytes(pickle.dumps([[1.0, 2.0]]))  # a pickle named .npy
    _bad(tmp_path / "pickled.npy", ValueError, "pickle")
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    _bad(tmp_path / "strings.npy", ValueError, "not real numeric")
    np.save(tmp_path / "complex.npy", np.ones((2, 2), dtype=complex))
    _bad(tmp_path / "complex.npy", ValueError, "not real numeric")
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file at all")
    _bad(tmp_path / "garbage.npy", ValueError, "not a valid .npy")
    (tmp_path / "dir.npy").mkdir()
    _bad(tmp_path / "dir.npy", ValueError, "not a regular file")


# --------------------------------------------------------------------------------------------- Standardizer

def test_standardizer_fit_roundtrip_and_json():
    gen = seeded(0)
    x = torch.randn(1000, 3, generator=gen) * torch.tensor([0.1, 2.0, 30.0]) + torch.tensor([5.0, -1, 0])
    st = Standardizer.fit(x)
    assert st.mean.shape == st.std.shape == (3,)
    z = st.transform(x)
    # Exact by construction (float32 round-off only): standardized data have mean 0 and unbiased std 1.
    assert torch.allclose(z.double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.double().std(0), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(st.inverse(z), x, rtol=1e-5, atol=1e-4)
    d = json.loads(json.dumps(st.to_dict()))               # JSON-able, as in checkpoint metadata
    back = Standardizer.from_dict(d)
    assert torch.equal(back.mean, st.mean) and torch.equal(back.std, st.std)  # float32 ↔ JSON is exact
    assert torch.equal(back.inverse(z), st.inverse(z))


def test_standardizer_degenerate_and_invalid():
    x = torch.tensor([[1.0, 2.0], [1.0, 4.0]])              # first feature constant
    st = Standardizer.fit(x)
    assert st.std[0] > 0 and torch.isfinite(st.transform(x)).all()
    one = Standardizer.fit(torch.tensor([[3.0, 4.0]]))      # a single sample: std undefined → clamped
    assert torch.isfinite(one.std).all() and torch.equal(one.transform(torch.tensor([[3.0, 4.0]])),
                                                         torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        Standardizer.from_dict({"mean": [0.0, 1.0], "std": [1.0]})
    with pytest.raises(ValueError, match="positive"):
        Standardizer.from_dict({"mean": [0.0], "std": [0.0]})
    with pytest.raises(ValueError, match="mean"):
        Standardizer.from_dict({"std": [1.0]})
