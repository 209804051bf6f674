"""Image datasets stay 8-bit in memory (flowmaps.data.images.ByteImages) and are decoded per batch:
every reader stores uint8 codes, decoding gives exactly the floats of the float64 scaling rounded once,
training on the codes is bit-identical to training on a float32 copy, the data std (``sigma_data:
data``) equals the float one without a float copy, nothing on the way from the files to a training step
and the feature reference decodes the whole set, and loading a synthetic ImageNet-32 file peaks far
below a float32 copy (measured in a subprocess). Nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmaps import FlowMap, Linear, UNet
from flowmaps.data.image_readers import (_set_channels, load_digits, load_image_dataset, read_cifar10,
                                         read_idx, read_image_folder, read_imagenet32)
from flowmaps.data.images import AugmentedImages, ByteImages, ImageDataset, random_hflip
from flowmaps.metrics.classifier import train_feature_classifier
from flowmaps.objectives import FMM, Velocity
from flowmaps.runs import evaluation as evaluation_module
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_model
from flowmaps.runs.config import load_config
from flowmaps.train.trainer import Trainer

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src"


def unit(u) -> torch.Tensor:
    """The scaling before this change, computed independently: u / 127.5 − 1 in float64, rounded once."""
    return torch.from_numpy(np.asarray(u, dtype=np.float64) / 127.5 - 1.0).float()


def random_codes(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------- ByteImages

def test_decoding_is_the_float64_scaling_rounded_once():
    codes = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    x = ByteImages(codes)
    assert x.codes.dtype == torch.uint8 and x.nbytes == 256 and x.shape == (4, 1, 8, 8)
    assert len(x) == 4 and x.ndim == 4 and x.device == torch.device("cpu")
    exact = unit(codes)
    assert torch.equal(x.decode(), exact)
    # float32 arithmetic rounds twice and misses some of these values: decoding must not use it
    assert not torch.equal(torch.from_numpy(codes).float() / 127.5 - 1, exact)
    idx = torch.tensor([3, 0, 3, 1])
    assert torch.equal(x[idx], exact[idx]) and x[idx].dtype == torch.float32
    assert torch.equal(x[1:3], exact[1:3]) and torch.equal(x[2, 0, 1], exact[2, 0, 1])
    part = x.subset(idx)
    assert isinstance(part, ByteImages) and part.codes.dtype == torch.uint8
    assert torch.equal(part.decode(), exact[idx]) and torch.equal(x.subset(slice(1, 2))[:], exact[1:2])
    assert torch.equal(x.histogram(), torch.ones(256, dtype=torch.long))
    assert x.aminmax() == (-1.0, 1.0) and ByteImages(codes[:1]).aminmax() == (-1.0, float(exact[0].max()))
    assert torch.equal(x.to("cpu").decode(), exact)


def test_byte_images_refuse_what_they_cannot_decode():
    with pytest.raises(ValueError, match="uint8"):
        ByteImages(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="code 17 has no level"):
        ByteImages(torch.full((2, 1, 2, 2), 17, dtype=torch.uint8), levels=[0.0] * 17)
    with pytest.raises(ValueError, match="finite"):
        ByteImages(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), levels=[float("nan")])


@pytest.mark.parametrize("case", ["digits", "uniform", "skewed", "constant_but_one"])
def test_std_from_the_histogram_equals_the_float_std(case):
    """``sigma_data: data`` is the std of all pixels: computed from the codes it must be the float32
    value ``Tensor.std()`` gives on a float copy, bit for bit."""
    rng = np.random.default_rng(3)
    if case == "digits":
        x = load_digits().data
    elif case == "uniform":
        x = ByteImages(random_codes((300, 3, 8, 8), seed=1))
    elif case == "skewed":
        x = ByteImages(np.minimum(rng.geometric(0.05, size=(500, 1, 6, 6)), 255).astype(np.uint8))
    else:
        codes = np.full((50, 3, 4, 4), 200, np.uint8)
        codes[7, 1, 2, 3] = 3
        x = ByteImages(codes)
    std = x.std()
    assert std.dtype == torch.float32 and std.ndim == 0
    assert torch.equal(std, x.decode().std())


# ---------------------------------------------------------------------------------------- readers

def write_readers_files(tmp_path: Path) -> dict:
    """One small file per format, each with the pixels it holds."""
    files = {}
    pixels = random_codes((5, 4, 6), seed=1)
    head = (2051).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in pixels.shape)
    (tmp_path / "images-idx3-ubyte").write_bytes(head + pixels.tobytes())
    files["idx"] = (lambda **kw: read_idx(tmp_path / "images-idx3-ubyte", **kw), pixels[:, None])
    planes = random_codes((4, 3, 32, 32), seed=2)
    records = np.concatenate([np.arange(4, dtype=np.uint8)[:, None], planes.reshape(4, -1)], axis=1)
    (tmp_path / "data_batch_1.bin").write_bytes(records.tobytes())
    files["cifar10"] = (lambda **kw: read_cifar10(tmp_path / "data_batch_1.bin", **kw), planes)
    flat = random_codes((6, 3 * 8 * 8), seed=3)
    np.savez(tmp_path / "train_data_batch_1.npz", data=flat, labels=np.arange(1, 7))
    files["imagenet32"] = (lambda **kw: read_imagenet32(tmp_path / "train_data_batch_1.npz", **kw),
                           flat.reshape(6, 3, 8, 8))
    folder = tmp_path / "folder"
    folder.mkdir()
    rgb = random_codes((3, 5, 7, 3), seed=4)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"{i}.png")
    files["image_folder"] = (lambda **kw: read_image_folder(folder, **kw), rgb.transpose(0, 3, 1, 2))
    return files


def test_every_reader_stores_uint8_codes_decoded_exactly(tmp_path):
    for name, (read, pixels) in write_readers_files(tmp_path).items():
        ds = read()
        assert isinstance(ds.data, ByteImages), name
        assert ds.data.codes.dtype == torch.uint8 and ds.data.nbytes == pixels.size, name
        assert np.array_equal(ds.data.codes.numpy(), pixels), name
        assert torch.equal(ds.images, unit(pixels)), name  # the floats the readers gave before
        # a limit keeps exactly the first images: the file's whole buffer is not held for them
        first = read(limit=2).data.codes
        assert np.array_equal(first.numpy(), pixels[:2]), name
        assert first.untyped_storage().nbytes() == pixels[:2].size, name
    digits = load_digits()
    assert isinstance(digits.data, ByteImages) and digits.data.codes.dtype == torch.uint8
    assert digits.data.levels.tolist() == [v / 8 - 1 for v in range(17)]
    from sklearn.datasets import load_digits as sklearn_digits
    before = torch.from_numpy(sklearn_digits().images / 8.0 - 1.0).float().unsqueeze(1)
    assert torch.equal(digits.images, before)


def test_split_and_channels_keep_codes_resize_and_grey_give_the_same_floats_as_before(tmp_path):
    ds = ImageDataset(ByteImages(random_codes((12, 1, 4, 4))), torch.arange(12) % 3, 3, "toy")
    train, held = ds.split(4, seed=0)
    assert isinstance(train.data, ByteImages) and isinstance(held.data, ByteImages)
    assert torch.equal(torch.cat([train.images, held.images]).sort(0).values, ds.images.sort(0).values)
    rgb = _set_channels(ds.data, 3)
    assert isinstance(rgb, ByteImages) and torch.equal(rgb.decode(), ds.images.repeat(1, 3, 1, 1))
    # grey from RGB is computed in chunks of 1024 images; the same floats as in one piece
    colour = ByteImages(random_codes((2100, 3, 2, 3), seed=5))
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = _set_channels(colour, 1)
    assert grey.dtype == torch.float32 and torch.equal(grey, (colour.decode() * weights).sum(1, keepdim=True))
    # resizing (between the 8-bit levels) stores float32, the values of the float path
    files = write_readers_files(tmp_path)
    small = load_image_dataset("cifar10", tmp_path / "data_batch_1.bin", size=8)
    expected = torch.nn.functional.interpolate(unit(files["cifar10"][1]), size=(8, 8), mode="bilinear",
                                               antialias=True, align_corners=False).clamp(-1, 1)
    assert isinstance(small.data, torch.Tensor) and torch.equal(small.images, expected)
    assert isinstance(load_image_dataset("cifar10", tmp_path / "data_batch_1.bin", size=32).data,
                      ByteImages)  # the native size: nothing to resize
    ds.images = ds.images  # assigning floats stores floats
    assert isinstance(ds.data, torch.Tensor) and ds.data.dtype == torch.float32


# ------------------------------------------------------------------------------- bit-identical use

def tiny_unet(shape, num_classes=0) -> FlowMap:
    torch.manual_seed(0)
    return FlowMap(UNet(shape, channels=8, channel_mults=(1, 2), blocks_per_level=1,
                        attention_resolutions=(), num_classes=num_classes))


@pytest.mark.parametrize("objective", ["velocity", "fmm"])
def test_training_on_codes_is_bit_identical_to_training_on_a_float_copy(objective):
    """Same seeds, the data once as a float32 tensor (the representation before this change, from the
    float64 formula) and once as codes: the same losses and the same weights after a few steps, with
    class labels, label dropout, flips and gradient accumulation."""
    codes = random_codes((40, 3, 8, 8), seed=7)
    labels = torch.arange(40) % 4
    runs = []
    for data in (unit(codes), ByteImages(codes)):
        model = tiny_unet((3, 8, 8), num_classes=4)
        obj = Velocity(Linear()) if objective == "velocity" else FMM(Linear())
        trainer = Trainer(model, obj, data, batch_size=8, grad_accum=2, lr=1e-3, seed=3, labels=labels,
                          label_dropout=0.3, null_label=4, augment=random_hflip, ema_decay=0.9)
        losses = [trainer.step().loss.item() for _ in range(3)]
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()]),
                     trainer.validation_loss(data[:16], cond=labels[:16])))
    (losses_f, weights_f, val_f), (losses_b, weights_b, val_b) = runs
    assert losses_f == losses_b and torch.equal(weights_f, weights_b) and val_f == val_b
    initial = torch.cat([p.detach().flatten() for p in tiny_unet((3, 8, 8), num_classes=4).parameters()])
    assert losses_f[0] != losses_f[-1] and not torch.equal(weights_f, initial)  # it did train


def test_augmented_images_draw_the_same_floats_from_codes():
    codes = random_codes((30, 3, 4, 6), seed=9)
    draws = [AugmentedImages(source)(16, generator=torch.Generator().manual_seed(2))
             for source in (unit(codes), ByteImages(codes), ImageDataset(ByteImages(codes)))]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_feature_classifier_on_codes_matches_the_float_copy():
    ds = load_digits(limit=300)
    val_codes, val_labels = ds.data.subset(slice(0, 50)), ds.labels[:50]
    for with_validation in (False, True):  # held out from the inputs (subset of codes), or given
        results = []
        for images, val_images in ((ds.images, val_codes[:]), (ds.data, val_codes)):
            validation = (val_images, val_labels) if with_validation else None
            model, accuracy = train_feature_classifier(images, ds.labels, 10, steps=4, batch_size=16,
                                                       seed=1, validation=validation)
            results.append((accuracy, torch.cat([p.detach().flatten() for p in model.parameters()])))
        assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    bad = ByteImages(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), levels=[2.0])
    with pytest.raises(ValueError, match="scaled to"):
        train_feature_classifier(bad, torch.zeros(4), 2, steps=1)


def test_reference_batches_are_those_of_the_concatenation():
    a, b = ByteImages(random_codes((7, 1, 2, 2), 1)), ByteImages(random_codes((5, 1, 2, 2), 2))
    whole = torch.cat([a.decode(), b.decode()])
    for size in (1, 3, 5, 7, 12, 20):
        got = list(evaluation_module._joined_batches((a, b), size))
        expected = list(whole.split(size))
        assert len(got) == len(expected) and all(torch.equal(x, y) for x, y in zip(got, expected))


def test_pipeline_never_decodes_the_whole_set(tmp_path, monkeypatch):
    """From the files to training steps, the validation loss and the feature reference (classifier
    trained and evaluated on the codes): the bundle holds uint8 codes, ``decode`` (a float copy of a
    set) is never called, and no indexing decodes more than a batch."""
    largest = []
    getitem = ByteImages.__getitem__

    def counting(self, index):
        out = getitem(self, index)
        largest.append(out.shape[0] if out.ndim == 4 else 1)
        return out

    def refuse(self):
        raise AssertionError("a whole image set was decoded to float32")

    monkeypatch.setattr(ByteImages, "__getitem__", counting)
    monkeypatch.setattr(ByteImages, "decode", refuse)
    cfg = load_config("digits", overrides=["model.channels=8", "model.sigma_data=data",
                                           "interpolant.sigma0=data", "model.class_conditional=true",
                                           "eval.classifier_steps=3", "eval.batch_size=200"])
    bundle = ex.build_data(cfg)
    assert isinstance(bundle.train, ByteImages) and isinstance(bundle.held_out, ByteImages)
    assert bundle.train.codes.dtype == bundle.held_out.codes.dtype == torch.uint8
    assert bundle.train.nbytes + bundle.held_out.nbytes == 1797 * 64 and bundle.sample_shape == (1, 8, 8)
    scales = ex.resolve_scales(cfg, bundle)
    assert scales["sigma_data"] == scales["sigma0"] == float(getitem(bundle.train, slice(None)).std())
    model = build_model(cfg, scales)
    trainer = Trainer(model, Velocity(Linear()), bundle.train, batch_size=32, labels=bundle.labels,
                      null_label=10, augment=random_hflip)
    for _ in range(2):
        trainer.step()
    trainer.validation_loss(bundle.held_out[:256], cond=bundle.held_out_labels[:256])
    evaluation_module.build_reference(cfg, bundle, tmp_path / "reference", progress=False)
    assert json.loads((tmp_path / "reference" / "reference.json").read_text())["images"] == 1797
    assert 0 < max(largest) <= 297 < len(bundle.train)  # at most the held-out set (297) at once


# ---------------------------------------------------------------------------------- memory (RSS)

CHILD = """
import json, sys
import torch
from flowmaps.runs import experiment as ex
from flowmaps.runs.config import load_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

