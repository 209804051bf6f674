"""Images in memory: :class:`ByteImages` (8-bit codes decoded per batch), :class:`ImageDataset` (images
with optional labels, subsets and a seeded hold-out split), and flip augmentation (:func:`random_hflip`,
:class:`AugmentedImages`). The readers of files on disk are :mod:`flowmaps.data.image_readers`; PNG grids
of images are :mod:`flowmaps.data.grids`.

An 8-bit value ``u`` stands for ``u / 127.5 − 1`` (so 0 → −1 and 255 → 1 exactly). The images stay
8-bit in memory (:class:`ByteImages`, one byte per value: ImageNet-32's 1.28M training images take
3.9 GB instead of 15.7 GB as float32) and are decoded per batch, when indexed.
A file that cannot be used raises :class:`ImageDataError`, a :class:`ValueError` whose message is one
line naming the file and the problem (the CLI prints it as ``flowmaps: error: <message>``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ByteImages", "ImageDataset", "ImageDataError", "random_hflip", "AugmentedImages"]

# u / 127.5 − 1 for every byte value, computed in float64 and rounded once to float32: exact at the
# ends (0 → −1, 255 → 1) whatever the division kernel does. (float32 arithmetic, u / 127.5 − 1 rounded
# twice, differs from it in the last bit for some bytes: decoding is a lookup in this table.)
_BYTE_TO_UNIT = torch.tensor([u / 127.5 - 1.0 for u in range(256)], dtype=torch.float32)
_CHUNK = 1 << 22  # values decoded or counted at a time (16 MB of float32)


class ImageDataError(ValueError):
    """Image data that cannot be used; the message is one line naming the file and the problem."""


# ----------------------------------------------------------------------------------------- dataset


class ByteImages:
    """Images kept as 8-bit codes and decoded per batch: ``codes`` uint8 ``(N, ...)`` (images
    ``(N, C, H, W)``) and ``levels``, the float32 value each code stands for (default ``u / 127.5 − 1``;
    scikit-learn's digits use 17 levels ``v / 8 − 1``).

    Memory is one byte per value, a quarter of a float32 copy. Indexing decodes only what it selects:
    ``x[idx]`` is the float32 tensor ``levels[codes[idx]]`` on the codes' device, so a trainer draws
    batches from it as from a float tensor (``len``, ``shape``, ``device``, ``to(device)`` as a
    tensor's). The levels are computed in float64 and rounded once, so every decoded batch holds
    exactly the floats a float32 copy of the whole set would. :meth:`subset` selects images without
    decoding them, :meth:`std` is computed from a histogram of the codes, and :meth:`decode`
    materialises everything as float32 (4 bytes a value; for small sets)."""

    def __init__(self, codes: Tensor | np.ndarray, levels: Tensor | Sequence[float] | None = None):
        codes = torch.as_tensor(codes)
        if codes.dtype != torch.uint8 or codes.ndim < 1:
            raise ValueError(f"ByteImages: codes must be a uint8 tensor (N, ...), got {codes.dtype} "
                             f"of shape {tuple(codes.shape)}")
        levels = _BYTE_TO_UNIT if levels is None else torch.as_tensor(levels, dtype=torch.float32)
        if levels.ndim != 1 or not 1 <= levels.shape[0] <= 256 or not bool(torch.isfinite(levels).all()):
            raise ValueError("ByteImages: levels must be 1 to 256 finite values (the value of each code)")
        if levels.shape[0] < 256 and codes.numel() and int(codes.max()) >= levels.shape[0]:
            raise ValueError(f"ByteImages: code {int(codes.max())} has no level ({levels.shape[0]} "
                             "levels)")
        self.codes, self.levels = codes.contiguous(), levels.to(codes.device)

    @classmethod
    def _wrap(cls, codes: Tensor, levels: Tensor) -> "ByteImages":
        """Codes already checked against ``levels`` (a selection or a move): no validation pass."""
        out = cls.__new__(cls)
        out.codes, out.levels = codes.contiguous(), levels.to(codes.device)
        return out

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes (one per value)."""
        return self.codes.numel()

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index) -> Tensor:
        """The selected images decoded to float32 (``levels[codes[index]]``)."""
        return self.levels[self.codes[index].long()]

    def __repr__(self) -> str:
        return (f"ByteImages(shape={tuple(self.shape)}, levels={self.levels.shape[0]}, "
                f"device={self.device})")

    def subset(self, index: Tensor | Sequence[int] | slice) -> "ByteImages":
        """The images at ``index`` (along the first dimension), still as codes."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long).to(self.device)
        return ByteImages._wrap(self.codes[index], self.levels)

    def to(self, device) -> "ByteImages":
        """The same images on ``device`` (codes and levels; nothing decoded)."""
        return ByteImages._wrap(self.codes.to(device), self.levels)

    def decode(self) -> Tensor:
        """Every image as one float32 tensor (in chunks: no int64 copy of the codes)."""
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        flat_in, flat_out = self.codes.view(-1), out.view(-1)
        for i in range(0, flat_in.numel(), _CHUNK):
            flat_out[i:i + _CHUNK] = self.levels[flat_in[i:i + _CHUNK].long()]
        return out

    def histogram(self) -> Tensor:
        """How many values hold each code: int64 ``(len(levels),)`` on the CPU, counted in chunks."""
        flat = self.codes.view(-1)
        counts = torch.zeros(self.levels.shape[0], dtype=torch.long, device=self.device)
        for i in range(0, flat.numel(), _CHUNK):
            counts += torch.bincount(flat[i:i + _CHUNK], minlength=self.levels.shape[0])
        return counts.cpu()

    def std(self) -> Tensor:
        """The standard deviation of all values (unbiased, as ``Tensor.std()``), as a float32 0-d
        tensor: from the histogram of the codes (exact counts) and the levels in float64, so equal to
        ``decode().std()`` without a float copy."""
        counts, values = self.histogram().double(), self.levels.cpu().double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean).square()).sum() / (n - 1)
        return var.sqrt().float()

    def aminmax(self) -> tuple[float, float]:
        """The smallest and largest value present (from the histogram)."""
        present = self.levels.cpu()[self.histogram() > 0]
        return float(present.min()), float(present.max())


def _stored_images(images, name: str) -> "ByteImages | Tensor":
    """``images`` as an :class:`ImageDataset` keeps them: a :class:`ByteImages` as is, a tensor as
    float32; both ``(N, C, H, W)``."""
    if not isinstance(images, (Tensor, ByteImages)) or images.ndim != 4:
        shape = tuple(getattr(images, "shape", ()))
        raise ValueError(f"ImageDataset {name!r}: images must be a tensor or ByteImages (N, C, H, W), "
                         f"got shape {shape}")
    if isinstance(images, Tensor) and images.dtype != torch.float32:
        images = images.float()
    return images


class ImageDataset:
    """Images ``(N, C, H, W)`` with values in ``[−1, 1]``, optional int64 ``labels`` ``(N,)``.

    ``data`` holds the images as stored: a :class:`ByteImages` (every reader: one byte per value,
    decoded per batch) or a float32 tensor (images given as floats, or resized / converted to grey by
    :func:`~flowmaps.data.image_readers.load_image_dataset`). ``images`` is all of them as one float32 tensor: for a
    :class:`ByteImages` a decoded copy made at each access (4 bytes a value; large sets are consumed by
    indexing ``data`` instead). ``num_classes`` is 0 for unlabeled data; ``class_names`` (optional)
    names each label.
    """

    def __init__(self, images: "Tensor | ByteImages", labels: Tensor | None = None,
                 num_classes: int = 0, name: str = "", class_names: list[str] | None = None):
        self.name, self.num_classes = name, num_classes
        self.data = _stored_images(images, name)
        self.labels, self.class_names = labels, class_names
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels).long().reshape(-1)
            if self.labels.shape[0] != len(self):
                raise ValueError(f"ImageDataset {self.name!r}: {self.labels.shape[0]} labels for "
                                 f"{len(self)} images")
            if self.labels.numel() and (int(self.labels.min()) < 0
                                        or int(self.labels.max()) >= self.num_classes):
                raise ValueError(f"ImageDataset {self.name!r}: labels must lie in [0, "
                                 f"{self.num_classes}) (num_classes), got {int(self.labels.min())}.."
                                 f"{int(self.labels.max())}")
        elif self.num_classes:
            raise ValueError(f"ImageDataset {self.name!r}: num_classes={self.num_classes} without "
                             "labels")
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"ImageDataset {self.name!r}: {len(self.class_names)} class names for "
                                 f"{self.num_classes} classes")

    @property
    def images(self) -> Tensor:
        """All images as one float32 tensor (decoded from :class:`ByteImages`: a full copy)."""
        return self.data.decode() if isinstance(self.data, ByteImages) else self.data

    @images.setter
    def images(self, value: "Tensor | ByteImages") -> None:
        if len(value) != len(self):
            raise ValueError(f"ImageDataset {self.name!r}: {len(value)} images replace {len(self)}")
        self.data = _stored_images(value, self.name)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, {len(self)} images {self.shape}, "
                f"{type(self.data).__name__}, num_classes={self.num_classes})")

    def subset(self, index: Tensor | Sequence[int] | slice) -> "ImageDataset":
        """The images (and labels) at ``index``, with the same classes and name (still stored as
        before: :class:`ByteImages` stay codes)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        labels = None if self.labels is None else self.labels[index]
        data = self.data.subset(index) if isinstance(self.data, ByteImages) else self.data[index]
        return ImageDataset(data, labels, self.num_classes, self.name, self.class_names)

    def split(self, n_eval: int, seed: int = 0) -> tuple["ImageDataset", "ImageDataset"]:
        """``(train, held_out)``: ``n_eval`` images chosen by a permutation seeded with ``seed`` are
        held out, the rest train. Both keep the original order of their images, so the split depends
        only on ``(N, n_eval, seed)``. ``0 <= n_eval < N`` (the training part is never empty)."""
        n = len(self)
        if isinstance(n_eval, bool) or not isinstance(n_eval, (int, np.integer)) \
                or not 0 <= n_eval < n:
            raise ValueError(f"{self.name or 'image dataset'}: cannot hold out n_eval={n_eval!r} of "
                             f"{n} images (need 0 <= n_eval < {n})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        held = perm[:n_eval].sort().values
        train = perm[n_eval:].sort().values
        return self.subset(train), self.subset(held)


def _byte_images(pixels: np.ndarray, limit: int | None = None,
                 levels: Tensor | None = None) -> ByteImages:
    """:class:`ByteImages` of the first ``limit`` images of the uint8 array ``pixels``, sharing its
    memory when it can; copied when ``limit`` cuts (so a large file's buffer is not kept alive for a
    few images) or the array is read-only."""
    if limit is not None and limit < pixels.shape[0]:
        pixels = pixels[:limit].copy()
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    return ByteImages(torch.from_numpy(pixels), levels)


def _optional_positive_int(value, what: str) -> int | None:
    """``None`` or a positive integer (bools refused); ``what`` names it in the error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------ augmentation


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each image of ``x`` ``(N, C, H, W)`` along its width with probability ``p``, independently.
    The choice is ``torch.rand(N, generator=generator) < p``, so a seeded generator reproduces it.
    Returns a new tensor; ``x`` is not modified. (Also fits a trainer's ``augment(x, generator)``.)"""
    if x.ndim < 2:
        raise ValueError(f"random_hflip expects a batch of images (N, ..., W), got shape "
                         f"{tuple(x.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must lie in [0, 1], got {p}")
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=device) < p
    flip = flip.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(flip, x.flip(-1), x)


class AugmentedImages:
    """A trainer data source: ``data(n, generator=g)`` draws ``n`` images with replacement (indices
    from ``torch.randint(..., generator=g)``) and, with ``hflip``, flips each with probability ``p``
    (:func:`random_hflip`, same generator). ``images`` is a tensor ``(N, C, H, W)``, a
    :class:`ByteImages` (decoded per batch) or an :class:`ImageDataset` (its stored ``data``)."""

    def __init__(self, images: "Tensor | ByteImages | ImageDataset", hflip: bool = True,
                 p: float = 0.5):
        if isinstance(images, ImageDataset):
            images = images.data
        if not isinstance(images, (Tensor, ByteImages)) or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"AugmentedImages needs images (N, C, H, W) with N > 0, got shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AugmentedImages: p must lie in [0, 1], got {p}")
        self.images, self.hflip, self.p = images, bool(hflip), float(p)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(self.images.shape[0], (n,), generator=generator, device=device)
        x = self.images[idx.to(self.images.device)]
        return random_hflip(x, generator, self.p) if self.hflip else x
