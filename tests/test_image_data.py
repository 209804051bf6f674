"""Image datasets (flowmaps.data.image_readers, flowmaps.data.images) and grids (flowmaps.data.grids): every reader on tiny files
written here in the official formats (IDX plain/gzip, CIFAR-10 binary records and tar.gz, ImageNet-32
.npz, a PNG/JPEG folder), malformed inputs refused with a one-line ImageDataError naming the file, flip
augmentation, grids. Self-contained (no conftest fixtures); nothing is downloaded."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmaps.data.grids import make_grid, save_image_grid, save_labeled_grids, to_uint8
from flowmaps.data.image_readers import (load_digits, load_image_dataset, read_cifar10, read_idx,
                                         read_image_folder, read_imagenet32)
from flowmaps.data.images import AugmentedImages, ImageDataError, ImageDataset, random_hflip

torch.set_num_threads(1)


def unit(u) -> np.ndarray:
    """The readers' scaling, computed here independently: u / 127.5 − 1."""
    return np.asarray(u, dtype=np.float64) / 127.5 - 1.0


def refused(call, path, *words):
    """``call()`` raises ImageDataError: one line, naming ``path`` and containing ``words``."""
    with pytest.raises(ImageDataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# -------------------------------------------------------------------------------------------------- IDX

def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    return magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) \
        + array.tobytes()


def mnist_like(n=6, h=4, w=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_values_labels(tmp_path, compress):
    images, labels = mnist_like()
    ip, lp = tmp_path / "imgs", tmp_path / "labs"
    for p, arr in ((ip, images), (lp, labels)):
        data = idx_bytes(arr)
        p.write_bytes(gzip.compress(data) if compress else data)
    ds = read_idx(ip, lp)
    assert ds.images.shape == (6, 1, 4, 5) and ds.images.dtype == torch.float32
    assert ds.shape == (1, 4, 5) and len(ds) == 6
    assert ds.images[0, 0, 0, 0].item() == -1.0 and ds.images[0, 0, 0, 1].item() == 1.0
    np.testing.assert_allclose(ds.images[:, 0].numpy(), unit(images), rtol=0, atol=1e-7)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 6  # max label + 1 when not given
    unlabeled = read_idx(ip, limit=2)
    assert unlabeled.labels is None and unlabeled.num_classes == 0 and len(unlabeled) == 2


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_folder_standard_names(tmp_path, suffix):
    images, labels = mnist_like(n=12, h=28, w=28)
    test_images, test_labels = mnist_like(n=3, h=28, w=28, seed=1)
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", test_images), ("t10k-labels-idx1-ubyte", test_labels)):
        data = idx_bytes(arr)
        (tmp_path / (name + suffix)).write_bytes(gzip.compress(data) if suffix else data)
    ds = load_image_dataset("mnist", tmp_path)
    assert ds.shape == (1, 28, 28) and len(ds) == 12 and ds.num_classes == 10
    assert ds.labels.tolist() == labels.tolist() and ds.class_names[3] == "3"
    test = load_image_dataset("fashion_mnist", tmp_path, split="test")
    np.testing.assert_allclose(test.images[:, 0].numpy(), unit(test_images), atol=1e-7)
    assert test.class_names[9] == "Ankle boot"
    limited = load_image_dataset("mnist", tmp_path / ("train-images-idx3-ubyte" + suffix), limit=5)
    assert len(limited) == 5 and limited.labels.tolist() == labels[:5].tolist()  # labels found by name
    assert load_image_dataset("mnist", tmp_path, size=32, channels=3, limit=2).shape == (3, 32, 32)


def test_idx_malformed(tmp_path):
    images, labels = mnist_like()
    missing = tmp_path / "nope" / "train-images-idx3-ubyte"
    refused(lambda: read_idx(missing), missing, "no such")
    refused(lambda: load_image_dataset("mnist", tmp_path / "absent"), tmp_path / "absent", "no such")
    refused(lambda: load_image_dataset("mnist", tmp_path), tmp_path, "train-images-idx3-ubyte")

    lp = tmp_path / "labels"
    lp.write_bytes(idx_bytes(labels))
    refused(lambda: read_idx(lp), lp, "magic", "2051", "labels file")  # labels given as images
    wrong = tmp_path / "wrong"
    wrong.write_bytes(idx_bytes(images, magic=0x0D03))  # float IDX
    refused(lambda: read_idx(wrong), wrong, "magic")

    good = idx_bytes(images)
    short = tmp_path / "short"
    short.write_bytes(good[:-7])
    refused(lambda: read_idx(short), short, "truncated")
    header_only = tmp_path / "header"
    header_only.write_bytes(good[:10])
    refused(lambda: read_idx(header_only), header_only, "truncated")
    long = tmp_path / "long"
    long.write_bytes(good + b"\0")
    refused(lambda: read_idx(long), long, "trailing")
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(good)[:-20])
    refused(lambda: read_idx(cut_gz), cut_gz, "truncated")
    fake_gz = tmp_path / "fake.gz"
    fake_gz.write_bytes(good)
    refused(lambda: read_idx(fake_gz), fake_gz, "gzip")

    ip = tmp_path / "imgs"
    ip.write_bytes(good)
    few = tmp_path / "few"
    few.write_bytes(idx_bytes(labels[:4]))
    refused(lambda: read_idx(ip, few), few, "4 labels")


