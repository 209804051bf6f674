"""The latent space (issue 18 part 2): ``flowmaps encode`` stores exactly ``(mean − shift) · scale`` of a
diffusers AutoencoderKL in the stored dtype, with flipped copies, labels and a truthful index; the
``latents`` dataset reads one shard at a time (memory measured in a subprocess), draws labeled rows,
shares shards out among ranks and resumes its position exactly; ``train → sample → evaluate`` decode
through the VAE; bad input is one line with exit status 2 and nothing on disk changed. A tiny randomly
initialised VAE, saved with ``save_pretrained`` to a temporary folder; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmaps.cli.main import main
from flowmaps.data.latents import LatentShards, read_index, read_safetensors
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_model, class_labels, load_model
from flowmaps.runs.config import load_config

from diffusers import AutoencoderKL  # the test extra pins diffusers: without it these tests fail

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src"
SCALE, SHIFT = 0.5, 0.1


def tiny_vae(blocks=(8, 16), in_channels=3, seed=0, **config) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL (downsampling 2^(len(blocks)-1), 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
                         **{"scaling_factor": SCALE, "shift_factor": SHIFT, **config})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("latents")


@pytest.fixture(scope="module")
def vae_dir(root):
    tiny_vae().save_pretrained(root / "vae")
    return root / "vae"


ENCODE = ["--preset", "digits", "--shard-size", "100", "--batch-size", "64", "--quiet", "data.limit=300",
          "data.hflip=true"]


@pytest.fixture(scope="module")
def encoded(root, vae_dir):
    """300 digits: 60 held out, 240 training images and their mirror images in 5 shards."""
    assert main(["encode", "--vae", str(vae_dir), "--out", str(root / "lat"), *ENCODE]) == 0
    return root / "lat"


def shard_rows(folder: Path) -> dict[str, torch.Tensor]:
    """Every shard's tensors concatenated in file order (copies)."""
    index = read_index(folder)
    parts = [read_safetensors(folder / s["file"]) for s in index["shards"]]
    return {k: torch.cat([p[k].clone() for p in parts]) for k in parts[0]}


def source_split():
    """The digits as the encoder split them (data.limit=300, the digits preset's hold-out)."""
    return ex.build_data(load_config("digits", overrides=["data.limit=300"]))


def reference_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """diffusers' own encoding, computed here: (posterior mean − shift) · scale, in float32."""
    with torch.no_grad():
        return (vae.encode(images.repeat(1, 3, 1, 1)).latent_dist.mean - SHIFT) * SCALE


# ------------------------------------------------------------------------------------------ encode

def test_shards_hold_exactly_the_vaes_encodings_and_flips(encoded, vae_dir):
    rows = shard_rows(encoded)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    bundle = source_split()
    train = bundle.train[:]  # float32 images (240, 1, 8, 8)
    assert rows["latents"].dtype == torch.float16 and rows["latents"].shape == (480, 4, 4, 4)
    plain, flipped = rows["flipped"] == 0, rows["flipped"] == 1
    order = rows["source_index"][plain]
    # every training image once as itself and once mirrored, in a shuffled order
    assert sorted(order.tolist()) == list(range(240)) and order.tolist() != list(range(240))
    assert torch.equal(rows["source_index"][flipped], order)
    # the encoder's batches: 64 images in stored order, each batch's flips in a batch of their own
    for batch in order.split(64):
        x = train[batch]
        pos = torch.nonzero(plain & torch.isin(rows["source_index"], batch)).flatten()
        pos_f = torch.nonzero(flipped & torch.isin(rows["source_index"], batch)).flatten()
        assert torch.equal(rows["source_index"][pos], batch)
        assert torch.equal(rows["latents"][pos], reference_latents(vae, x).half())
        assert torch.equal(rows["latents"][pos_f], reference_latents(vae, x.flip(-1)).half())
        assert torch.equal(rows["labels"][pos], bundle.labels[batch])
        assert torch.equal(rows["labels"][pos_f], bundle.labels[batch])
    # a flipped copy is the encoding of the mirror image, not the mirror of the encoding
    assert not torch.equal(rows["latents"][pos_f], rows["latents"][pos].flip(-1))
    held = read_safetensors(encoded / "held_out.safetensors")
    assert torch.equal(held["latents"], reference_latents(vae, bundle.held_out[:]).half())
    assert torch.equal(held["labels"], bundle.held_out_labels)


