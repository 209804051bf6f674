"""Fault injection for training runs: exact resume after SIGKILL, checkpoint on SIGTERM, atomic and
rotated checkpoints, non-finite steps, and the precision/compile/accumulation options.

Exactness is bit-for-bit: a resumed run must end with the same weights, EMA and optimiser state as an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowmaps.checkpoint import load_checkpoint
from flowmaps.cli import main
from flowmaps.objectives.base import LossOutput
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_interpolant, build_model, save_model
from flowmaps.runs.config import load_config
from flowmaps.train.resume import CheckpointRotation, latest_checkpoint
from flowmaps.train.trainer import Trainer

EXE = Path(sys.executable).parent / "flowmaps"
TINY = ["model.width=16", "model.depth=2", "train.batch_size=64", "data.n_train=2000",
        "data.n_eval=300", "train.log_every=50", "teacher.exact=true", "objective.name=lmd",
        "eval.n_samples=300"]
LONG = TINY + ["train.steps=2500", "train.checkpoint_every=100", "train.keep_checkpoints=2"]


def flowmaps(*args, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(EXE), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.005)


def checkpoint_tensors(run: Path, stem: str = "final") -> dict[str, torch.Tensor]:
    groups, _ = load_checkpoint(run / "checkpoints" / stem)
    return {f"{g}.{k}": v for g in ("model", "ema", "optim") for k, v in groups[g].items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "event" not in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    result = flowmaps("distill", "--preset", "gmm", "--out", run, "--quiet", *LONG)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = flowmaps("distill", "--preset", "gmm", "--out", run, "--quiet", *LONG, wait=False)
    wait_for(run / "checkpoints" / "step-00000200.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "final.json").exists(), "the run ended before the kill"
    killed_at = latest_checkpoint(run / "checkpoints")[2]["step"]
    assert 200 <= killed_at < 2500
    resumed = flowmaps("distill", "--resume", "--out", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {killed_at}" in resumed.stderr
    assert_bit_identical(checkpoint_tensors(run), checkpoint_tensors(uninterrupted))
    # The metrics log has no duplicate records from steps run twice, and the same losses.
    assert losses(run) == losses(uninterrupted)
    # Rotation: only the newest 2 step checkpoints are kept (plus best and final).
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*.json"))
    assert names == ["step-00002300.json", "step-00002400.json"]


def test_sigterm_writes_a_checkpoint_exits_0_and_resumes_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = flowmaps("distill", "--preset", "gmm", "--out", run, "--quiet", *LONG, wait=False)
    wait_for(run / "checkpoints" / "step-00000100.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and f"--resume --out {run}" in err
    stem, _, meta = latest_checkpoint(run / "checkpoints")
    assert stem.name == f"step-{meta['step']:08d}" and 100 <= meta["step"] < 2500
    assert f"at step {meta['step']}" in err
    assert not (run / "checkpoints" / "final.json").exists()
    resumed = flowmaps("distill", "--resume", "--out", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bit_identical(checkpoint_tensors(run), checkpoint_tensors(uninterrupted))


# --- in-process exactness across every objective -------------------------------------------------

# Self-distillation cases carry state beyond the model: the learned loss weight (lsd, psd, sct), the EMA
# teacher (shortcut), the gap-annealing curriculum (lsd-anneal, which leaves flow matching at step 3),
# sCT's tangent warm-up (its step count) and α-Flow's curriculum (alphaflow: α = 1 to step 3, 0.5 at 5,
# 0 from 7; resumed at step 6, mid-way).
LEARNED = "objective.weighting=learned"  # the gmm preset's blocks use a constant weight
CASES = {"lsd": ["objective.name=lsd", LEARNED], "psd": ["objective.name=psd", LEARNED],
         "meanflow": ["objective.name=meanflow"], "shortcut": ["objective.name=shortcut"],
         "ct": ["objective.name=ct"], "imf": ["objective.name=imf"],
         "sct": ["objective.name=sct", "objective.tangent_warmup=8"],  # the warm-up spans the resume
         "alphaflow": ["objective.name=alphaflow", "objective.alpha_start=2", "objective.alpha_end=8",
                       "objective.weighting=adaptive"],
         "lsd-anneal": ["objective.name=lsd", "objective.fm_steps=3", "objective.anneal_steps=4",
                        LEARNED]}


def build(objective: str, init_seed: int = 0, **train):
    chosen = CASES.get(objective, [f"objective.name={objective}"])
    cfg = load_config("gmm", None, ["model.width=16", "model.depth=2", "data.n_train=1000",
                                    "data.n_eval=200", "teacher.exact=true", "objective.stage_steps=4",
                                    *chosen])
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    interpolant = build_interpolant(cfg, scales)
    ex.attach_reference(cfg, bundle, interpolant)
    teacher = ex.build_teacher(cfg, bundle, scales, "cpu") if ex.needs_teacher(cfg) else None
    torch.manual_seed(init_seed)
    model = build_model(cfg, scales)
    options = dict(batch_size=32, lr=5e-3, grad_clip=1.0, ema_decay=0.99, seed=3, lr_decay_start=3)
    options.update(train)
    trainer = Trainer(model, ex.build_objective(cfg, interpolant, teacher), bundle.train, **options)
    trainer.saved_with = (cfg, scales)
    return trainer


def save(trainer: Trainer, stem: Path) -> None:
    """A full training checkpoint, as the CLI writes it."""
    cfg, scales = trainer.saved_with
    save_model(stem, trainer.model, trainer.ema, cfg, scales, None, trainer.step_count,
                  trainer_state=trainer.state_dict())


def everything(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors, _ = trainer.state_dict()
    return {f"{g}.{k}": v for g, state in tensors.items() if g != "rng" for k, v in state.items()}


@pytest.mark.parametrize("objective", ["velocity", "lmd", "emd", "fmm", "pfmm", *CASES])
def test_state_dict_round_trip_through_disk_resumes_exactly(objective, tmp_path):
    straight = build(objective)
    straight.run(10, progress=False)

    first = build(objective)
    first.run(6, progress=False)  # PFMM: stage 1 began at step 4 with a frozen snapshot
    save(first, tmp_path / "ckpt")
    groups, saved = load_checkpoint(tmp_path / "ckpt")

    resumed = build(objective, init_seed=123)  # different initial weights: all must come from disk
    resumed.load_state_dict(groups, saved["trainer"])
    resumed.run(4, progress=False)
    assert resumed.step_count == straight.step_count == 10
    assert_bit_identical(everything(resumed), everything(straight))


def test_pfmm_resume_restores_the_frozen_teacher_not_a_copy_of_the_student(tmp_path):
    first = build("pfmm")
    first.run(6, progress=False)
    tensors, meta = first.state_dict()
    assert meta["objective"] == {"stage": 1, "frozen": True}
    resumed = build("pfmm", init_seed=7)
    resumed.load_state_dict(tensors, meta)
    frozen = resumed.objective.frozen.state_dict()
    student = resumed.model.state_dict()
    # the snapshot was taken at step 4, the student has moved on since
    assert any(not torch.equal(frozen[k], student[k]) for k in student)
    assert all(torch.equal(frozen[k], first.objective.frozen.state_dict()[k]) for k in frozen)


def test_self_distillation_state_travels_with_the_checkpoint(tmp_path):
    """The learned loss weight, the EMA teacher and the curriculum come back from disk (not from the
    new run's initial values), and the learned weight has moved away from its zero start."""
    first = build("lsd-anneal")
    first.run(6, progress=False)
    tensors, meta = first.state_dict()
    weights = {k: v for k, v in tensors["objective"].items() if k.startswith("weight.")}
    assert weights and any(v.abs().max() > 0 for v in weights.values())
    assert meta["objective"]["step"] == 5 and first.objective.times.max_gap() == 0.5
    resumed = build("lsd-anneal", init_seed=9)
    resumed.load_state_dict(tensors, meta)
    assert resumed.objective.times.max_gap() == 0.5
    for k, v in resumed.objective.learned.state_dict().items():
        assert torch.equal(v, weights[f"weight.{k}"])
    shortcut = build("shortcut")
    shortcut.run(5, progress=False)
    tensors, meta = shortcut.state_dict()
    again = build("shortcut", init_seed=4)
    again.load_state_dict(tensors, meta)
    for k, v in again.objective.source.ema.state_dict().items():
        assert torch.equal(v, shortcut.objective.source.ema.state_dict()[k])
    assert again.objective.source.ema_step == 4


def test_resume_with_another_world_size_is_refused():
    trainer = build("lmd")
    tensors, meta = trainer.state_dict()
    with pytest.raises(ValueError, match="2 process"):
        build("lmd").load_state_dict(tensors, dict(meta, world_size=2))


# --- atomic writes and rotation --------------------------------------------------------------------

def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer = build("lmd")
    trainer.run(2, progress=False)
    rotation = CheckpointRotation(tmp_path, keep=2)

    def write(stem, best):
        save(trainer, stem)

    rotation.save(trainer.step_count, write)
    trainer.run(2, progress=False)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        rotation.save(trainer.step_count, write)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002.json",
                                                          "step-00000002.safetensors"]
    stem, _, meta = latest_checkpoint(tmp_path)
    assert stem.name == "step-00000002" and meta["trainer"]["step"] == 2


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    trainer = build("lmd")
    rotation = CheckpointRotation(tmp_path, keep=3)

    def write(stem, best):
        save(trainer, stem)

    for _ in range(3):
        trainer.run(1, progress=False)
        rotation.save(trainer.step_count, write)
    newest = tmp_path / "step-00000003.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by something outside the library
    stem, _, meta = latest_checkpoint(tmp_path)
    assert stem.name == "step-00000002" and meta["trainer"]["step"] == 2
    assert "skipping unusable checkpoint" in capsys.readouterr().err


