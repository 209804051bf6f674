"""The training hot loop: multi-tensor optimiser and EMA updates, no host reads between log steps, and
the same results as the plain per-tensor loop.

Checked on the CPU (there is no GPU here): the fused optimiser with its device guard is the CUDA path,
and it runs on the CPU too, so the code that CUDA runs is the code tested. "Host reads" are counted by
instrumenting every Python-level way a tensor reaches the host (``item``, ``tolist``, ``bool``,
``float``, ``int``, ``numpy``, ``cpu``); on a GPU each would wait for the device.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from ddp_worker import gmm_problem, trained_parameters
from flowmaps.train.schedules import inverse_sqrt_schedule
from flowmaps.train.trainer import Trainer
from test_resume import PoisonedObjective

torch.set_num_threads(1)

OPTIONS = dict(batch_size=32, lr=5e-3, grad_clip=1.0, ema_decay=0.95, seed=3, lr_decay_start=4)


def parts(objective: str = "lmd"):
    return gmm_problem(["objective.stage_steps=3", f"objective.name={objective}"], n_train=500,
                       n_eval=100)


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def reference_loop(optimizer: str, steps: int, **options):
    """The step written out with torch's per-tensor optimiser (``foreach=False``) and a per-parameter
    EMA lerp: what the trainer did before it used multi-tensor kernels."""
    o = dict(OPTIONS, **options)
    model, objective, data = parts()
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optimizer]
    params = trained_parameters(model, objective)  # LMD's learned loss weight too
    opt = cls(params, lr=o["lr"], weight_decay=o.get("weight_decay", 0.0), foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_schedule(o["lr_decay_start"]))
    ema = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(o["seed"])
    g = torch.Generator().manual_seed(o["seed"])
    for k in range(steps):
        objective.begin_step(model, k)
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(data.shape[0], (o["batch_size"],), generator=g)
        objective(model, data[idx], generator=g).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
        opt.step()
        schedule.step()
        decay = min(o["ema_decay"], (1.0 + k) / (10.0 + k))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
    return model, ema


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_multi_tensor_step_equals_the_per_tensor_loop_bit_for_bit(optimizer):
    extra = {"weight_decay": 0.01} if optimizer == "adamw" else {}
    ref_model, ref_ema = reference_loop(optimizer, 12, **extra)
    model, objective, data = parts()
    trainer = Trainer(model, objective, data, optimizer=optimizer, **OPTIONS, **extra)
    assert trainer.optimizer.param_groups[0]["foreach"] is True and not trainer.device_guard
    trainer.run(12, progress=False, sync_every=5)
    assert torch.equal(flat(model), flat(ref_model)) and torch.equal(flat(trainer.ema), flat(ref_ema))
    assert not torch.equal(flat(model), flat(parts()[0]))  # it trained


def test_radam_multi_tensor_step_is_within_round_off():
    """torch's multi-tensor RAdam folds lr / bias correction / rectification into one step size per
    tensor and divides by sqrt(v) + eps, where its per-tensor loop multiplies the corrected moment by
    each factor in turn: the same arithmetic reassociated, so the last bits may differ."""
    ref_model, ref_ema = reference_loop("radam", 12)
    model, objective, data = parts()
    trainer = Trainer(model, objective, data, optimizer="radam", **OPTIONS)
    trainer.run(12, progress=False)
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat(trainer.ema), flat(ref_ema), rtol=1e-6, atol=1e-7)


def guarded(device_guard: bool, bad_calls=(), objective="lmd", **options):
    model, inner, data = parts(objective)
    trainer = Trainer(model, PoisonedObjective(inner, bad_calls), data, fused=True,
                      **dict(OPTIONS, max_bad_steps=3, **options))
    trainer.device_guard = device_guard  # the same fused kernel under either guard
    return trainer


def everything(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors, meta = trainer.state_dict()
    out = {f"{g}.{k}": v for g, state in tensors.items() if g != "rng" for k, v in state.items()}
    out["lr"] = torch.tensor(trainer.scheduler.get_last_lr())
    return out


@pytest.mark.parametrize("sync_every", [1, 4])
def test_device_guard_equals_host_guard_with_skipped_steps(sync_every):
    """Non-finite steps 3, 5 and 6 are skipped on the device (fused found_inf, EMA weight zeroed) and
    reported when the window is read: the same weights, EMA, optimiser state, schedule, logged steps
    and skipped steps as the host guard."""
    logs = {}
    trainers = {}
    for device_guard in (False, True):
        trainer = guarded(device_guard, bad_calls={3, 5, 6})
        seen = []
        history = trainer.run(10, progress=False, sync_every=sync_every,
                              callback=lambda step, out: seen.append((step, out.skipped)))
        logs[device_guard], trainers[device_guard] = (seen, history), trainer
    assert logs[True][0] == logs[False][0]
    assert [step for step, skipped in logs[True][0] if skipped] == [3, 5, 6]
    assert len(logs[True][1]) == 10
    torch.testing.assert_close(torch.tensor(logs[True][1]), torch.tensor(logs[False][1]), rtol=0,
                               atol=0, equal_nan=True)
    a, b = everything(trainers[False]), everything(trainers[True])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert trainers[True].bad_steps == trainers[False].bad_steps == 0
    # ...and the skipped steps really changed nothing: a run poisoned at step 3 only differs from a
    # clean run from step 3 on, by exactly the update of step 3
    clean = guarded(True)
    clean.run(2, progress=False)
    skipped = guarded(True, bad_calls={3})
    skipped.run(3, progress=False)
    assert torch.equal(flat(clean.model), flat(skipped.model))
    assert torch.equal(flat(clean.ema), flat(skipped.ema))


@pytest.mark.parametrize("device_guard", [False, True])
def test_consecutive_non_finite_steps_stop_under_either_guard(device_guard):
    trainer = guarded(device_guard, bad_calls={4, 5, 6, 7, 8, 9, 10, 11, 12})
    seen = []
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        trainer.run(20, progress=False, sync_every=1,
                    callback=lambda step, out: seen.append((step, out.skipped)))
    assert seen == [(1, None), (2, None), (3, None), (4, "loss"), (5, "loss"), (6, "loss")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class HostReads:
    """Counts every Python-level host read of a tensor while active."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self):
        self.count, self.where = 0, []

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, real in self.saved.items():
            def counted(tensor, *args, _real=real, _name=name, **kwargs):
                self.count += 1
                self.where.append((_name, sys._getframe(1).f_code.co_filename))
                return _real(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


@pytest.mark.parametrize("objective", ["lmd", "emd", "fmm", "pfmm", "velocity", "lsd", "psd",
                                       "meanflow", "shortcut"])
def test_device_guard_reads_the_host_once_per_window(objective):
    """12 steps read every 4: exactly three host reads (one per window), whatever the objective."""
    trainer = guarded(True, objective=objective)
    trainer.run(4, progress=False)  # first-call set-up (lazy buffers, schedules) is not the loop
    with HostReads() as reads:
        history = trainer.run(12, progress=False, sync_every=4)
    assert len(history) == 12 and all(isinstance(v, float) for v in history)
    assert reads.count == 3, reads.where


def test_host_guard_reads_one_flag_per_step():
    """Without a fused optimiser (radam, or foreach on the CPU) the update is skipped on the host:
    one read per step (free on the CPU, where the flag is already in host memory), plus the window."""
    model, objective, data = parts()
    trainer = Trainer(model, objective, data, **OPTIONS)
    trainer.run(4, progress=False)
    with HostReads() as reads:
        trainer.run(12, progress=False, sync_every=4)
    ours = [name for name, where in reads.where if "torch/optim/" not in where]
    assert ours == ["tolist"] * 15, reads.where
    # the rest: torch's non-fused Adam reads its step counters, which it keeps in host memory (also
    # when the weights are on a GPU), so they wait for nothing
    assert {name for name, where in reads.where if "torch/optim/" in where} == {"item"}


def test_training_run_reads_at_log_and_checkpoint_steps(tmp_path):
    """Through the CLI: metrics.jsonl and checkpoints are unchanged by reading every log_every steps
    (a checkpoint step that is not a log step is a read too)."""
    from flowmaps.cli import main
    import json

    run = tmp_path / "run"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(run), "--quiet",
                 "model.width=16", "model.depth=2", "data.n_train=500", "data.n_eval=100",
                 "train.batch_size=32", "train.steps=14", "train.log_every=4",
                 "train.checkpoint_every=6"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [4, 8, 12, 14]
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [6, 12]
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in records
               if "event" not in r)


