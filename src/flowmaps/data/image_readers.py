"""Readers of image datasets in the files the user supplies, and :func:`load_image_dataset`, which picks
one by name (the containers they fill are :mod:`flowmaps.data.images`).

Nothing downloads and nothing is unpickled. The readers take local files in their official formats:

* ``digits``: scikit-learn's bundled 8×8 digits (shipped inside scikit-learn, so it works offline);
* ``mnist`` / ``fashion_mnist``: IDX files (``train-images-idx3-ubyte`` …), plain or gzip-compressed;
* ``cifar10``: the official *binary* version (``data_batch_1.bin`` … ``test_batch.bin``), as a folder,
  one ``.bin`` file or the ``cifar-10-binary.tar.gz`` archive (members read in memory, never extracted);
* ``imagenet32``: the official downsampled-ImageNet ``.npz`` files, read with ``allow_pickle=False``;
* ``image_folder``: any folder of PNG/JPEG images (class labels from its subfolders), via Pillow.

Every reader returns an :class:`~flowmaps.data.images.ImageDataset`: images ``(N, C, H, W)`` stored as
8-bit :class:`~flowmaps.data.images.ByteImages` (the value ``u`` stands for ``u / 127.5 − 1``), and int64
labels or ``None``. A file that cannot be used raises :class:`~flowmaps.data.images.ImageDataError`, a
:class:`ValueError` whose message is one line naming the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from .images import ByteImages, ImageDataError, ImageDataset, _byte_images, _optional_positive_int

__all__ = ["IMAGE_DATASETS", "load_image_dataset", "load_digits", "read_idx", "read_cifar10",
           "read_imagenet32", "read_image_folder"]

IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagenet32", "image_folder")
"""The image datasets ``data.name`` accepts, read from local files by :func:`load_image_dataset`
(digits ships with scikit-learn)."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_DIGIT_CLASSES = tuple(str(k) for k in range(10))
_DIGIT_LEVELS = [v / 8.0 - 1.0 for v in range(17)]  # scikit-learn's digits hold values 0..16

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_limit(limit) -> int | None:
    return _optional_positive_int(limit, "limit must be a positive integer or None")


def _require_exists(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageDataError(f"{path}: no such file or folder")
    return path


# ------------------------------------------------------------------------------------------ digits


def load_digits(limit: int | None = None) -> ImageDataset:
    """scikit-learn's bundled 8×8 handwritten digits: 1797 images ``(1, 8, 8)``, 10 classes; values
    0..16 map to ``v / 8 − 1`` (0 → −1, 16 → 1). Offline: the data ships inside scikit-learn."""
    limit = _check_limit(limit)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImageDataError("digits: needs scikit-learn, which is not installed "
                             "(pip install scikit-learn)") from None
    bunch = _sk_load_digits()
    values = np.asarray(bunch.images)[:limit]
    codes = values.astype(np.uint8)
    if not np.array_equal(codes, values):
        raise ImageDataError("digits: scikit-learn's digits are not the integers 0..16 expected")
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64)[:limit])
    return ImageDataset(_byte_images(codes[:, None], levels=_DIGIT_LEVELS), y, 10, "digits",
                        list(_DIGIT_CLASSES))


# --------------------------------------------------------------------------------------------- IDX


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if path.suffix.lower() == ".gz":
        raise ImageDataError(f"{path}: named .gz but not gzip-compressed")
    return open(path, "rb")


