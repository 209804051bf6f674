"""Self-distillation through the command line and the presets: `flowmaps train --objective lsd|...`, the
teacher as a velocity source under `distill`, per-objective preset blocks, one-line refusals of switch
combinations that make no sense, the learned weight and the training domain in the checkpoint, and the
CIFAR-10 LSD preset ([P2] Table 2) built and stepped at reduced width on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from flowmaps.checkpoint import load_checkpoint
from flowmaps.cli import main
from flowmaps.objectives import LSD, MeanFlow, Shortcut
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_interpolant, build_model, load_model
from flowmaps.runs.config import load_config
from flowmaps.train.trainer import Trainer

TINY = ["model.width=16", "model.depth=2", "train.batch_size=32", "data.n_train=500", "data.n_eval=100",
        "train.log_every=5", "train.checkpoint_every=10", "eval.n_samples=200", "--quiet"]


@pytest.mark.parametrize("objective", ["lsd", "esd", "psd", "meanflow", "imf", "alphaflow", "shortcut",
                                       "ct", "sct"])
def test_train_a_self_distilled_map_from_samples_alone(objective, tmp_path, capsys):
    run = tmp_path / objective
    steps = 20 if objective in ("sct", "alphaflow") else 12  # α-Flow's curriculum ends at train.steps
    assert main(["train", "--preset", "gmm", "--objective", objective, "--out", str(run),
                 f"train.steps={steps}", *TINY]) == 0
    # sCT trains the jumps to the data X(s,1) alone: its domain says so, and its samples of more than one
    # step are drawn with gamma = 1
    domain, gamma = ("data", ["--gamma", "1"]) if objective == "sct" else ("triangle", [])
    groups, meta = load_checkpoint(run / "checkpoints" / "final")
    assert meta["objective"] == objective and meta["domain"] == domain
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    terms = {k for r in records if "event" not in r for k in r}
    if objective not in ("ct", "sct"):  # CT and sCT have no diagonal term (eta = 0)
        assert "diagonal" in terms
    assert {"lagrangian", "eulerian", "progressive"} & terms
    # the gmm preset's block for this objective applied (eta 0.5), and is recorded in the run's config
    saved = load_config(None, run / "config.yaml")
    assert saved.objective.eta == (0.5 if objective not in ("ct", "sct") else None)
    if objective == "alphaflow":  # α logged from 1 down to 0, the window in the checkpoint
        alphas = [r["alpha"] for r in records if "event" not in r]
        assert alphas[0] == 1.0 and alphas[-1] == 0.0 and 0 < min(a for a in alphas if a > 0) < 1
        assert meta["trainer"]["objective"]["alpha_steps"] == [0, 20]
    assert main(["sample", str(run), "--n", "50", "--steps", "1,2", *gamma]) == 0
    loaded = load_model(run)
    assert loaded.model.domain == domain
    with pytest.raises(ValueError, match="forward jumps|jumps to the data"):
        loaded.model.inverse(torch.zeros(3, 2))


def test_the_learned_weight_is_saved_with_the_run(tmp_path):
    run = tmp_path / "lsd"
    assert main(["train", "--preset", "gmm", "--objective", "lsd", "--out", str(run), "train.steps=10",
                 "objective.weighting=learned", *TINY]) == 0
    groups, meta = load_checkpoint(run / "checkpoints" / "final")
    weights = {k: v for k, v in groups["objective"].items() if k.startswith("weight.")}
    assert set(weights) == {"weight.linear.weight", "weight.linear.bias"}
    assert weights["weight.linear.weight"].abs().max() > 0  # trained away from its zero start


def test_lmd_takes_a_diagonal_term_on_the_teacher_from_the_config(tmp_path):
    run = tmp_path / "lmd"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--objective", "lmd", "--out",
                 str(run), "train.steps=6", "objective.eta=0.25", "objective.diagonal=teacher",
                 *TINY]) == 0
    saved = load_config(None, run / "config.yaml")
    assert saved.objective.eta == 0.25 and saved.objective.diagonal == "teacher"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("diagonal" in r and r["diagonal"] > 0 for r in records if "event" not in r)


def test_distill_uses_the_teacher_as_the_velocity_source(tmp_path):
    run = tmp_path / "lsd"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--objective", "lsd", "--out",
                 str(run), "train.steps=6", *TINY]) == 0
    saved = load_config(None, run / "config.yaml")
    assert saved.objective.name == "lsd" and saved.objective.source == "teacher"


@pytest.mark.parametrize("args,message", [
    (["train", "--objective", "lsd", "objective.source=conditional"], "transported point"),
    (["train", "--objective", "meanflow", "objective.residual=progressive"], "source must be self or ema"),
    (["train", "--objective", "ct", "objective.stopgrad=source"], "unbiased"),
    (["train", "--objective", "lsd", "objective.eta=0"], "eta must be > 0"),
    (["train", "--objective", "lsd", "objective.eta=1.5"], "objective.eta"),
    (["train", "--objective", "lsd", "objective.weighting=tangent"], "form=v"),
    (["train", "--objective", "psd", "objective.distribution=dyadic", "objective.times=square"],
     "dyadic"),
    (["train", "--objective", "lsd", "objective.guidance=2"], "class-conditional"),
    (["train", "--objective", "lsd", "objective.source=teacher"], "flowmaps distill"),
    (["distill", "--teacher", "exact", "--objective", "lsd", "objective.source=self"],
     "flowmaps train"),
    (["train", "--objective", "lsd", "objective.weighting=heavy"], "objective.weighting"),
    (["train", "--objective", "lsd", "objective.diagonal=teacher"], "diagonal=teacher"),
    (["train", "--objective", "lsd", "objective.diagonal=exact"], "objective.diagonal"),
])
def test_switch_combinations_that_make_no_sense_are_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*args, "--preset", "gmm", "--out", str(out), "train.steps=2", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowmaps: error:") and message in err, err
    assert not out.exists()  # nothing written


def test_presets_hold_settings_per_objective(capsys):
    plain = load_config("checkerboard")
    lsd = load_config("checkerboard", None, ["objective.name=lsd"])
    assert plain.objective.eta is None and plain.train.steps == 4000
    assert lsd.objective.eta == 0.5 and lsd.train.steps == 20000 and lsd.train.lr == 0.002
    # overrides still win over the block
    assert load_config("checkerboard", None, ["objective.name=lsd", "objective.eta=0.25"]).objective.eta \
        == 0.25
    assert main(["presets", "--show", "checkerboard", "--objective", "psd"]) == 0
    shown = capsys.readouterr().out
    assert "distribution: gap" in shown and "name: psd" in shown
    for preset in ("checkerboard", "digits", "gmm"):
        for name in ("lsd", "esd", "psd", "meanflow", "imf", "alphaflow", "shortcut", "ct", "sct"):
            cfg = load_config(preset, None, [f"objective.name={name}"])
            assert cfg.objective.name == name


def test_cifar10_lsd_preset_is_p2_table2_and_steps_at_reduced_width():
    cfg = load_config("cifar10", None, ["objective.name=lsd", "model.channels=8", "train.device=cpu"])
    o, t, m = cfg.objective, cfg.train, cfg.model
    assert (o.eta, o.weighting, o.times, o.distribution, o.source) == (0.75, "learned", "triangle",
                                                                     "uniform", "self")
    assert (t.optimizer, t.lr, t.lr_decay_start, t.batch_size, t.steps, t.ema_decay, t.grad_clip) == (
        "radam", 0.01, 35000, 512, 400000, 0.9999, 1.0)
    assert (m.channel_mults, m.blocks_per_level, m.attention_resolutions, m.dropout) == (
        [2, 2, 2], 4, [16], 0.13)
    scales = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 3072, "shape": [3, 32, 32], "num_classes": 0}
    model = build_model(cfg, scales)
    objective = ex.build_objective(cfg, build_interpolant(cfg, scales))
    assert isinstance(objective, LSD) and objective.learned is not None
    data = torch.rand(8, 3, 32, 32) * 2 - 1
    trainer = Trainer(model, objective, data, batch_size=4, lr=t.lr, optimizer=t.optimizer,
                      grad_clip=t.grad_clip, lr_decay_start=t.lr_decay_start, ema_decay=t.ema_decay)
    before = objective.learned.linear.weight.detach().clone()
    for _ in range(2):
        out = trainer.step()
        assert torch.isfinite(out.loss) and {"diagonal", "lagrangian"} <= set(out.terms)
    assert not torch.equal(before, objective.learned.linear.weight)  # the weight head trains too
    with torch.no_grad():
        x = trainer.ema.sample(torch.randn(2, 3, 32, 32), steps=2)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_image_self_distillation_steps_on_the_unet_with_labels_and_guidance():
    cfg = load_config("digits", None, ["model.channels=8", "model.channel_mults=[1]",
                                       "model.attention_resolutions=[]", "model.class_conditional=true"])
    scales = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 64, "shape": [1, 8, 8], "num_classes": 10}
    data, labels = torch.rand(20, 1, 8, 8) * 2 - 1, torch.arange(20) % 10
    for objective in (LSD(build_interpolant(cfg, scales), guidance=2.0, null_label=10),
                      MeanFlow(build_interpolant(cfg, scales), guidance=1.5, null_label=10),
                      Shortcut(build_interpolant(cfg, scales))):
        model = build_model(cfg, scales)
        trainer = Trainer(model, objective, data, batch_size=8, labels=labels, label_dropout=0.2,
                          null_label=10)
        for _ in range(2):
            assert torch.isfinite(trainer.step().loss)
