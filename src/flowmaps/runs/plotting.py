"""PNG figures: sample grids, trajectories, quality versus NFE, loss curves (matplotlib, no display).

Samples of dimension > 2 are shown by their first two coordinates.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_samples", "plot_sample_grid", "plot_trajectories", "plot_quality_vs_nfe",
           "plot_loss"]


def _xy(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.reshape(x.shape[0], -1)[:, :2]


def _limits(data: np.ndarray, pad: float = 0.15):
    lo, hi = np.percentile(data, 0.5, axis=0), np.percentile(data, 99.5, axis=0)
    span = hi - lo
    return (lo[0] - pad * span[0], hi[0] + pad * span[0]), (lo[1] - pad * span[1], hi[1] + pad * span[1])


def _scatter(ax, x, lim, title, max_points=6000):
    x = _xy(x)[:max_points]
    ax.scatter(x[:, 0], x[:, 1], s=1.0, alpha=0.5, linewidths=0, color="tab:blue")
    ax.set_xlim(*lim[0])
    ax.set_ylim(*lim[1])
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="box")


def plot_samples(samples: dict[str, torch.Tensor], data, path: str | Path, title: str = "") -> Path:
    """One row of scatter panels: the data, then each labelled sample set."""
    data = _xy(data)
    lim = _limits(data)
    n = len(samples) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False)
    _scatter(axes[0, 0], data, lim, "data")
    for ax, (label, x) in zip(axes[0, 1:], samples.items()):
        _scatter(ax, x, lim, label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sample_grid(grid: dict[str, dict[int, torch.Tensor]], data, path: str | Path,
                     extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Rows: methods; columns: step counts; a first column with the data (and ``extra`` panels, e.g. the
    teacher's dopri5 samples, in the last row)."""
    data = _xy(data)
    lim = _limits(data)
    steps = sorted({k for row in grid.values() for k in row})
    rows = list(grid) + (["reference"] if extra else [])
    fig, axes = plt.subplots(len(rows), len(steps) + 1, figsize=(2.2 * (len(steps) + 1), 2.3 * len(rows)),
                             squeeze=False)
    for i, name in enumerate(rows):
        _scatter(axes[i, 0], data, lim, "data" if i == 0 else "data")
        axes[i, 0].set_ylabel(name, fontsize=9)
        for j, k in enumerate(steps):
            ax = axes[i, j + 1]
            if name == "reference":
                items = list(extra.items())
                if j < len(items):
                    _scatter(ax, items[j][1], lim, items[j][0])
                else:
                    ax.axis("off")
            elif k in grid[name]:
                _scatter(ax, grid[name][k], lim, f"{name}: {k} step{'s' * (k > 1)}")
            else:
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_trajectories(paths: dict[str, torch.Tensor], data, path: str | Path, n: int = 48) -> Path:
    """Paths ``(steps + 1, B, d)`` of a few points for each sampler, over the data."""
    data = _xy(data)
    lim = _limits(data, pad=0.6)
    fig, axes = plt.subplots(1, len(paths), figsize=(3.0 * len(paths), 3.1), squeeze=False)
    for ax, (name, p) in zip(axes[0], paths.items()):
        p = p.detach().cpu().numpy()
        p = p.reshape(p.shape[0], p.shape[1], -1)[:, :n, :2]
        ax.scatter(data[:3000, 0], data[:3000, 1], s=0.5, alpha=0.2, color="0.6", linewidths=0)
        for i in range(p.shape[1]):
            ax.plot(p[:, i, 0], p[:, i, 1], lw=0.7, alpha=0.8, marker=".", ms=2)
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, color="k", zorder=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(*lim[0])
        ax.set_ylim(*lim[1])
        ax.set_aspect("equal", adjustable="box")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_quality_vs_nfe(rows, path: str | Path, metric: str = "w2", ylabel: str | None = None) -> Path:
    """Quality against NFE (log x-axis): one line per method/sampler; dopri5 as a marker."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    series: dict[str, list] = {}
    for r in rows:
        value = getattr(r, metric)
        if value is None:
            continue
        label = r.method if r.sampler == "flow map" else f"{r.method} {r.sampler}"
        series.setdefault(label, []).append((r.nfe, value))
    for label, pts in series.items():
        pts.sort()
        x, y = zip(*pts)
        style = dict(marker="o", lw=1.8) if "flow map" not in label and " " not in label else {}
        if label.endswith("dopri5"):
            ax.scatter(x, y, marker="*", s=120, label=label, zorder=4, color="k")
        elif " " in label:
            ax.plot(x, y, ls="--", marker="s", ms=4, lw=1.0, label=label)
        else:
            ax.plot(x, y, label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(ylabel or metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_loss(history: list[float], path: str | Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3))
    h = np.asarray(history)
    ax.plot(h, lw=0.5, alpha=0.4, color="tab:blue")
    if len(h) >= 50:
        w = max(10, len(h) // 100)
        ax.plot(np.arange(w - 1, len(h)), np.convolve(h, np.ones(w) / w, mode="valid"), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
