"""Sampling and evaluation on --device and across torchrun ranks: two processes (gloo, CPU) draw their
shares of the base points and rank 0 writes; the samples of every index equal the one-process run's bit
for bit, and so does every number of the evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmaps import FlowMap, UNet
from flowmaps.cli import main
from flowmaps.runs.models import build_model, save_model
from flowmaps.runs.config import load_config
from flowmaps.train.distributed import map_sharded, shard_rows

BIN = Path(sys.executable).parent
TINY = ["model.width=16", "model.depth=2", "train.batch_size=32", "data.n_train=500", "data.n_eval=300",
        "train.steps=30", "--quiet"]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a rank that aborts shows where
    return subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "flowmaps", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def one_process(*args):
    """The one-process reference, run in this process (the CLI's ``main``; one torch thread, as the
    ranks have): no interpreter start-up to pay for."""
    assert main([str(a) for a in args]) == 0


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("n, chunk, world", [(250, 40, 2), (10, 3, 4), (1, 1, 2), (7, 100, 3),
                                             (64, 8, 8), (0, 5, 2)])
def test_shards_are_contiguous_whole_chunks_covering_every_row_once(n, chunk, world):
    bounds = [shard_rows(n, chunk, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
    assert all(start % chunk == 0 or start == n for start, _ in bounds)  # whole chunks only
    sizes = [-(-(end - start) // chunk) for start, end in bounds]  # chunks per rank
    assert max(sizes) - min(sizes) <= 1


def test_one_process_maps_every_chunk():
    x = torch.arange(23.0)[:, None]
    calls = []
    out = map_sharded(lambda xc: calls.append(xc.shape[0]) or xc * 2, x, chunk=5)
    assert calls == [5, 5, 5, 5, 3] and torch.equal(out, x * 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An LMD map (gmm, exact teacher) and a class-conditional U-Net checkpoint (random weights)."""
    root = tmp_path_factory.mktemp("sharding")
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(root / "lmd"),
                 *TINY]) == 0
    cfg = load_config("digits", overrides=["objective.name=lmd", "model.class_conditional=true",
                                           "model.channels=8",
                                           "model.channel_mults=[1, 2]", "model.blocks_per_level=1",
                                           "model.attention_resolutions=[4]"])
    scales = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 64, "shape": [1, 8, 8], "num_classes": 10}
    torch.manual_seed(0)
    unet = build_model(cfg, scales)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.domain = "triangle"
    save_model(root / "unet" / "checkpoints" / "final", unet, None, cfg, scales, None, step=1)
    return root


def test_sharded_samples_equal_unsharded_ones(models, tmp_path):
    """250 points in batches of 40 (7 batches: 4 on rank 0, 3 on rank 1), flow map at 1 and 3 steps,
    and a class-conditional U-Net cycling through the labels; then one point (rank 1 has none)."""
    # --num-samples: torchrun would read --n as an abbreviation of its own --nnodes etc.
    jobs = [(models / "lmd", ["--steps", "1,3", "--num-samples", "250", "--batch-size", "40"],
             ["steps1", "steps3"]),
            (models / "unet", ["--steps", "2", "--num-samples", "30", "--batch-size", "8"],
             ["steps2"]),
            (models / "lmd", ["--steps", "2", "--num-samples", "1", "--batch-size", "1", "--seed",
                              "5"], ["steps2"])]
    for i, (run, args, labels) in enumerate(jobs):
        one_process("sample", run, *args, "--out", tmp_path / f"one{i}")
        two = ok(torchrun("sample", run, *args, "--out", tmp_path / f"two{i}"))
        assert two.stdout.count("wrote") == len(labels) + 1  # rank 0 alone writes (and says so)
        for label in labels:
            a = np.load(tmp_path / f"one{i}" / f"samples_{label}.npy")
            b = np.load(tmp_path / f"two{i}" / f"samples_{label}.npy")
            assert a.shape == b.shape and a.shape[0] == int(args[args.index("--num-samples") + 1])
            assert np.array_equal(a, b), (run.name, label)
        assert sorted(p.name for p in (tmp_path / f"two{i}").iterdir()) == sorted(
            [f"samples_{label}.npy" for label in labels] + ["samples.png"])
    # the samples are those of the model, not of one shard repeated: all 250 rows distinct
    x = np.load(tmp_path / "one0" / "samples_steps1.npy")
    assert len(np.unique(x.round(6), axis=0)) == 250


def test_sharded_evaluation_equals_unsharded(models, tmp_path):
    args = ["evaluate", models / "lmd", "--teacher", "exact", "--steps", "1,2", "--num-samples", "300",
            "eval.batch_size=70", "eval.w2_samples=200", "eval.energy_samples=200"]
    one_process(*args, "--out", tmp_path / "one")
    ok(torchrun(*args, "--out", tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["meta"]["processes"], two["meta"]["processes"]) == (1, 2)

    def numbers(rows):  # everything but the wall time
        return [{k: v for k, v in r.items() if k != "ms_per_10k"} for r in rows]

    assert numbers(one["rows"]) == numbers(two["rows"])
    assert any(r["sampler"] == "dopri5" for r in one["rows"]) and len(one["rows"]) >= 6
    assert all(r["map_error"] is not None for r in two["rows"])
    assert sorted(p.name for p in (tmp_path / "two" / "plots").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "plots").iterdir())


@pytest.mark.parametrize("argv, words", [
    (["sample", "RUN", "--n", "5", "--device", "cuda"], ["--device", "cuda", "no CUDA device"]),
    (["sample", "RUN", "--n", "5", "--device", "tpu"], ["--device", "'tpu'", "not a device"]),
    (["evaluate", "RUN", "--n", "5", "--device", "cuda:1"], ["--device", "cuda"]),
    (["evaluate", "RUN", "--n", "5", "train.device=cuda"], ["--device", "cuda"]),
    (["fid-stats", "--preset", "digits", "--device", "cuda"], ["--device", "cuda"]),
    (["fid-stats", "--preset", "digits", "train.device=cuda"], ["train.device", "cuda"]),
])
def test_an_unavailable_device_is_one_line_and_writes_nothing(models, tmp_path, capsys, monkeypatch,
                                                              argv, words):
    monkeypatch.chdir(tmp_path)
    argv = [str(models / "lmd") if a == "RUN" else a for a in argv] + ["--out", str(tmp_path / "o")]
    before = sorted(str(p) for p in models.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
    assert sorted(str(p) for p in models.rglob("*")) == before


def test_the_device_is_used(models, tmp_path, monkeypatch):
    """--device reaches the sampler: the base points and the map are on it when the map is called
    (the CPU is the only device of this machine, so the test watches the call)."""
    seen = []
    real = FlowMap.sample

    def spy(self, x0, *args, **kwargs):
        seen.append((x0.device.type, next(self.parameters()).device.type))
        return real(self, x0, *args, **kwargs)

    monkeypatch.setattr(FlowMap, "sample", spy)
    assert main(["sample", str(models / "lmd"), "--n", "20", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "s")]) == 0
    assert seen == [("cpu", "cpu")]
