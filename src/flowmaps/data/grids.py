"""PNG grids of images: tiles of samples in ``[−1, 1]``, and labelled sheets (one band per method and
step count) for the plots of image runs. Pillow writes the files; images are upscaled with
nearest-neighbour pixels so that 8×8 digits stay visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import _optional_positive_int

__all__ = ["to_uint8", "make_grid", "save_image_grid", "save_labeled_grids"]


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """``[−1, 1]`` floats → uint8 channels-last: ``(C, H, W)`` → ``(H, W, C)`` and ``(N, C, H, W)`` →
    ``(N, H, W, C)``; ``round((x + 1) · 127.5)`` clipped to 0..255 (NaN → 128), the inverse of the
    readers' scaling."""
    if isinstance(images, Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"to_uint8 expects (C, H, W) or (N, C, H, W), got shape {x.shape}")
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    u = np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.moveaxis(u, -3, -1)


def make_grid(images: Tensor | np.ndarray, nrow: int | None = None, padding: int = 1,
              pad_value: float = 0.0) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in ``[−1, 1]`` (C = 1 or 3) into one uint8 array ``(H', W', C)``:
    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels around and between them
    filled with ``pad_value`` (in the images' ``[−1, 1]`` scale; 0 is mid-grey)."""
    tiles = to_uint8(images)
    if tiles.ndim == 3:
        tiles = tiles[None]
    n, h, w, c = tiles.shape
    if n == 0:
        raise ValueError("make_grid: no images")
    if c not in (1, 3):
        raise ValueError(f"make_grid: images need 1 or 3 channels, got {c}")
    if padding < 0:
        raise ValueError(f"make_grid: padding must be >= 0, got {padding}")
    ncol = max(1, min(n, int(nrow) if nrow else math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncol)
    fill = int(to_uint8(np.full((1, 1, 1), pad_value, dtype=np.float32))[0, 0, 0])
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill,
                   dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = tiles[k]
    return grid


def _auto_scale(height: int, width: int, min_side: int = 256) -> int:
    return max(1, math.ceil(min_side / max(height, width, 1)))


def _check_scale(scale) -> int | None:
    return _optional_positive_int(scale, "scale must be a positive integer")


def _upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    return grid if scale == 1 else grid.repeat(scale, axis=0).repeat(scale, axis=1)


def _pil_image(grid: np.ndarray):
    from PIL import Image

    return Image.fromarray(grid[:, :, 0], "L") if grid.shape[2] == 1 else Image.fromarray(grid, "RGB")


def save_image_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int | None = None,
                    scale: int | None = None, padding: int = 1, pad_value: float = 0.0) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG at ``path`` (parent folders created), upscaled by
    the integer ``scale`` with nearest-neighbour pixels (default: the smallest scale that makes the
    grid's longer side at least 256 px, so 8×8 digits are visible). Returns the path."""
    scale = _check_scale(scale)
    grid = make_grid(images, nrow, padding, pad_value)
    grid = _upscale(grid, scale or _auto_scale(*grid.shape[:2]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil_image(grid).save(path, format="PNG")
    return path


def _label_font(height: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its built-in font when FreeType is available
        return ImageFont.load_default(size=max(10, min(28, height // 3)))
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def save_labeled_grids(rows: dict[str, Tensor | np.ndarray], path: str | Path,
                       nrow: int | dict[str, int] | None = None, scale: int | None = None,
                       padding: int = 1, pad_value: float = 0.0, gap: int = 4) -> Path:
    """Stack one grid per entry of ``rows`` vertically, each with its key written to its left (e.g.
    ``{"fmm, 1 step": x1, "fmm, 4 steps": x4}`` for a method × step-count sheet), and write a PNG.

    Each grid has ``nrow`` images per line (default: all of that entry's images in one line, up to 16);
    a mapping ``{key: nrow}`` sets it per entry (e.g. the length of each method's trajectories).
    ``scale`` (integer, nearest-neighbour) defaults to the smallest making the widest grid at least
    256 px wide and each band at least 48 px tall. Grey grids are drawn in RGB beside colour ones;
    ``gap`` pixels separate the bands. Labels use Pillow's default font. Returns the path."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("save_labeled_grids: no rows")
    scale = _check_scale(scale)
    grids = []
    for label, images in rows.items():
        n = 1 if np.ndim(images) == 3 else len(images)
        per_line = nrow.get(label) if isinstance(nrow, dict) else nrow
        grid = make_grid(images, per_line or min(max(n, 1), 16), padding, pad_value)
        grids.append((str(label), np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid))
    if scale is None:
        widest = max(g.shape[1] for _, g in grids)
        lowest = min(g.shape[0] for _, g in grids)
        scale = max(_auto_scale(1, widest), math.ceil(48 / max(lowest, 1)))
    grids = [(label, _upscale(g, scale)) for label, g in grids]
    font = _label_font(min(g.shape[0] for _, g in grids))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), label, font=font) for label, _ in grids]
    margin = 8
    label_w = max(b[2] - b[0] for b in boxes) + 2 * margin
    width = label_w + max(g.shape[1] for _, g in grids) + margin
    height = sum(g.shape[0] for _, g in grids) + gap * (len(grids) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = gap
    for (label, grid), box in zip(grids, boxes):
        canvas.paste(Image.fromarray(grid, "RGB"), (label_w, y))
        text_y = y + (grid.shape[0] - (box[3] - box[1])) // 2 - box[1]
        draw.text((margin - box[0], text_y), label, fill=(0, 0, 0), font=font)
        y += grid.shape[0] + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