def test_device_guard_reads_the_host_once_per_window_on_labelled_images():
    """The image path: class labels with label dropout and flip augmentation drawn on the device."""
    from flowmaps import Linear
    from flowmaps.data.images import random_hflip
    from flowmaps.objectives import LSD
    from test_images import images, tiny_unet

    data = images(48)
    trainer = Trainer(tiny_unet(num_classes=3), LSD(Linear()), data, batch_size=8, lr=1e-3,
                      ema_decay=0.9, labels=torch.arange(48) % 3, label_dropout=0.2, null_label=3,
                      augment=random_hflip, fused=True)
    trainer.run(2, progress=False, sync_every=2)
    with HostReads() as reads:
        trainer.run(4, progress=False, sync_every=2)
    assert reads.count == 2, reads.where


@pytest.mark.parametrize("objective", ["lmd", "emd", "fmm", "pfmm", "velocity", "lsd", "psd",
                                       "meanflow", "shortcut"])
def test_a_device_guard_step_makes_no_host_sync_at_the_dispatcher(objective):
    """Below the Python level too (every ATen operation, torch's own kernels' argument parsing
    included; flowmaps.train.host_syncs): a step between log steps makes no host sync. The EMA's
    0-dim weight tensor used to be read back by ``_foreach_lerp_`` (its Scalar overload) every step."""
    from flowmaps.train.host_syncs import HostSyncs

    trainer = guarded(True, objective=objective)
    trainer.run(2, progress=False)
    with HostSyncs("cpu") as syncs:
        outs = [trainer.step() for _ in range(3)]
    assert syncs.count == 0, syncs.sites
    with HostSyncs("cpu") as syncs:  # the window's read, where the caller logs: one transfer
        trainer.settle([(trainer.step_count, out) for out in outs])
    assert syncs.count == 1, syncs.sites