def _read_idx_file(path: Path, magic: int, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Dims and uint8 payload of one IDX file with the expected ``magic``; reads exactly the bytes the
    header announces (so a gzip bomb cannot blow up memory) and refuses short or over-long files."""
    if not path.is_file():
        raise ImageDataError(f"{path}: no such file" if not path.exists() else
                             f"{path}: is not a regular file")
    ndim = magic & 0xFF
    try:
        with _open_maybe_gzip(path) as handle:
            header = handle.read(4 + 4 * ndim)
            if len(header) < 4:
                raise ImageDataError(f"{path}: too short for an IDX file ({len(header)} bytes)")
            got = int.from_bytes(header[:4], "big")
            if got != magic:
                hint = ""
                if got == _IDX_LABELS_MAGIC and magic == _IDX_IMAGES_MAGIC:
                    hint = "; this is an IDX labels file, expected images"
                elif got == _IDX_IMAGES_MAGIC and magic == _IDX_LABELS_MAGIC:
                    hint = "; this is an IDX images file, expected labels"
                raise ImageDataError(f"{path}: wrong magic number {got} (0x{got:08x}); expected {magic} "
                                     f"for an IDX {what} file{hint}")
            if len(header) < 4 + 4 * ndim:
                raise ImageDataError(f"{path}: truncated IDX header ({len(header)} of {4 + 4 * ndim} "
                                     "bytes)")
            dims = tuple(int.from_bytes(header[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
            if any(d == 0 for d in dims):
                raise ImageDataError(f"{path}: IDX {what} file with an empty dimension {dims}")
            expected = math.prod(dims)
            payload = handle.read(expected + 1)
    except ImageDataError:
        raise
    except EOFError as err:
        raise ImageDataError(f"{path}: truncated gzip stream ({_one_line(err)})") from None
    except (OSError, gzip.BadGzipFile) as err:
        raise ImageDataError(f"{path}: cannot read ({_one_line(err)})") from None
    if len(payload) < expected:
        raise ImageDataError(f"{path}: truncated IDX {what} file: header announces {dims} = {expected} "
                             f"bytes of data but only {len(payload)} follow")
    if len(payload) > expected:
        raise ImageDataError(f"{path}: IDX {what} file longer than its header announces {dims} "
                             f"({expected} bytes of data); trailing bytes")
    return dims, np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx(images_path: str | Path, labels_path: str | Path | None = None, *,
             limit: int | None = None, num_classes: int | None = None,
             name: str = "idx") -> ImageDataset:
    """Read MNIST-style IDX files: images (magic 2051, uint8 ``N × H × W``) and optional labels (magic
    2049, uint8 ``N``), each plain or gzip-compressed (detected from its first bytes). Returns
    1-channel images in ``[−1, 1]``; ``num_classes`` defaults to ``max(label) + 1``. ``limit`` keeps
    the first ``limit`` images. Wrong magic, empty dimensions, truncated or over-long files, a corrupt
    gzip stream and a label count that differs from the image count raise :class:`ImageDataError`."""
    limit = _check_limit(limit)
    images_path = _require_exists(images_path)
    (n, h, w), pixels = _read_idx_file(images_path, _IDX_IMAGES_MAGIC, "images")
    labels, k = None, 0
    if labels_path is not None:
        labels_path = _require_exists(labels_path)
        (m,), raw = _read_idx_file(labels_path, _IDX_LABELS_MAGIC, "labels")
        if m != n:
            raise ImageDataError(f"{labels_path}: {m} labels but {images_path.name} holds {n} images")
        k = int(raw.max()) + 1 if num_classes is None else int(num_classes)
        if int(raw.max()) >= k:
            raise ImageDataError(f"{labels_path}: label {int(raw.max())} out of range for {k} classes")
        labels = torch.from_numpy(raw[:limit].astype(np.int64))
    return ImageDataset(_byte_images(pixels[:, None], limit), labels, k, name)


# ---------------------------------------------------------------------------------------- CIFAR-10


def _collect(chunks: Iterable[tuple[np.ndarray, np.ndarray]], limit: int | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``(pixels, labels)`` chunks (files or batches, in order) until ``limit`` images are
    read; the labels are cut to ``limit``, the pixels by the caller's ``_byte_images``."""
    xs, ys, count = [], [], 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    pixels = xs[0] if len(xs) == 1 else np.concatenate(xs)
    return pixels, np.concatenate(ys)[:limit]


def _cifar_records(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        hint = ""
        if len(raw) and len(raw) % (_CIFAR_RECORD + 1) == 0:
            hint = " (CIFAR-100 binary records have 2 label bytes; only CIFAR-10 is read)"
        raise ImageDataError(f"{source}: wrong record size: {len(raw)} bytes is not a whole number of "
                             f"CIFAR-10 records of {_CIFAR_RECORD} bytes (1 label byte + 3x32x32 "
                             f"pixels){hint}")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0]
    if int(labels.max()) > 9:
        bad = int(np.argmax(labels > 9))
        raise ImageDataError(f"{source}: record {bad} has label byte {int(labels[bad])}, not 0..9; "
                             "not a CIFAR-10 binary batch")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _batch_number(name: str) -> int:
    m = re.fullmatch(r"data_batch_(\d+)\.bin", name)
    return int(m.group(1)) if m else -1


def _cifar_wanted(names: Iterable[str], split: str) -> list[str]:
    if split == "test":
        return [n for n in names if n == "test_batch.bin"]
    return sorted((n for n in names if _batch_number(n) >= 0), key=_batch_number)


def read_cifar10(path: str | Path, split: str = "train", *, limit: int | None = None) -> ImageDataset:
    """Read the official CIFAR-10 *binary* version: records of 1 label byte + 3072 pixel bytes (R, G
    then B planes of 32×32, row-major). ``path`` is a folder holding ``data_batch_1.bin`` …
    ``data_batch_5.bin`` / ``test_batch.bin`` (directly or in ``cifar-10-batches-bin/``), one ``.bin``
    file (read whatever ``split``), or the ``cifar-10-binary.tar.gz`` archive, whose members are read
    in memory (nothing is extracted to disk). ``split`` is ``"train"`` (the data batches, in order)
    or ``"test"``. A file whose size is not a whole number of records, or a label byte above 9, raises
    :class:`ImageDataError`."""
    limit = _check_limit(limit)
    if split not in ("train", "test"):
        raise ValueError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    path = _require_exists(path)
    expected = "test_batch.bin" if split == "test" else "data_batch_1.bin ... data_batch_5.bin"

    def sources() -> Iterator[tuple[str, bytes]]:
        if path.is_dir():
            folder = path
            if not _cifar_wanted((p.name for p in folder.iterdir()), split) \
                    and (path / "cifar-10-batches-bin").is_dir():
                folder = path / "cifar-10-batches-bin"
            names = _cifar_wanted((p.name for p in folder.iterdir() if p.is_file()), split)
            if not names:
                raise ImageDataError(f"{path}: no CIFAR-10 {split} batch found (expected {expected})")
            for name in names:
                yield str(folder / name), (folder / name).read_bytes()
        elif path.suffix.lower() == ".bin":
            yield str(path), path.read_bytes()
        else:
            try:
                is_tar = tarfile.is_tarfile(path)
            except (OSError, EOFError):
                is_tar = False
            if not is_tar:
                raise ImageDataError(f"{path}: not a CIFAR-10 .bin batch, folder or .tar.gz archive")
            try:
                with tarfile.open(path, "r:*") as tar:
                    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                    names = _cifar_wanted(members, split)
                    if not names:
                        raise ImageDataError(f"{path}: archive holds no CIFAR-10 {split} batch "
                                             f"(expected {expected})")
                    for name in names:
                        handle = tar.extractfile(members[name])
                        yield f"{path}:{members[name].name}", handle.read()
            except ImageDataError:
                raise
            except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as err:
                raise ImageDataError(f"{path}: cannot read archive ({_one_line(err)})") from None

    pixels, labels = _collect((_cifar_records(raw, source) for source, raw in sources()), limit)
    labels = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(_byte_images(pixels, limit), labels, 10, "cifar10", list(CIFAR10_CLASSES))


# -------------------------------------------------------------------------------------- ImageNet-32


def _imagenet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]

    def number(p: Path) -> int:
        m = re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name)
        return int(m.group(1)) if m else -1

    if split == "train":
        files = sorted((p for p in path.iterdir() if number(p) >= 0), key=number)
        expected = "train_data_batch_1.npz, ..."
    else:
        files = [p for p in path.iterdir() if p.name == "val_data.npz"]
        expected = "val_data.npz"
    if not files:
        raise ImageDataError(f"{path}: no ImageNet-32 {split} file found (expected {expected})")
    return files