def test_best_checkpoint_follows_the_lowest_validation_loss(tmp_path):
    written = []
    rotation = CheckpointRotation(tmp_path, keep=1)
    for step, val in [(1, 3.0), (2, 2.0), (3, 2.5), (4, float("nan")), (5, 1.0)]:
        rotation.save(step, lambda stem, best: written.append((stem.name, best)), val)
    assert [name for name, _ in written] == ["step-00000001", "best", "step-00000002", "best",
                                             "step-00000003", "step-00000004", "step-00000005",
                                             "best"]
    assert rotation.best_loss == 1.0


# --- non-finite losses -----------------------------------------------------------------------------

class PoisonedObjective:
    """Wraps an objective; returns a NaN loss on the given call numbers."""

    def __init__(self, inner, bad_calls):
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, x1, cond=None, generator=None):
        out = self.inner(model, x1, cond, generator)
        self.calls += 1
        if self.calls in self.bad_calls:
            return LossOutput(out.loss * float("nan"), out.terms, out.stats)
        return out


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path):
    trainer = build("lmd", max_bad_steps=3)
    trainer.objective = PoisonedObjective(trainer.objective, bad_calls={3, 5, 6, 7})
    trainer.loss_fn._objective = (trainer.objective,)
    trainer.run(2, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out = trainer.step()  # call 3: NaN, update skipped
    assert out.skipped == "loss" and trainer.bad_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.step().skipped is None and trainer.bad_steps == 0  # call 4 fine: counter resets
    assert trainer.step().skipped == "loss" and trainer.step().skipped == "loss"
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        trainer.step()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_cli_stops_on_non_finite_steps_and_names_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    from flowmaps.objectives import lmd

    calls = {"n": 0}
    real = lmd.LMD.terms

    def poisoned(self, model, *args):
        calls["n"] += model.training  # training steps only (validation uses the EMA, in eval mode)
        terms = real(self, model, *args)
        if model.training and calls["n"] > 25:  # every step after 25 is non-finite
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(lmd.LMD, "terms", poisoned)
    run = tmp_path / "run"
    rc = main(["distill", "--preset", "gmm", "--out", str(run), "--quiet", *TINY, "train.steps=100",
               "train.checkpoint_every=10", "train.max_bad_steps=4", "train.log_every=5"])
    err = capsys.readouterr().err
    assert rc == 3
    message = [line for line in err.splitlines() if line.startswith("flowmaps: error:")]
    assert len(message) == 1 and "4 consecutive" in message[0]
    assert f"last good checkpoint is {run / 'checkpoints' / 'step-00000020'}" in message[0]
    assert err.count("non-finite loss, update skipped") == 4
    assert not (run / "checkpoints" / "final.json").exists()
    groups, meta = load_checkpoint(run / "checkpoints" / "step-00000020")
    assert all(torch.isfinite(v).all() for v in groups["model"].values())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in events if r.get("event") == "skipped"] == [26, 27, 28, 29]


