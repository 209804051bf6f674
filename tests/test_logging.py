"""train.logger=tensorboard: TensorBoard event files beside metrics.jsonl, which stays the record; the
same numbers in both, a resumed run's events purged after its checkpoint, and a missing extra refused in
one line before anything is written."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowmaps.cli import main

torch.set_num_threads(1)

TINY = ["model.width=16", "model.depth=2", "data.n_train=500", "data.n_eval=100",
        "train.batch_size=32", "train.log_every=5", "train.checkpoint_every=10", "--quiet"]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_sink_holds_what_metrics_jsonl_holds(tmp_path):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(run),
                 "train.steps=20", "train.logger=tensorboard", *TINY]) == 0
    logged = records(run)  # metrics.jsonl is still written in full
    steps = [r for r in logged if "event" not in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    tb = scalars(run)
    assert {"train/loss", "train/lagrangian", "train/jvp_norm", "train/lr", "train/grad_norm",
            "validation/loss"} <= set(tb)
    for name in ("loss", "lagrangian", "grad_norm", "lr"):
        assert [s for s, _ in tb[f"train/{name}"]] == [5, 10, 15, 20]
        assert [v for _, v in tb[f"train/{name}"]] == pytest.approx([r[name] for r in steps],
                                                                    rel=1e-6)  # TB stores fp32
    checkpoints = [r for r in logged if r.get("event") == "checkpoint"]
    assert tb["validation/loss"] == [(10, pytest.approx(checkpoints[0]["validation_loss"], rel=1e-6))]


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    """The run reached step 20, but its newest checkpoint is step 10 (final is removed, as if it had
    been killed before writing it): the resumed run logs 15 and 20 again, and TensorBoard, like
    metrics.jsonl, keeps one value per step, the resumed run's."""
    run = tmp_path / "run"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(run),
                 "train.steps=20", "train.logger=tensorboard", *TINY]) == 0
    first = dict(scalars(run)["train/loss"])
    for suffix in (".json", ".safetensors"):
        (run / "checkpoints" / f"final{suffix}").unlink()
    assert main(["distill", "--resume", "--out", str(run), "train.lr=0.01", "--quiet"]) == 2  # guard
    assert main(["distill", "--resume", "--out", str(run), "--quiet"]) == 0
    tb = scalars(run)["train/loss"]
    assert [s for s, _ in tb] == [5, 10, 15, 20]  # 15 and 20 once each
    assert dict(tb) == pytest.approx(first, rel=1e-6)  # an exact resume: the same losses
    assert [r["step"] for r in records(run) if "event" not in r] == [5, 10, 15, 20]
    # jsonl to tensorboard on resume is allowed (a logging option), and starts after the checkpoint
    other = tmp_path / "other"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(other),
                 "train.steps=10", *TINY]) == 0
    assert not (other / "tensorboard").exists()
    assert main(["distill", "--resume", "--out", str(other), "train.steps=20",
                 "train.logger=tensorboard", "--quiet"]) == 0
    assert [s for s, _ in scalars(other)["train/loss"]] == [15, 20]


def test_a_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard` raises ImportError
    run = tmp_path / "run"
    rc = main(["train", "--preset", "gmm", "--out", str(run), "train.steps=5",
               "train.logger=tensorboard", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "flowmaps[tensorboard]" in err[0], err
    assert err[0].startswith("flowmaps: error: train.logger")
    assert not run.exists()
    # the default logger needs nothing
    assert main(["train", "--preset", "gmm", "--out", str(run), "train.steps=5", *TINY]) == 0
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