# --------------------------------------------------------------------------------------------- CIFAR-10

def cifar_records(labels, seed=0):
    """Records whose R/G/B planes are distinguishable: image k, channel c has its own random plane."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    planes[:, 0, 0, 0], planes[:, 1, 0, 0], planes[:, 2, 0, 0] = 255, 0, 128  # R, G, B of pixel (0, 0)
    raw = b"".join(bytes([lab]) + planes[k].tobytes() for k, lab in enumerate(labels))
    return raw, planes


def test_cifar10_folder_single_file_and_split(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    raw1, p1 = cifar_records([3, 1, 9], seed=1)
    raw2, p2 = cifar_records([0, 7], seed=2)
    raw_t, pt = cifar_records([5], seed=3)
    (folder / "data_batch_2.bin").write_bytes(raw2)  # written out of order: read in batch order
    (folder / "data_batch_1.bin").write_bytes(raw1)
    (folder / "test_batch.bin").write_bytes(raw_t)
    (folder / "batches.meta.txt").write_text("airplane\n")

    for path in (folder, tmp_path):  # the batches folder, or the folder the archive unpacked into
        ds = read_cifar10(path)
        assert ds.images.shape == (5, 3, 32, 32) and ds.num_classes == 10
        assert ds.labels.tolist() == [3, 1, 9, 0, 7]
        np.testing.assert_allclose(ds.images.numpy(), unit(np.concatenate([p1, p2])), atol=1e-7)
        assert ds.images[:, :, 0, 0].tolist() == [[1.0, -1.0, float(np.float32(unit(128)))]] * 5  # R, G, B
    assert read_cifar10(folder, "test").labels.tolist() == [5]
    assert read_cifar10(folder / "data_batch_2.bin").labels.tolist() == [0, 7]
    limited = load_image_dataset("cifar10", folder, limit=4)
    assert limited.labels.tolist() == [3, 1, 9, 0] and limited.class_names[3] == "cat"


def test_cifar10_tar_gz_read_in_memory(tmp_path):
    raw1, p1 = cifar_records([2, 4])
    raw_t, _ = cifar_records([6])
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, raw in (("data_batch_1.bin", raw1), ("test_batch.bin", raw_t)):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    ds = read_cifar10(archive)
    assert ds.labels.tolist() == [2, 4]
    np.testing.assert_allclose(ds.images.numpy(), unit(p1), atol=1e-7)
    assert read_cifar10(archive, split="test").labels.tolist() == [6]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing extracted to disk


def test_cifar10_malformed(tmp_path):
    raw, _ = cifar_records([1, 2])
    bad = tmp_path / "data_batch_1.bin"
    bad.write_bytes(raw[:-1])
    refused(lambda: read_cifar10(bad), bad, "record size", "3073")
    refused(lambda: read_cifar10(tmp_path), bad, "record size")  # found through the folder
    cifar100 = tmp_path / "c100.bin"
    cifar100.write_bytes(bytes(3074 * 2))
    refused(lambda: read_cifar10(cifar100), cifar100, "record size", "CIFAR-100")
    label = tmp_path / "label.bin"
    label.write_bytes(bytes([12]) + bytes(3072))
    refused(lambda: read_cifar10(label), label, "label byte 12")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(lambda: read_cifar10(empty), empty, "data_batch_1.bin")
    refused(lambda: read_cifar10(tmp_path / "missing"), tmp_path / "missing", "no such")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all")
    refused(lambda: read_cifar10(junk), junk)


# ------------------------------------------------------------------------------------------ ImageNet-32

def imagenet_npz(path: Path, n: int, seed: int, labels=None, **extra):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0], data[:, 1024], data[:, 2048] = 0, 255, 64  # pixel (0, 0): R, G, B
    labels = rng.integers(1, 1001, size=n) if labels is None else np.asarray(labels)
    np.savez(path, data=data, labels=labels, **extra)
    return data, labels


def test_imagenet32_file_and_folder(tmp_path):
    d1, l1 = imagenet_npz(tmp_path / "train_data_batch_1.npz", 3, 0, labels=[1, 1000, 7],
                          mean=np.zeros(3072))
    d2, l2 = imagenet_npz(tmp_path / "train_data_batch_2.npz", 2, 1)
    dv, lv = imagenet_npz(tmp_path / "val_data.npz", 2, 2)
    one = read_imagenet32(tmp_path / "train_data_batch_1.npz")
    assert one.images.shape == (3, 3, 32, 32) and one.num_classes == 1000
    assert one.labels.tolist() == [0, 999, 6]  # 1-based → 0-based
    np.testing.assert_allclose(one.images.numpy(), unit(d1.reshape(3, 3, 32, 32)), atol=1e-7)
    assert one.images[:, :, 0, 0].tolist() == [[-1.0, 1.0, float(np.float32(unit(64)))]] * 3  # channel-major
    folder = read_imagenet32(tmp_path)
    assert folder.labels.tolist() == (np.concatenate([l1, l2]) - 1).tolist()
    assert read_imagenet32(tmp_path, "val").labels.tolist() == (lv - 1).tolist()
    assert len(load_image_dataset("imagenet32", tmp_path, limit=4)) == 4


def test_imagenet32_malformed(tmp_path):
    nodata = tmp_path / "nodata.npz"
    np.savez(nodata, labels=np.ones(2, dtype=np.int64))
    refused(lambda: read_imagenet32(nodata), nodata, "'data'")
    zero = tmp_path / "zero.npz"
    imagenet_npz(zero, 2, 0, labels=[0, 5])
    refused(lambda: read_imagenet32(zero), zero, "1-based")
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, data=np.zeros((2, 3000), np.uint8), labels=np.ones(2, np.int64))
    refused(lambda: read_imagenet32(ragged), ragged, "3*S*S")
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(b"\x80\x04K\x01.")
    refused(lambda: read_imagenet32(pickled), pickled, "pickle")
    refused(lambda: read_imagenet32(tmp_path / "none.npz"), tmp_path / "none.npz", "no such")
    refused(lambda: read_imagenet32(tmp_path, "val"), tmp_path, "val_data.npz")


class _Trap:
    """Unpickling this object would create the file ``_Trap.target`` (via ``open(target, "w")``)."""
    target = ""

    def __reduce__(self):
        return open, (self.target, "w")


def test_imagenet32_object_array_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "unpickled.txt"
    _Trap.target = str(sentinel)
    trap = np.empty(2, dtype=object)
    trap[0], trap[1] = _Trap(), _Trap()
    for key in ("data", "labels"):
        path = tmp_path / f"object_{key}.npz"
        arrays = {"data": np.zeros((2, 3072), np.uint8), "labels": np.ones(2, np.int64)}
        arrays[key] = trap
        np.savez(path, **arrays)
        refused(lambda: read_imagenet32(path), path, "object", "pickle")
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------- image folder

def save_png(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def test_image_folder_classes_values_channels(tmp_path):
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255  # pure red: channel 0 → 1, channels 1, 2 → −1
    pattern = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "dog" / "b.png", red)
    save_png(tmp_path / "cat" / "z.png", pattern)
    save_png(tmp_path / "cat" / "sub" / "a.png", red)
    smooth = np.broadcast_to((np.arange(6) * 40 + 20).astype(np.uint8)[None, :, None], (4, 6, 3))
    Image.fromarray(np.ascontiguousarray(smooth)).save(tmp_path / "dog" / "a.JPG", format="JPEG",
                                                       quality=95)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()  # no images: not a class
    ds = read_image_folder(tmp_path)
    # sorted relative paths: cat/sub/a.png, cat/z.png, dog/a.JPG, dog/b.png
    assert ds.images.shape == (4, 3, 4, 6) and ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images[0, 0].eq(1).all() and ds.images[0, 1:].eq(-1).all()
    np.testing.assert_allclose(ds.images[1].numpy(), unit(pattern.transpose(2, 0, 1)), atol=1e-7)
    jpeg_error = (ds.images[2].numpy() - unit(smooth.transpose(2, 0, 1))).__abs__().max()
    assert jpeg_error < 0.1  # lossy, but the same picture
    grey = read_image_folder(tmp_path, channels=1)
    assert grey.shape == (1, 4, 6)
    np.testing.assert_allclose(grey.images[3, 0].numpy(), unit(np.full((4, 6), 76)), atol=1e-7)  # L of red

    flat = tmp_path / "flat"
    save_png(flat / "x.png", red)
    assert read_image_folder(flat).labels is None and read_image_folder(flat).num_classes == 0


def test_image_folder_resize_center_crop(tmp_path):
    wide = np.zeros((4, 8), np.uint8)
    wide[:, 2:6] = 255  # a white centre square between black side bands
    save_png(tmp_path / "wide.png", wide)
    tall = np.full((6, 2), 255, np.uint8)
    save_png(tmp_path / "tall.png", tall)
    ds = read_image_folder(tmp_path, size=4, channels=1)  # crop to a square first: the bands go
    assert ds.images.shape == (2, 1, 4, 4)
    assert ds.images.eq(1).all()
    assert read_image_folder(tmp_path, size=(2, 3)).shape == (3, 2, 3)
    assert load_image_dataset("image_folder", tmp_path, size=2, limit=1).images.shape == (1, 3, 2, 2)


def test_image_folder_malformed(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    refused(lambda: read_image_folder(empty), empty, "no PNG or JPEG")
    refused(lambda: read_image_folder(tmp_path / "gone"), tmp_path / "gone", "no such")

    garbage = tmp_path / "garbage"
    save_png(garbage / "a.png", np.zeros((4, 4, 3), np.uint8))
    (garbage / "b.png").write_bytes(b"this is not a png")
    refused(lambda: read_image_folder(garbage), garbage / "b.png", "cannot read image")

    cut = tmp_path / "cut"
    save_png(cut / "a.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = (cut / "a.png").read_bytes()
    (cut / "a.png").write_bytes(data[:len(data) // 2])
    refused(lambda: read_image_folder(cut), cut / "a.png", "cannot read image")

    mixed = tmp_path / "mixed"
    save_png(mixed / "a.png", np.zeros((4, 4, 3), np.uint8))
    save_png(mixed / "b.png", np.zeros((4, 4, 3), np.uint8))
    save_png(mixed / "c.png", np.zeros((5, 4, 3), np.uint8))
    message = refused(lambda: read_image_folder(mixed), mixed / "c.png", "5x4", "size")
    assert str(mixed / "a.png") in message
    assert read_image_folder(mixed, size=4).shape == (3, 4, 4)


# ----------------------------------------------------------------------------- digits, dispatch, split

def test_digits():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10 and ds.name == "digits"
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert torch.equal(load_image_dataset("digits", limit=10).images, ds.images[:10])


def test_dispatch_errors():
    with pytest.raises(ValueError, match="unknown image dataset"):
        load_image_dataset("svhn")
    with pytest.raises(ValueError, match="unknown option"):
        load_image_dataset("digits", hflip=True)
    with pytest.raises(ValueError, match="limit"):
        load_image_dataset("digits", limit=0)
    with pytest.raises(ImageDataError, match="needs a path"):
        load_image_dataset("cifar10")


def test_split_seeded_disjoint():
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    ds = ImageDataset(images, torch.arange(10) % 3, 3, "toy")
    train, held = ds.split(4, seed=7)
    again, held_again = ds.split(4, seed=7)
    assert torch.equal(held.images, held_again.images) and torch.equal(train.images, again.images)
    got = sorted(train.images.flatten().tolist() + held.images.flatten().tolist())
    assert got == list(range(10)) and len(held) == 4 and len(train) == 6
    assert torch.equal(train.labels, train.images.flatten().long() % 3)  # labels follow images
    assert not torch.equal(ds.split(4, seed=8)[1].images, held.images)
    with pytest.raises(ValueError):
        ds.split(10, seed=0)


# -------------------------------------------------------------------------------------------- augment

def test_random_hflip_reproducible_and_exact():
    x = torch.randn(64, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    a = random_hflip(x, torch.Generator().manual_seed(11))
    b = random_hflip(x, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(11)) < 0.5
    assert 10 < int(chosen.sum()) < 54
    assert torch.equal(a[chosen], x[chosen].flip(-1)) and torch.equal(a[~chosen], x[~chosen])
    assert torch.equal(random_hflip(x, None, p=0.0), x)
    assert torch.equal(random_hflip(x, None, p=1.0), x.flip(-1))


def test_augmented_images_source():
    images = torch.randn(20, 1, 4, 4)
    source = AugmentedImages(images, hflip=True)
    a, b = source(32, generator=torch.Generator().manual_seed(5)), \
        source(32, generator=torch.Generator().manual_seed(5))
    assert a.shape == (32, 1, 4, 4) and torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(20, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    expected = torch.where(flip.view(-1, 1, 1, 1), images[idx].flip(-1), images[idx])
    assert torch.equal(a, expected)
    plain = AugmentedImages(ImageDataset(images), hflip=False)(8, generator=torch.Generator())
    assert plain.shape == (8, 1, 4, 4)


# ---------------------------------------------------------------------------------------------- grids

def test_to_uint8_inverts_reader_scaling():
    u = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = torch.from_numpy(unit(u)).float()
    assert np.array_equal(to_uint8(x)[..., 0], u[:, 0])
    assert to_uint8(x[0]).shape == (16, 16, 1)


def test_make_grid_and_png_sizes(tmp_path):
    images = torch.full((5, 3, 4, 6), -1.0)
    grid = make_grid(images, nrow=3, padding=1, pad_value=1.0)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
    assert grid[0, 0].tolist() == [255] * 3 and grid[1, 1].tolist() == [0] * 3
    assert grid[6:10, 15:21].min() == 255  # the empty sixth cell is padding

    out = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3, scale=3)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (22 * 3, 11 * 3) and img.mode == "RGB"
    digits = torch.zeros(16, 1, 8, 8)
    with Image.open(save_image_grid(digits, tmp_path / "digits.png")) as img:  # 37 px → scale 7
        assert img.size == (37 * 7, 37 * 7) and img.mode == "L"

    sheet = save_labeled_grids({"fmm, 1 step": images, "lmd, 4 steps": digits}, tmp_path / "s.png")
    with Image.open(sheet) as img:
        assert img.mode == "RGB" and img.width > 16 * 9 and img.height > 2 * 48
