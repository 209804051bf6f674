"""Options added by the quality-per-budget work: MLP residual connections and raw time inputs (fused
forward-mode pass equal to ``torch.func.jvp``), learning-rate schedules with warm-up, the EMA warm-up
switch, and their config keys."""

from __future__ import annotations

import math

import pytest
import torch

import flowmaps as fm
from flowmaps.runs.config import ConfigError, load_config
from flowmaps.train.schedules import learning_rate_schedule
from test_fused_jvp import F64, func_reference, make_inputs, pick, random_mlp


@pytest.mark.parametrize("options", [dict(skip=True), dict(n_frequencies=0),
                                     dict(skip=True, n_frequencies=2, max_frequency=1.0)],
                         ids=["skip", "raw-times", "skip-2freq"])
@pytest.mark.parametrize("which", ["x", "t", "xst"])
def test_mlp_options_fused_pass_equals_torch_func(options, which):
    torch.manual_seed(0)
    net = fm.MLP(2, width=24, depth=3, **options).double()
    with torch.no_grad():
        net.out.weight.normal_(std=0.5)
    x, s, t, tangents, _ = make_inputs()
    dx, ds, dt = pick(tangents, which)
    value, tangent = net.forward_and_jvp(x, s, t, dx, ds, dt, None)
    want_value, want_tangent = func_reference(net, x, s, t, dx, ds, dt, None)
    assert torch.equal(value, net(x, s, t))
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-12, atol=1e-12)
    # Reverse mode through the fused pass equals reverse-over-torch.func (parameter gradients).
    got = torch.autograd.grad((value**2).sum() + (tangent**2).sum(), list(net.parameters()))
    v2, t2 = func_reference(net, x, s, t, dx, ds, dt, None)
    want = torch.autograd.grad((v2**2).sum() + (t2**2).sum(), list(net.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_skip_connections_change_the_function_but_not_the_parameters():
    plain = random_mlp(4)
    skip = fm.MLP(2, width=32, depth=3, skip=True, n_frequencies=8).double()  # random_mlp's time features
    skip.load_state_dict(plain.state_dict())           # same keys and shapes
    x, s, t, _, _ = make_inputs()
    h = torch.cat([x, plain.time_features(s), plain.time_features(t - s)], 1)
    layers = list(plain.body)
    h = layers[1](layers[0](h))
    for lin, act in zip(layers[2::2], layers[3::2]):
        h = h + act(lin(h))
    torch.testing.assert_close(skip(x, s, t), plain.out(h), rtol=1e-14, atol=1e-14)
    assert not torch.allclose(skip(x, s, t), plain(x, s, t))


def test_raw_time_inputs_are_s_and_gap():
    net = fm.MLP(2, width=8, depth=1, n_frequencies=0)
    assert net.body[0].in_features == 2 + 2
    with pytest.raises(ValueError, match="n_frequencies"):
        fm.MLP(2, n_frequencies=-1)


@pytest.mark.parametrize("name,k,want", [
    ("constant", 50, 1.0), ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
    ("cosine", 150, 0.0), ("linear", 25, 0.75), ("linear", 100, 0.0), ("inverse_sqrt", 40, 1.0),
    ("inverse_sqrt", 80, math.sqrt(0.5))])
def test_learning_rate_schedules(name, k, want):
    f = learning_rate_schedule(name, decay_start=40, total=100)
    assert f(k) == pytest.approx(want, abs=1e-12)


def test_warmup_and_final_factor():
    f = learning_rate_schedule("cosine", warmup=10, total=100, final=0.1)
    assert f(0) == pytest.approx(0.1)            # (0 + 1)/10 of the full rate
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total"):
        learning_rate_schedule("cosine")
    with pytest.raises(ValueError, match="unknown"):
        learning_rate_schedule("step")


def test_trainer_follows_the_schedule_and_the_ema_switch():
    model = fm.FlowMap(fm.MLP(2, width=8, depth=1))
    from flowmaps.objectives import Velocity
    data = torch.randn(256, 2)
    tr = fm.Trainer(model, Velocity(fm.Linear()), data, batch_size=32, lr=1e-2, lr_schedule="linear",
                    total_steps=10, warmup_steps=2, ema_decay=0.9, ema_warmup=False)
    lrs = []
    for _ in range(4):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        tr.step()
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.9, 1e-2 * 0.8, 1e-2 * 0.7])
    # Without warm-up the first EMA update already uses the full decay.
    model2 = fm.FlowMap(fm.MLP(2, width=8, depth=1))
    tr2 = fm.Trainer(model2, Velocity(fm.Linear()), data, batch_size=32, ema_decay=0.9,
                     ema_warmup=False)
    before = [p.detach().clone() for p in tr2.ema.parameters()]
    tr2.step()
    for e, b, p in zip(tr2.ema.parameters(), before, model2.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_config_keys_of_the_new_options():
    cfg = load_config("gmm_hard", overrides=["model.skip=true", "model.n_frequencies=0",
                                             "train.lr_schedule=cosine", "train.warmup_steps=100",
                                             "train.ema_warmup=false", "train.lr_final=0.1"])
    assert cfg.model.skip and cfg.model.n_frequencies == 0 and cfg.train.lr_schedule == "cosine"
    for bad, match in [("train.lr_schedule=step", "lr_schedule"), ("train.warmup_steps=-1", "warmup"),
                       ("model.n_frequencies=-2", "n_frequencies"), ("train.lr_final=2", "lr_final")]:
        with pytest.raises(ConfigError, match=match):
            load_config("gmm_hard", overrides=[bad])