def _read_imagenet_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] != b"PK":
        kind = "a Python pickle" if head[:1] == b"\x80" else "no zip header"
        raise ImageDataError(f"{path}: not a NumPy .npz archive ({kind})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("data", "labels") if k not in keys]
            if missing:
                raise ImageDataError(f"{path}: no {' or '.join(repr(k) for k in missing)} array in the "
                                     f".npz (has {', '.join(sorted(keys)) or 'nothing'})")
            data, labels = npz["data"], npz["labels"]
    except ImageDataError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower() or "object" in str(err).lower():
            raise ImageDataError(f"{path}: holds Python objects (an object array, needs pickle); "
                                 "refused, only numeric arrays are read") from None
        raise ImageDataError(f"{path}: not a valid .npz file ({_one_line(err)})") from None
    except Exception as err:  # zipfile.BadZipFile, OSError, EOFError, zlib errors ...
        raise ImageDataError(f"{path}: not a valid .npz file ({_one_line(err)})") from None
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise ImageDataError(f"{path}: 'data' must be an integer array (N, 3*S*S), got {data.dtype} "
                             f"{data.shape}")
    side = math.isqrt(data.shape[1] // 3)
    if data.shape[1] == 0 or 3 * side * side != data.shape[1]:
        raise ImageDataError(f"{path}: 'data' rows of {data.shape[1]} values are not 3 square colour "
                             "planes (3*S*S)")
    if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise ImageDataError(f"{path}: 'data' values outside 0..255")
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageDataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if labels.shape[0] != data.shape[0]:
        raise ImageDataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (int(labels.min()) < 1 or int(labels.max()) > 1000):
        raise ImageDataError(f"{path}: labels must be 1-based class numbers 1..1000, found "
                             f"{int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, 3, side, side).astype(np.uint8, copy=False), labels.astype(np.int64) - 1


def read_imagenet32(path: str | Path, split: str = "train", *,
                    limit: int | None = None) -> ImageDataset:
    """Read the official downsampled-ImageNet ``.npz`` files (Imagenet32: ``data`` ``(N, 3072)``
    uint8, channel-major R, G, B planes of 32×32; ``labels`` 1-based 1..1000, returned 0-based; the
    16×16 and 64×64 variants of the same format are read too). ``path`` is one file, or a folder of
    ``train_data_batch_<k>.npz`` (``split="train"``, in batch order) or ``val_data.npz``
    (``split="val"``, also accepted as ``"test"``). Files are opened with ``allow_pickle=False``: an
    object array is refused, never unpickled."""
    limit = _check_limit(limit)
    if split not in ("train", "val", "test"):
        raise ValueError(f"imagenet32: split must be 'train' or 'val', got {split!r}")
    path = _require_exists(path)

    def files():
        first = None
        for file in _imagenet_files(path, "train" if split == "train" else "val"):
            x, y = _read_imagenet_npz(file)
            if first is not None and x.shape[1:] != first:
                raise ImageDataError(f"{file}: images of shape {x.shape[1:]} but earlier files hold "
                                     f"{first}")
            first = x.shape[1:]
            yield x, y

    pixels, labels = _collect(files(), limit)
    labels = torch.from_numpy(labels)
    if len(labels) == 0:
        raise ImageDataError(f"{path}: no images")
    return ImageDataset(_byte_images(pixels, limit), labels, 1000, "imagenet32")


# ------------------------------------------------------------------------------------ image folder


def _size_hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _open_image(file: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``(H, W, C)``: decoded, EXIF-oriented, converted, centre-cropped to the
    target aspect ratio and resized (bicubic) when ``size`` is given."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey → 8-bit
                arr = np.asarray(img, dtype=np.float64) / 257.0
                img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                h, w = size
                W, H = img.size
                if W * h > H * w:  # too wide: crop the width
                    cw = max(1, round(H * w / h))
                    left = (W - cw) // 2
                    img = img.crop((left, 0, left + cw, H))
                elif W * h < H * w:  # too tall: crop the height
                    ch = max(1, round(W * h / w))
                    top = (H - ch) // 2
                    img = img.crop((0, top, W, top + ch))
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise ImageDataError(f"{file}: cannot read image ({_one_line(err)})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_image_folder(path: str | Path, size: int | tuple[int, int] | None = None, channels: int = 3,
                      *, limit: int | None = None) -> ImageDataset:
    """Read every PNG/JPEG under ``path`` (recursively; hidden files and folders skipped), in sorted
    relative-path order. If every image lies in a subfolder, the top-level subfolder names (sorted)
    are the classes and each image is labeled by its subfolder; images directly in ``path`` make the
    data unlabeled. ``channels`` is 1 (grey) or 3 (RGB). With ``size`` (``int`` or ``(H, W)``) each
    image is centre-cropped to that aspect ratio (a square for an ``int``) and resized (bicubic);
    with ``size=None`` all images must share one size. No images, an unreadable image, or a size
    mismatch raises :class:`ImageDataError` naming the folder or file."""
    limit = _check_limit(limit)
    size = _size_hw(size)
    channels = _check_channels(channels)
    path = _require_exists(path)
    if not path.is_dir():
        raise ImageDataError(f"{path}: is not a folder (image_folder needs a folder of PNG/JPEG files)")
    rels = sorted((p.relative_to(path) for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda r: r.as_posix())
    rels = [r for r in rels if not _hidden(r)]
    if not rels:
        raise ImageDataError(f"{path}: no PNG or JPEG images found (searched recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
    labeled = all(len(r.parts) > 1 for r in rels)
    classes = sorted({r.parts[0] for r in rels}) if labeled else []
    rels = rels[:limit]
    out: np.ndarray | None = None
    first: Path | None = None
    for i, rel in enumerate(rels):
        file = path / rel
        arr = _open_image(file, channels, size)
        if out is None:
            out = np.empty((len(rels), *arr.shape), dtype=np.uint8)
            first = file
        elif arr.shape != out.shape[1:]:
            raise ImageDataError(f"{file}: image is {arr.shape[0]}x{arr.shape[1]} (HxW) but {first} is "
                                 f"{out.shape[1]}x{out.shape[2]}; give a size to resize them all")
        out[i] = arr
    images = _byte_images(out.transpose(0, 3, 1, 2))
    if not labeled:
        return ImageDataset(images, None, 0, "image_folder")
    index = {c: k for k, c in enumerate(classes)}
    labels = torch.tensor([index[r.parts[0]] for r in rels], dtype=torch.long)
    return ImageDataset(images, labels, len(classes), "image_folder", classes)


# ---------------------------------------------------------------------------------------- dispatch


def _idx_files(folder: Path, prefix: str) -> tuple[Path | None, Path | None]:
    def find(kind: str) -> Path | None:
        for stem in (f"{prefix}-{kind}", f"{prefix}-{kind}".replace("-idx", ".idx")):
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
        return None

    return find("images-idx3-ubyte"), find("labels-idx1-ubyte")


def _read_mnist_like(name: str, path, split: str, limit: int | None,
                     labels_path=None) -> ImageDataset:
    if split not in ("train", "test"):
        raise ValueError(f"{name}: split must be 'train' or 'test', got {split!r}")
    if path is None:
        raise ImageDataError(f"{name}: needs a path (a folder with the IDX files, or an images file)")
    path = _require_exists(path)
    if path.is_dir():
        prefix = "train" if split == "train" else "t10k"
        images, labels = _idx_files(path, prefix)
        if images is None:
            raise ImageDataError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] file in this folder")
    else:
        images = path
        guess = path.with_name(path.name.replace("images-idx3", "labels-idx1").replace("images.idx3",
                                                                                       "labels.idx1"))
        labels = guess if guess != path and guess.is_file() else None
    if labels_path is not None:
        labels = Path(labels_path)
    ds = read_idx(images, labels, limit=limit, num_classes=10 if labels is not None else None,
                  name=name)
    if ds.labels is not None:
        ds.class_names = list(FASHION_MNIST_CLASSES if name == "fashion_mnist" else _DIGIT_CLASSES)
    return ds


def _resize(images: "Tensor | ByteImages", size: tuple[int, int]) -> "Tensor | ByteImages":
    """Bilinear, antialiased resize of ``(N, C, H, W)`` in [−1, 1] (in chunks, decoded a chunk at a
    time), clamped to [−1, 1]: float32, since resized values fall between the 8-bit levels."""
    if tuple(images.shape[-2:]) == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.float32)
    for i in range(0, images.shape[0], 1024):
        out[i:i + 1024] = torch.nn.functional.interpolate(
            images[i:i + 1024], size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(-1.0, 1.0)


def _set_channels(images: "Tensor | ByteImages", channels: int) -> "Tensor | ByteImages":
    """Grey → RGB repeats the plane (codes stay codes); RGB → grey is a float32 luma (in chunks)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        if isinstance(images, ByteImages):
            return ByteImages._wrap(images.codes.repeat(1, 3, 1, 1), images.levels)
        return images.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:  # ITU-R 601 luma, as Pillow's "L"
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.float32)
        for i in range(0, images.shape[0], 1024):
            out[i:i + 1024] = (images[i:i + 1024] * weights).sum(1, keepdim=True)
        return out
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def load_image_dataset(name: str, path: str | Path | None = None, **options) -> ImageDataset:
    """Load the image dataset ``name`` (one of :data:`IMAGE_DATASETS`) from ``path``.

    ``digits`` needs no path. ``mnist``/``fashion_mnist``: ``path`` is a folder holding the standard
    files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…`` for
    ``split="test"``; a missing labels file gives unlabeled data) or an images file (its labels file is
    found by name). ``cifar10``, ``imagenet32``: see :func:`read_cifar10`, :func:`read_imagenet32`.
    ``image_folder``: see :func:`read_image_folder`.

    Options: ``split`` (``"train"`` default; ``"test"`` for mnist/fashion_mnist/cifar10, ``"val"`` for
    imagenet32), ``limit`` (keep the first N images), ``size`` (int or ``(H, W)``: resize; for
    image_folder a centre crop then bicubic, otherwise bilinear antialiased), ``channels`` (1 or 3:
    for image_folder the decoding mode, default 3; otherwise a conversion, default native), and
    ``labels_path`` (mnist/fashion_mnist: an explicit labels file). Unknown names or options raise
    :class:`ValueError`; missing or malformed files raise :class:`ImageDataError`.
    """
    allowed = {"split", "limit", "size", "channels"}
    if name in ("mnist", "fashion_mnist"):
        allowed.add("labels_path")
    unknown = sorted(set(options) - allowed)
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(sorted(allowed))}")
    split = options.get("split") or "train"
    limit = _check_limit(options.get("limit"))
    size = _size_hw(options.get("size"))
    channels = options.get("channels")
    if channels is not None:
        channels = _check_channels(channels)

    if name == "image_folder":
        if split != "train":
            raise ValueError(f"image_folder has no {split!r} split; hold images out with "
                             "ImageDataset.split")
        if path is None:
            raise ImageDataError("image_folder: needs a path (a folder of PNG/JPEG images)")
        return read_image_folder(path, size, 3 if channels is None else channels, limit=limit)
    if name == "digits":
        if split != "train":
            raise ValueError(f"digits has no {split!r} split; hold images out with ImageDataset.split")
        ds = load_digits(limit)
    elif name in ("mnist", "fashion_mnist"):
        ds = _read_mnist_like(name, path, split, limit, options.get("labels_path"))
    else:
        if path is None:
            raise ImageDataError(f"{name}: needs a path to the dataset files")
        reader = read_cifar10 if name == "cifar10" else read_imagenet32
        ds = reader(path, split, limit=limit)
    if size is not None:
        ds.data = _resize(ds.data, size)
    if channels is not None:
        ds.data = _set_channels(ds.data, channels)
    return ds
