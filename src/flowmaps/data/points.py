"""Datasets for 2-D and vector experiments: generators in code, and user arrays from ``.npy``/``.csv``.

Nothing downloads. Every generator is ``fn(n, generator=None) -> Tensor (n, 2)`` (float32) and draws all
its randomness from ``generator``, so a seeded generator reproduces the data exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..standardizer import Standardizer

__all__ = ["checkerboard", "eight_gaussians", "moons", "spirals", "DATASETS", "make_dataset",
           "load_array", "Standardizer"]


def _rand(n: int, generator, *shape) -> Tensor:
    return torch.rand((n, *shape), generator=generator)


def _randn(n: int, generator, *shape) -> Tensor:
    return torch.randn((n, *shape), generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The 4×4 checkerboard on ``[−1, 1]²`` of spec Q12: uniform on the 8 cells ``(i, j)`` of the
    ``[0, 1]²`` board with ``i + j`` even, mapped by ``2u − 1``. Sampled directly inside the cells (a
    uniform cell, then a uniform point in it), so it is exact, with no rejection."""
    cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0],
                         dtype=torch.float32)
    idx = torch.randint(len(cells), (n,), generator=generator)
    u = (cells[idx] + _rand(n, generator, 2)) / 4.0
    return 2.0 * u - 1.0


def eight_gaussians(n: int, generator: torch.Generator | None = None, radius: float = 2.0,
                    std: float = 0.1) -> Tensor:
    """Eight isotropic Gaussians (std ``std``) centred on a circle of radius ``radius``."""
    angles = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
    centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    idx = torch.randint(8, (n,), generator=generator)
    return centres[idx] + std * _randn(n, generator, 2)


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """Two interleaving half circles (as scikit-learn's ``make_moons``), centred and scaled to unit
    order: upper moon ``(cos θ, sin θ)``, lower moon ``(1 − cos θ, 0.5 − sin θ)``, then ``−(0.5, 0.25)``
    and ×1.5, plus Gaussian noise of std ``noise``·1.5."""
    theta = math.pi * _rand(n, generator)
    lower = torch.randint(2, (n,), generator=generator).bool()
    x = torch.where(lower, 1.0 - theta.cos(), theta.cos())
    y = torch.where(lower, 0.5 - theta.sin(), theta.sin())
    pts = torch.stack([x - 0.5, y - 0.25], dim=1)
    return 1.5 * (pts + noise * _randn(n, generator, 2))


def spirals(n: int, generator: torch.Generator | None = None, turns: float = 1.5,
            noise: float = 0.05) -> Tensor:
    """Two interleaved Archimedean spirals (the second rotated by π), radius up to 2, with noise.
    The angle is drawn with density ∝ radius, so points are spread evenly along the arms."""
    r = _rand(n, generator).sqrt()  # density ∝ r: even spacing along the arm
    theta = 2 * math.pi * turns * r
    arm = torch.randint(2, (n,), generator=generator).float()
    phase = math.pi * arm
    pts = 2.0 * r[:, None] * torch.stack([(theta + phase).cos(), (theta + phase).sin()], dim=1)
    return pts + noise * _randn(n, generator, 2)


DATASETS: dict[str, Callable[..., Tensor]] = {
    "checkerboard": checkerboard, "eight_gaussians": eight_gaussians, "moons": moons,
    "spirals": spirals,
}
"""The 2-D generators by name (``data.name``): each ``f(n, generator=None)`` returns ``n`` samples
``(n, 2)``."""


def make_dataset(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples of the named 2-D dataset (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    return DATASETS[name](n, generator)


def load_array(path: str | Path) -> Tensor:
    """Read a numeric ``.npy`` or ``.csv`` file into a float32 tensor of shape ``(N, d)``.

    A 1-D array is one feature, ``(N, 1)``. ``.npy`` is read with ``allow_pickle=False``: object arrays
    (pickles) are refused, never executed. A ``.csv`` holds comma-separated numbers, one sample per line
    (blank lines ignored); its first line is taken as a header and skipped when *none* of its fields is
    a number (so a typo in the first data row is reported, not silently dropped).

    Raises ``FileNotFoundError`` (missing file) or ``ValueError`` with a one-line message naming the file
    and the problem: unsupported extension, empty file or zero rows, non-numeric or ragged CSV content,
    not a valid/numeric ``.npy`` (pickles, object, structured or complex arrays), more than 2 dimensions,
    NaN/infinite values (with their counts).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise ValueError(f"{path}: unsupported file type {suffix or '(no extension)'}; use .npy or .csv")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    arr = _read_npy(path) if suffix == ".npy" else _read_csv(path)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array (samples, features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{path}: no data (zero rows or columns, shape {arr.shape})")
    arr = arr.astype(np.float64)
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise ValueError(f"{path}: {n_nan + n_inf} NaN or infinite value(s) ({n_nan} NaN, {n_inf} "
                         "infinite); only finite numbers are accepted")
    return torch.from_numpy(arr).float()


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as handle:
        head = handle.read(6)
    if head != b"\x93NUMPY":  # not an .npy header; np.load would call it a pickle whatever it is
        if head.startswith(b"\x80"):
            kind = "a Python pickle, not a .npy array"
        elif head.startswith(b"PK"):
            kind = "a zip archive (.npz?); save one array with np.save"
        else:
            kind = "no NumPy .npy header"
        raise ValueError(f"{path}: not a valid .npy file ({kind})")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower() or "object" in str(err).lower():
            raise ValueError(f"{path}: holds Python objects (an object array, needs pickle); only "
                             "numeric arrays are accepted") from None
        raise ValueError(f"{path}: not a valid .npy file ({_one_line(err)})") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a valid .npy file ({_one_line(err)})") from None
    if arr.dtype != np.bool_ and not (np.issubdtype(arr.dtype, np.integer)
                                      or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{path}: array of dtype {arr.dtype} is not real numeric")
    return arr


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text CSV file") from None
    lines = [(k + 1, ln.strip()) for k, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty file (no non-blank lines)")
    if not any(_is_number(v) for v in lines[0][1].split(",")):
        lines = lines[1:]  # a header row
        if not lines:
            raise ValueError(f"{path}: a header but no data rows")
    rows = []
    for lineno, line in lines:
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:
            raise ValueError(f"{path}: non-numeric value on line {lineno} (expected comma-separated "
                             f"numbers): {line[:60]!r}") from None
    width = {len(r) for r in rows}
    if len(width) != 1:
        raise ValueError(f"{path}: rows have different numbers of columns {sorted(width)}")
    return np.asarray(rows, dtype=np.float64)