def test_a_device_guard_step_on_labelled_images_makes_no_host_sync():
    from flowmaps import Linear
    from flowmaps.data.images import random_hflip
    from flowmaps.objectives import ImprovedMeanFlow
    from flowmaps.train.host_syncs import HostSyncs
    from test_images import images, tiny_unet

    model = tiny_unet(num_classes=3)
    model.net = type(model.net)((1, 8, 8), channels=8, channel_mults=(1, 2), blocks_per_level=1,
                                attention_resolutions=(4,), num_classes=3, guidance_conditioning=True)
    trainer = Trainer(model, ImprovedMeanFlow(Linear(), guidance_max=7.0, null_label=3), images(48),
                      batch_size=8, lr=1e-3, ema_decay=0.9, labels=torch.arange(48) % 3,
                      label_dropout=0.2, null_label=3, augment=random_hflip, fused=True)
    trainer.run(2, progress=False)
    with HostSyncs("cpu") as syncs:
        trainer.step()
    assert syncs.count == 0, syncs.sites


def test_the_host_guard_step_is_seen_reading_the_host():
    """The counter fails when it should: the CPU's host guard reads its flag (``tolist``) and torch's
    non-fused Adam its step counters (``item``)."""
    from flowmaps.train.host_syncs import HostSyncs

    model, objective, data = parts()
    trainer = Trainer(model, objective, data, **OPTIONS)
    trainer.run(2, progress=False)
    with HostSyncs("cpu") as syncs:
        trainer.step()
    assert syncs.ops["Tensor.tolist"] == 1 and syncs.ops["aten._local_scalar_dense"] >= 1, syncs.sites
    assert any("trainer.py" in site for site in syncs.sites), syncs.sites