def test_the_index_describes_the_folder(encoded, vae_dir):
    index = json.loads((encoded / "index.json").read_text())
    rows = shard_rows(encoded)
    assert index["format"] == "flowmaps-latents" and index["format_version"] == 1
    assert index["shape"] == [4, 4, 4] and index["dtype"] == "float16" and index["count"] == 480
    assert [s["count"] for s in index["shards"]] == [100, 100, 100, 100, 80]
    assert sorted(p.name for p in encoded.iterdir()) == sorted(
        ["index.json", "held_out.safetensors"] + [f"latents-0000{k}.safetensors" for k in range(5)])
    assert index["held_out"] == {"file": "held_out.safetensors", "count": 60}
    assert index["num_classes"] == 10 and index["hflip"] is True and index["posterior"] == "mean"
    assert index["image_shape"] == [1, 8, 8]
    vae = index["vae"]
    assert vae["path"] == str(vae_dir.resolve()) and vae["downsample"] == 2
    assert (vae["scaling_factor"], vae["shift_factor"]) == (SCALE, SHIFT)
    config = {k: v for k, v in json.loads((vae_dir / "config.json").read_text()).items()
              if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    assert vae["config_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert index["source"]["preset"] == "digits"
    assert index["source"]["data"]["name"] == "digits" and index["source"]["data"]["limit"] == 300
    z = rows["latents"].double()
    assert index["stats"]["std_all"] == pytest.approx(float(z.std()), rel=1e-9)
    assert index["stats"]["std"] == pytest.approx(z.transpose(0, 1).reshape(4, -1).std(1).tolist(),
                                                  rel=1e-9)


def test_bfloat16_posterior_samples_and_a_one_channel_vae(root, vae_dir):
    out = root / "bf16"
    assert main(["encode", "--vae", str(vae_dir), "--out", str(out), "--dtype", "bfloat16",
                 "--posterior", "sample", "--seed", "3", "--preset", "digits", "--quiet",
                 "data.limit=40", "--batch-size", "100"]) == 0
    index, rows = read_index(out), shard_rows(out)
    assert index["dtype"] == "bfloat16" and rows["latents"].dtype == torch.bfloat16
    assert index["posterior"] == "sample" and index["hflip"] is False and index["count"] == 32
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    mean = reference_latents(vae, source_split_of(40).train[:][rows["source_index"]])
    # a posterior sample: near the mean (tiny random VAE: std about 1) but not it
    assert not torch.equal(rows["latents"], mean.bfloat16())
    assert (rows["latents"].float() - mean).abs().max() < 10 * SCALE
    grey = root / "vae1"
    tiny_vae(in_channels=1).save_pretrained(grey)
    assert main(["encode", "--vae", str(grey), "--out", str(root / "grey"), "--preset", "digits",
                 "--quiet", "data.limit=40"]) == 0
    g = tiny_vae(in_channels=1).eval()
    rows = shard_rows(root / "grey")
    with torch.no_grad():
        expected = (g.encode(source_split_of(40).train[:][rows["source_index"]]).latent_dist.mean
                    - SHIFT) * SCALE
    assert torch.equal(rows["latents"], expected.half())


def test_bf16_autocast_encodes_close_to_fp32_but_not_equal(root, vae_dir):
    out = root / "autocast"
    assert main(["encode", "--vae", str(vae_dir), "--out", str(out), "--precision", "bf16", "--preset",
                 "digits", "--quiet", "data.limit=40", "--dtype", "bfloat16"]) == 0
    assert read_index(out)["precision"] == "bf16"
    rows = shard_rows(out)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    fp32 = reference_latents(vae, source_split_of(40).train[:][rows["source_index"]])
    z = rows["latents"].float()
    assert not torch.equal(z, fp32.bfloat16().float())  # autocast ran: not the fp32 encoding
    # bf16 keeps 8 significant bits: each of the encoder's few layers rounds at about 2^-8 relative
    assert (z - fp32).abs().max() < 0.05 * fp32.abs().max()


def source_split_of(limit: int):
    return ex.build_data(load_config("digits", overrides=[f"data.limit={limit}"]))


# ----------------------------------------------------------------------------------- lazy reading

def test_draws_come_from_one_shard_at_a_time_in_epochs(encoded):
    rows = shard_rows(encoded)
    index = read_index(encoded)
    source = LatentShards(encoded, labeled=True, seed=5)
    g = torch.Generator().manual_seed(0)
    bounds = np.cumsum([0] + [s["count"] for s in index["shards"]])
    visits = []
    for _ in range(40):  # 40 batches of 32 = 1280 rows: more than two epochs of 480
        x, y = source.draw_labeled(32, g)
        k = source._current[0]
        if not visits or visits[-1] != k:
            visits.append(k)
        shard = rows["latents"][bounds[k]:bounds[k + 1]].float()
        labels = rows["labels"][bounds[k]:bounds[k + 1]]
        match = (x[:, None] == shard[None]).flatten(2).all(-1)  # (32, rows of the shard)
        assert match.any(1).all()  # every row drawn is a row of the current shard, with its label
        assert all(labels[match[i]].eq(y[i]).all() for i in range(32))
    assert source.loads == len(visits)  # a shard is mapped once per visit
    assert sorted(visits[:5]) == [0, 1, 2, 3, 4] and sorted(visits[5:10]) == [0, 1, 2, 3, 4]
    assert visits[:5] != visits[5:10]  # epochs are reshuffled
    # ranks of a torchrun job take disjoint shards of each epoch
    ranks = [LatentShards(encoded, seed=5, rank=r, world=2) for r in range(2)]
    mine = [set(r._mine(0)) for r in ranks]
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == {0, 1, 2, 3, 4}


def test_a_restored_position_draws_the_same_batches(encoded):
    a = LatentShards(encoded, labeled=True, seed=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(7):
        a.draw_labeled(32, g)
    state, g_state = a.state_dict(), g.get_state()
    expected = [a.draw_labeled(32, g) for _ in range(10)]
    b = LatentShards(encoded, labeled=True, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    g.set_state(g_state)
    for x, y in expected:
        bx, by = b.draw_labeled(32, g)
        assert torch.equal(bx, x) and torch.equal(by, y)


def test_trainer_resumes_a_latent_run_bit_identically(encoded):
    from flowmaps import FlowMap, Linear, UNet
    from flowmaps.objectives import Velocity
    from flowmaps.train.trainer import Trainer

    def build():
        torch.manual_seed(0)
        model = FlowMap(UNet((4, 4, 4), channels=8, channel_mults=(1,), blocks_per_level=1,
                             attention_resolutions=(),
                             num_classes=10))
        return Trainer(model, Velocity(Linear()), LatentShards(encoded, labeled=True, seed=0),
                       batch_size=48, null_label=10, label_dropout=0.2, seed=4)

    straight = build()
    straight.run(12, progress=False)  # 576 rows: the shards change within the run
    first = build()
    first.run(5, progress=False)
    tensors, meta = first.state_dict()
    assert meta["data_position"]["source"] == [first.source.state_dict()]
    resumed = build()
    resumed.load_state_dict(tensors, json.loads(json.dumps(meta)))
    resumed.run(7, progress=False)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert straight.source.state_dict() == resumed.source.state_dict()


def test_labels_reach_the_objective_aligned_with_their_rows(encoded, monkeypatch):
    cfg = load_config("latents", overrides=[f"data.path={encoded}", "model.class_conditional=true",
                                            "model.channels=8"])
    bundle = ex.build_data(cfg)
    assert bundle.labels is None and bundle.train.yields_labels and bundle.num_classes == 10
    scales = ex.resolve_scales(cfg, bundle)
    assert scales["shape"] == [4, 4, 4] and scales["num_classes"] == 10
    assert scales["sigma_data"] == pytest.approx(read_index(encoded)["stats"]["std_all"])
    from flowmaps.objectives import Velocity
    from flowmaps.interpolants import Linear
    from flowmaps.train.trainer import Trainer

    seen = []
    real = Velocity.terms

    def spy(self, model, x0, x1, s, t, cond):
        seen.append((x1.clone(), cond.clone()))
        return real(self, model, x0, x1, s, t, cond)

    monkeypatch.setattr(Velocity, "terms", spy)
    trainer = Trainer(build_model(cfg, scales), Velocity(Linear()), bundle.train, batch_size=32,
                      null_label=10, label_dropout=0.0)
    trainer.step()
    rows = shard_rows(encoded)
    x, cond = seen[0]
    match = (x[:, None] == rows["latents"].float()[None]).flatten(2).all(-1)
    assert all(rows["labels"][match[i]].eq(cond[i]).all() and match[i].any() for i in range(32))
    assert len(set(cond.tolist())) > 1


CHILD = """
import json, sys, torch
from flowmaps.data.latents import LatentShards

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

g = torch.Generator().manual_seed(0)
warm = torch.randn(64, 4, 32, 32).half()  # the ops of a draw, once, before the baseline
for _ in range(3):
    float(warm[torch.randint(64, (256,), generator=g)].float().sum()), bool(torch.isfinite(warm).all())
source = LatentShards(sys.argv[1], labeled=True, seed=0)
baseline = status("VmRSS")
total = 0
while source.loads < int(sys.argv[2]):
    x, y = source.draw_labeled(256, g)
    total += float(x.sum())
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "loads": source.loads}))
"""


def write_random_latents(folder: Path, shards: int, rows: int, shape=(4, 32, 32)) -> int:
    """A latents folder of random float16 shards (the format ``flowmaps encode`` writes, without a
    VAE); returns the bytes of one shard's latents."""
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    entries = []
    for k in range(shards):
        z = torch.randn(rows, *shape, generator=g).half()
        save_file({"latents": z, "labels": torch.randint(10, (rows,), generator=g),
                   "source_index": torch.arange(rows), "flipped": torch.zeros(rows, dtype=torch.uint8)},
                  str(folder / f"latents-{k:05d}.safetensors"))
        entries.append({"file": f"latents-{k:05d}.safetensors", "count": rows})
    index = {"format": "flowmaps-latents", "format_version": 1, "shape": list(shape),
             "dtype": "float16", "count": shards * rows, "shards": entries, "held_out": None,
             "num_classes": 10, "vae": {}, "stats": {"std_all": 1.0}}
    (folder / "index.json").write_text(json.dumps(index))
    return rows * 2 * int(np.prod(shape))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_reading_every_shard_holds_about_one(tmp_path):
    """4 shards of 64 MiB (256 MiB of latents), every one visited twice by batches of 256 rows (4 MiB
    as float32): the peak RSS of the process rises by less than 2 shards above its level before the
    first draw (one shard's pages, the batches' buffers and the allocator's slack). A reader holding
    the set would add at least 4 shards (8 as float32)."""
    shard = write_random_latents(tmp_path / "lat", shards=4, rows=8192)
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "lat"), "8"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    added = got["peak"] - got["baseline"]
    assert got["loads"] == 8
    assert added < 2 * shard, f"reading added {added / 2**20:.0f} MiB (a shard is {shard / 2**20:.0f})"


# ------------------------------------------------------------------------------ the whole pipeline

@pytest.fixture(scope="module")
def run(root, encoded):
    out = root / "run"
    assert main(["train", "--preset", "latents", f"data.path={encoded}", "--objective", "lsd", "--out",
                 str(out), "--quiet", "train.steps=12", "train.batch_size=32", "model.channels=8",
                 "model.class_conditional=true", "train.checkpoint_every=6"]) == 0
    return out


def test_train_records_the_vae_and_plots_decoded_images(run, vae_dir):
    cfg = load_config(None, run / "config.yaml")
    assert cfg.data.name == "latents" and cfg.decode.vae == str(vae_dir.resolve())
    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    assert meta["scales"]["shape"] == [4, 4, 4] and meta["scales"]["num_classes"] == 10
    assert meta["scales"]["latents"]["image_shape"] == [1, 8, 8]
    assert len(meta["trainer"]["data_position"]["source"]) == 1
    from PIL import Image
    # 8x8 grey tiles (decoded), not 4x4 latents: the sheet is as wide as 8 tiles of 8 + borders
    assert (run / "plots" / "samples.png").is_file()
    assert Image.open(run / "plots" / "samples.png").size[1] > 0


def test_sample_decodes_through_the_vae(run, vae_dir, tmp_path):
    assert main(["sample", str(run), "--n", "20", "--steps", "1,2", "--out", str(tmp_path / "s"),
                 "--batch-size", "7", "--seed", "4"]) == 0
    images = np.load(tmp_path / "s" / "samples_steps2.npy")
    assert images.shape == (20, 1, 8, 8) and (tmp_path / "s" / "samples.png").is_file()
    # the same samples drawn here and decoded by diffusers directly: z / scale + shift, RGB mean
    loaded = load_model(run)
    x0 = loaded.interpolant.sample_base(torch.empty(20, 4, 4, 4), torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = loaded.model.sample(x0, steps=2, cond=class_labels(20, loaded.scales))
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        expected = vae.decode(z / SCALE + SHIFT).sample.mean(1, keepdim=True)
    np.testing.assert_allclose(images, expected.numpy(), atol=1e-5)


def test_evaluate_scores_decoded_images_against_the_source_digits(run, tmp_path):
    assert main(["evaluate", str(run), "--out", str(tmp_path / "e"), "--steps", "1,2", "--n", "200",
                 "eval.classifier_steps=20", "decode.batch_size=50"]) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [r["steps"] for r in result["rows"]] == [1, 2]
    assert all(r["fd"] is not None and r["fd"] > 0 for r in result["rows"])
    reference = json.loads((tmp_path / "e" / "reference" / "reference.json").read_text())
    assert reference["images"] == 300 and reference["shape"] == [1, 8, 8]  # the digits themselves
    assert {p.name for p in (tmp_path / "e" / "plots").iterdir()} >= {"samples_grid.png",
                                                                     "trajectories.png"}


def test_two_ranks_train_on_disjoint_shards(encoded, tmp_path):
    """torchrun, 2 processes: each rank draws from its own shards and the run resumes both positions."""
    from test_sharding import ok, torchrun

    args = ["train", "--preset", "latents", f"data.path={encoded}", "--out", tmp_path / "ddp", "--quiet",
            "train.steps=4", "train.batch_size=40", "model.channels=8", "model.class_conditional=true"]
    ok(torchrun(*args))
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "final.json").read_text())
    positions = meta["trainer"]["data_position"]["source"]
    assert len(positions) == 2 and all(p["epoch"] == 0 for p in positions)
    mine = [LatentShards(encoded, seed=0, rank=r, world=2)._mine(0) for r in range(2)]
    assert set(mine[0]).isdisjoint(mine[1])
    # 4 draws of 40 from each rank's own shards (100 rows each, the last 80), whole batches per visit
    counts = [s["count"] for s in read_index(encoded)["shards"]]

    def walk(order):
        position = left = 0
        for _ in range(4):
            if left <= 0:
                left, position = counts[order[position]], position + 1
            left -= 40
        return {"epoch": 0, "position": position, "left": left}

    assert positions == [walk(m) for m in mine]


def test_a_pixel_preset_takes_latents(encoded, tmp_path):
    """Any preset: the digits preset with data.name=latents gets its model shape from the latents."""
    assert main(["train", "--preset", "digits", "data.name=latents", f"data.path={encoded}", "--out",
                 str(tmp_path / "r"), "--quiet", "train.steps=2", "train.batch_size=8",
                 "model.channels=8", "model.attention_resolutions=[]"]) == 0
    meta = json.loads((tmp_path / "r" / "checkpoints" / "final.json").read_text())
    assert meta["scales"]["shape"] == [4, 4, 4]


# ------------------------------------------------------------------------------------- bad input

def one_line_error(capsys, *argv, words=()):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowmaps: error:"), err
    assert all(w in err[0] for w in words), err[0]


def snapshot(folder: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_encode_inputs_are_one_line_and_write_nothing(root, vae_dir, tmp_path, capsys):
    out = tmp_path / "new"
    one_line_error(capsys, "encode", "--vae", tmp_path / "missing", "--out", out, words=["no such folder"])
    notvae = tmp_path / "notvae"
    notvae.mkdir()
    (notvae / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    one_line_error(capsys, "encode", "--vae", notvae, "--out", out, words=["not a diffusers AutoencoderKL"])
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(vae_dir / "config.json", broken / "config.json")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    one_line_error(capsys, "encode", "--vae", broken, "--out", out, words=["cannot load"])
    one_line_error(capsys, "encode", "--vae", vae_dir, "--out", out, "--preset", "gmm",
                   words=["image dataset"])
    one_line_error(capsys, "encode", "--vae", vae_dir, "--out", out, "--preset", "mnist",
                   "data.path=" + str(tmp_path / "nomnist"), words=["no such file"])
    deep = tmp_path / "vae3"
    tiny_vae(blocks=(8, 8, 8)).save_pretrained(deep)  # downsamples by 4
    one_line_error(capsys, "encode", "--vae", deep, "--out", out, "data.image_size=10",
                   words=["multiples of 4", "data.image_size"])
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    one_line_error(capsys, "encode", "--vae", vae_dir, "--out", existing, words=["already exists"])
    assert snapshot(existing) == {str(existing / "keep.txt"): b"mine"}


def test_bad_latents_are_one_line_and_write_nothing(encoded, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = ["train", "--preset", "latents", "--quiet", "train.steps=2", "model.channels=8"]
    one_line_error(capsys, *train, f"data.path={tmp_path / 'nothing'}", "--out", tmp_path / "r",
                   words=["no such folder"])
    one_line_error(capsys, *train, f"data.path={tmp_path}", "--out", tmp_path / "r",
                   words=["not a latents folder"])
    bad = tmp_path / "bad"
    shutil.copytree(encoded, bad)
    (bad / "index.json").write_text("{not json")
    one_line_error(capsys, *train, f"data.path={bad}", "--out", tmp_path / "r", words=["not valid JSON"])
    shutil.copy(encoded / "index.json", bad / "index.json")
    shard = bad / "latents-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    # every shard's header is checked before anything is written
    one_line_error(capsys, *train, f"data.path={bad}", "--out", tmp_path / "r2",
                   words=["latents-00002", "truncated or corrupt"])
    (bad / "latents-00002.safetensors").unlink()
    one_line_error(capsys, *train, f"data.path={bad}", "--out", tmp_path / "r3",
                   words=["latents-00002", "missing"])
    assert not any((tmp_path / r).exists() for r in ("r", "r2", "r3"))
    one_line_error(capsys, "train", "--preset", "latents", "data.path=", words=["data.path"])


def test_decoding_needs_the_encoders_vae(run, tmp_path, capsys, vae_dir):
    other = tmp_path / "other"
    tiny_vae(scaling_factor=0.25).save_pretrained(other)
    before = snapshot(run)
    one_line_error(capsys, "sample", run, "--n", "4", "--vae", other, "--out", tmp_path / "s",
                   words=["config differs"])
    one_line_error(capsys, "evaluate", run, "--n", "4", "--out", tmp_path / "e",
                   f"decode.vae={tmp_path / 'gone'}", words=["no such folder"])
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()
    assert snapshot(run) == before