# --- resume guards -----------------------------------------------------------------------------------

def test_resume_refuses_a_changed_config_and_needs_a_run(uninterrupted, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")}
    assert main(["distill", "--resume", "--out", str(uninterrupted), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lr" in err and "only train.steps" in err
    assert main(["distill", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["distill", "--resume", "--preset", "gmm", "--out", str(uninterrupted)]) == 2
    assert "drop --preset" in capsys.readouterr().err
    # A finished run: nothing to do, nothing touched.
    assert main(["distill", "--resume", "--out", str(uninterrupted), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")} == before


def test_an_existing_run_directory_suggests_resume(uninterrupted, capsys):
    assert main(["distill", "--preset", "gmm", "--out", str(uninterrupted), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


# --- precision, compile and accumulation options -------------------------------------------------------

def test_bf16_autocast_keeps_the_jvp_in_fp32():
    trainer = build("lmd", precision="bf16")
    model = trainer.model
    torch.nn.init.normal_(model.net.out.weight, std=0.5)  # a non-trivial map (zero-init is exact)
    x = torch.randn(64, 2)
    s, t = torch.rand(64) * 0.5, 0.5 + torch.rand(64) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, tangent = model.jvp(x, s, t, dt=1.0)
        plain = model.v(x, s, t)
        model.jvp_fp32 = False
        _, tangent_bf16 = model.jvp(x, s, t, dt=1.0)
        model.jvp_fp32 = True
    ref_value, ref_tangent = model.jvp(x, s, t, dt=1.0)  # no autocast
    assert (plain.float() - model.v(x, s, t)).abs().max() > 1e-4  # the forward did run in bf16
    assert tangent.dtype == torch.float32
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-6, atol=1e-6)
    assert (tangent_bf16.float() - ref_tangent).abs().max() > 1e-4  # what the fp32 JVP avoids
    for _ in range(3):
        out = trainer.step()
        assert out.skipped is None and torch.isfinite(out.loss)


def test_gradient_accumulation_averages_micro_batches():
    """grad_accum=2 on batch 32 equals averaging two losses of 16 samples drawn in sequence."""
    accumulated = build("fmm", grad_accum=2, batch_size=32, grad_clip=None, ema_decay=None)
    reference = build("fmm", batch_size=16, grad_clip=None, ema_decay=None)
    accumulated.step()  # leaves the accumulated gradient in .grad
    g = reference.generator
    total = 0.0
    for _ in range(2):
        total = total + reference.objective(reference.model, reference.draw(16), generator=g).loss
    (total / 2).backward()
    grads = [(a.grad, b.grad) for a, b in zip(accumulated.model.parameters(),
                                              reference.model.parameters())]
    assert any(a.abs().max() > 0 for a, _ in grads)
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ValueError, match="divide"):
        build("lmd", grad_accum=3, batch_size=32)


def test_compile_option_trains_like_eager():
    """train.compile: the compiled network (and fused JVP) gives the eager run's parameters, and it
    really went through torch.compile: dynamo captured graphs for the compiled run and none for the
    eager one. The backend is ``aot_eager`` (dynamo + AOTAutograd, no code generation), so the test
    needs no C++ toolchain and no particular CPU kernel path; inductor's numerics are the business of
    ``benchmarks/training_cost.py --compile``."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = build("lmd")
    compiled = build("lmd", compile=True, compile_backend="aot_eager")
    for _ in range(3):
        eager.step()
    assert counters["stats"]["unique_graphs"] == 0 and compiled.model.net.compiled_jvp
    assert compiled.model.net.compile_backend == "aot_eager"
    assert compiled.model.net._compiled_call_impl is not None  # nn.Module.compile() was applied
    assert eager.model.net._compiled_call_impl is None and not eager.model.net.compiled_jvp
    for _ in range(3):
        compiled.step()
    assert counters["stats"]["unique_graphs"] >= 1 and counters["stats"]["calls_captured"] > 0
    assert counters["frames"]["ok"] >= 1
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()  # checkpoints agree
    for a, b in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_backend_must_be_known():
    with pytest.raises(ValueError, match="compile_backend"):
        build("lmd", compile=True, compile_backend="tvm")