cfg = load_config("imagenet32", overrides=[f"data.path={sys.argv[1]}", "data.n_eval=1000",
                                           "model.sigma_data=data", "train.device=cpu"])
baseline = status("VmRSS")
bundle = ex.build_data(cfg)
scales = ex.resolve_scales(cfg, bundle)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "sigma_data": scales["sigma_data"],
                  "stored": type(bundle.train).__name__}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_loading_imagenet32_peaks_well_below_a_float32_copy(tmp_path):
    """20,000 synthetic 32×32×3 images (61 MB as bytes, 246 MB as float32): loading them, splitting off
    the held-out set and computing the data std must add less than 3× the bytes to the peak RSS of a
    fresh process. A float32 copy alone (4×) exceeds that; the code before this change peaked at ~8×."""
    n = 20_000
    np.savez(tmp_path / "train_data_batch_1.npz", data=random_codes((n, 3072)),
             labels=np.random.default_rng(1).integers(1, 1001, n))
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["stored"] == "ByteImages"
    added = got["peak"] - got["baseline"]
    assert added < 3 * n * 3072, f"loading added {added / 2**20:.0f} MiB to the peak RSS"


def test_the_finite_check_of_float_data_scans_every_block():
    from flowmaps.train.batches import all_finite

    x = torch.zeros(10, 3)
    assert all_finite(x, rows=3)
    x[9, 2] = float("inf")  # in the last, partial block
    assert not all_finite(x, rows=3)
