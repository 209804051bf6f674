"""The two-time DiT ``v_θ(x, s, t[, cond])`` (flowmaps.nets.dit).

What must hold: output shape equals input shape for several patches and channel counts; the output is exactly
zero at initialisation, so ``FlowMap(DiT(...))`` is the identity; once perturbed the output depends on ``s``,
``t``, the label and the guidance condition (whose embedding starts at zero); forward-mode JVPs in the ``x``,
``s`` and ``t`` directions agree with central finite differences in float64 through ``torch.func.jvp``,
``torch.autograd.forward_ad``, ``FlowMap.v_jvp`` and ``FlowMap.jvp``; the fused SDPA kernel serves plain
passes and equals the math path, which serves forward mode; the finite-difference JVP option converges to
the exact JVP at second order and stays close in fp32; every objective steps through the config API and
the CLI; resume is bit-identical; export/load round-trips; bad arguments raise one-line errors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import jvp as func_jvp

import flowmaps as fm
from flowmaps import FlowMap
from flowmaps.checkpoint import load_checkpoint
from flowmaps.cli import main
from flowmaps.nets import dit as dit_module
from flowmaps.nets.dit import DIT_SIZES, DiT, forward_mode_active, parse_dit_size
from flowmaps.nets.guidance import guidance_condition
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_interpolant, build_model, save_model
from flowmaps.runs.config import ConfigError, load_config
from flowmaps.runs.validation import CHOICES
from flowmaps.train.trainer import Trainer

torch.set_num_threads(1)

F64 = torch.float64
EPS = 1e-6          # central finite-difference step of the reference (float64)
FD_RTOL = 1e-6      # relative error allowed between an exact JVP and that reference


def tiny(image_shape=(2, 8, 8), **overrides) -> DiT:
    settings = dict(patch=2, width=16, depth=2, heads=2, freq_dim=16)
    settings.update(overrides)
    return DiT(image_shape, **settings)


def perturb(net: DiT, seed: int = 0) -> DiT:
    """Give the zero-initialised layers (adaLN, output, guidance embedding) random weights and jitter every
    parameter, so that no tangent is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.add_(0.1 * noise)
    return net


def inputs(image_shape=(2, 8, 8), batch: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *image_shape, generator=g).to(dtype)
    s = torch.rand(batch, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    tangents = dict(x=torch.randn(batch, *image_shape, generator=g).to(dtype),
                    s=torch.randn(batch, generator=g).to(dtype),
                    t=torch.randn(batch, generator=g).to(dtype))
    return x, s, t, tangents


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# --- shapes, initialisation, conditioning -------------------------------------------------------------

@pytest.mark.parametrize("image_shape, patch", [((1, 8, 8), 2), ((4, 8, 8), 4), ((3, 12, 8), 4),
                                                ((4, 16, 16), 8)])
def test_shape_zero_output_and_identity_at_init(image_shape, patch):
    torch.manual_seed(0)
    net = tiny(image_shape, patch=patch)
    x, s, t, _ = inputs(image_shape, batch=2)
    out = net(x, s, t)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    flow = FlowMap(net)
    assert torch.equal(flow(x, s, t), x)
    assert torch.equal(flow.sample(x, steps=3), x)
    # ...and every output pixel is reachable: a non-zero output layer moves all of them
    perturb(net)
    assert (net(x, s, t).abs() > 0).all()


def test_patch_order_unpatchify_inverts_the_patch_layout():
    """The output token of patch (i, j) lands on the pixels of patch (i, j): with a final layer that copies
    each token's patch (identity on p·p·C) and a patch embedding that stores the pixels, the network
    reproduces its input up to the per-token affine normalisation."""
    net = tiny((2, 8, 12), patch=4, width=32, depth=1, heads=2)
    x = torch.randn(1, 2, 8, 12)
    tokens = net.patch_embed(x).flatten(2).transpose(1, 2)  # (1, N, W) in row-major patch order
    assert tokens.shape == (1, 2 * 3, 32)
    # Patch (row 1, col 2) is token 1*3 + 2 = 5; unpatchify must send token 5 back to rows 4:8, cols 8:12.
    h = torch.zeros(1, 6, 4 * 4 * 2)
    h[0, 5] = torch.arange(32.0) + 1
    image = net._unpatchify(h)
    assert image[0, :, 4:8, 8:12].abs().min() > 0 and image.abs().sum() == image[0, :, 4:8, 8:12].abs().sum()


def test_output_depends_on_s_t_and_label_and_null_label_is_none():
    torch.manual_seed(0)
    net = perturb(tiny(num_classes=3))
    x, s, t, _ = inputs()
    base = net(x, s, t, cond=torch.tensor([0, 1, 2]))
    assert (net(x, s, t + 0.3, cond=torch.tensor([0, 1, 2])) - base).abs().max() > 1e-4
    assert (net(x, s + 0.3, t + 0.3, cond=torch.tensor([0, 1, 2])) - base).abs().max() > 1e-4
    assert (net(x, s, t, cond=torch.tensor([1, 2, 0])) - base).abs().max() > 1e-4
    null = torch.full((3,), net.null_label)
    assert torch.equal(net(x, s, t), net(x, s, t, cond=null))


def test_guidance_condition_embedding_starts_at_zero_then_matters():
    torch.manual_seed(0)
    net = tiny(num_classes=3, guidance_conditioning=True)
    perturb(net)
    with torch.no_grad():
        net.emb_guidance.weight.zero_()
        net.emb_guidance.bias.zero_()
    x, s, t, _ = inputs()
    labels = torch.tensor([0, 1, 3])
    cond = guidance_condition(labels, scale=torch.tensor([1.0, 2.0, 5.0]), lo=0.1, hi=0.9)
    assert torch.equal(net(x, s, t, cond=cond), net(x, s, t, cond=labels))  # a new one equals the plain net
    with torch.no_grad():
        net.emb_guidance.weight.normal_(0, 0.1)
    other = guidance_condition(labels, scale=3.0, lo=0.1, hi=0.9)
    assert (net(x, s, t, cond=cond) - net(x, s, t, cond=other)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guidance_conditioning=True"):
        tiny(num_classes=3)(x, s, t, cond=cond)


def test_pre_post_scaling_with_sigma_data():
    torch.manual_seed(0)
    a = perturb(tiny(sigma_data=0.5))
    b = tiny(sigma_data=2.0)
    b.load_state_dict(a.state_dict())
    x, s, t, _ = inputs()
    torch.testing.assert_close(b(4.0 * x, s, t), 4.0 * a(x, s, t), rtol=1e-5, atol=1e-6)


def test_time_embedding_stays_fp32_under_bf16_autocast():
    net = perturb(tiny())
    x, s, t, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net.embedding(s, t)
        out = net(x, s, t)
    assert emb.dtype == torch.float32 and torch.isfinite(out).all()


# --- attention paths -------------------------------------------------------------------------------------

def test_fused_sdpa_serves_plain_passes_and_equals_the_math_path(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(dit_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    fused = perturb(tiny(depth=3, num_classes=2))
    math_net = tiny(depth=3, num_classes=2, attention="math")
    math_net.load_state_dict(fused.state_dict())
    x, s, t, tangents = inputs()
    cond = torch.tensor([0, 1, 2])
    a = fused(x, s, t, cond=cond)
    assert len(calls) == 3  # one fused call per block
    b = math_net(x, s, t, cond=cond)
    assert len(calls) == 3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # float64: the same to round-off
    torch.testing.assert_close(fused.double()(x.double(), s.double(), t.double(), cond=cond),
                               math_net.double()(x.double(), s.double(), t.double(), cond=cond),
                               rtol=1e-12, atol=1e-12)
    # Under forward mode the math path is taken (the fused CPU kernel has no forward-mode rule) ...
    calls.clear()
    func_jvp(lambda z: fused(z, s.double(), t.double()), (x.double(),), (tangents["x"].double(),))
    assert calls == []
    # ... and forcing the fused kernel there fails, which is why "auto" exists.
    forced = tiny(attention="sdpa")
    with pytest.raises(Exception, match="forward AD|forward-mode|not implemented|jvp"):
        func_jvp(lambda z: forced(z, s, t), (x,), (tangents["x"],))


def test_forward_mode_is_detected_from_the_tensors():
    x = torch.randn(3)
    assert not forward_mode_active(x)
    seen = []
    func_jvp(lambda z: seen.append(forward_mode_active(z)) or z * 2, (x,), (x,))
    with fwAD.dual_level():
        seen.append(forward_mode_active(x))
    assert seen == [True, True]
    assert not forward_mode_active(x)


# --- exact JVPs against finite differences (float64) ---------------------------------------------------------

def _fd(f, x, s, t, tangents, which):
    dx = tangents["x"] if "x" in which else torch.zeros_like(x)
    ds = tangents["s"] if "s" in which else torch.zeros_like(s)
    dt = tangents["t"] if "t" in which else torch.zeros_like(t)
    return (f(x + EPS * dx, s + EPS * ds, t + EPS * dt) - f(x - EPS * dx, s - EPS * ds, t - EPS * dt)) / (2 * EPS)


@pytest.fixture(scope="module")
def f64_case():
    """A float64 DiT with RMS QK-norm, class and guidance conditioning, every weight perturbed, times
    scaled by 10 so the time embedding is far from constant."""
    torch.manual_seed(3)
    net = perturb(tiny((2, 8, 8), num_classes=4, guidance_conditioning=True, time_scale=10.0).double(), 5)
    x, s, t, tangents = inputs((2, 8, 8), dtype=F64)
    cond = guidance_condition(torch.tensor([0, 3, 4]), scale=torch.tensor([1.0, 2.5, 4.0]), lo=0.2, hi=0.8,
                              dtype=F64)
    return net, x, s, t, tangents, cond


@pytest.mark.parametrize("which", ["x", "s", "t", "xst"])
def test_func_jvp_and_forward_ad_match_finite_differences(f64_case, which):
    net, x, s, t, tangents, cond = f64_case
    names = [n for n in "xst" if n in which]
    primals = {"x": x, "s": s, "t": t}

    def f(*args):
        inp = dict(primals, **dict(zip(names, args)))
        return net(inp["x"], inp["s"], inp["t"], cond=cond)

    value, tangent = func_jvp(f, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))
    torch.testing.assert_close(value, net(x, s, t, cond=cond), rtol=1e-12, atol=1e-12)
    fd = _fd(lambda a, b, c: net(a, b, c, cond=cond), x, s, t, tangents, which)
    assert fd.norm() > 1e-3 * value.norm()  # not a trivial 0 = 0
    assert rel_err(tangent, fd) < FD_RTOL
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(primals[n], tangents[n]) if n in names else primals[n] for n in "xst"}
        dual_tangent = fwAD.unpack_dual(net(duals["x"], duals["s"], duals["t"], cond=cond)).tangent
    torch.testing.assert_close(dual_tangent, tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("which", ["x", "s", "t", "xst"])
def test_flowmap_jvp_matches_finite_differences(f64_case, which, fused):
    net, x, s, t, tangents, cond = f64_case
    flow = FlowMap(net, fused_jvp=fused)  # fused: the DiT's forward_and_jvp; else FlowMap's torch.func
    kw = {f"d{n}": tangents[n] for n in which}
    v, dv = flow.v_jvp(x, s, t, cond=cond, **kw)
    assert rel_err(dv, _fd(lambda a, b, c: flow.v(a, b, c, cond=cond), x, s, t, tangents, which)) < FD_RTOL
    value, d_map = flow.jvp(x, s, t, cond=cond, **kw)
    torch.testing.assert_close(value, flow(x, s, t, cond=cond), rtol=1e-12, atol=1e-12)
    assert rel_err(d_map, _fd(lambda a, b, c: flow(a, b, c, cond=cond), x, s, t, tangents, which)) < FD_RTOL


def test_gradients_flow_through_the_jvp_tangent():
    """Reverse-over-forward: ``‖∂X·(dx, 0, 1)‖²`` gives finite, non-zero gradients to every parameter."""
    torch.manual_seed(0)
    net = perturb(tiny(num_classes=2, guidance_conditioning=True))
    x, s, t, tangents = inputs()
    cond = guidance_condition(torch.tensor([0, 1, 2]), scale=2.0)
    _, tangent = FlowMap(net).jvp(x, s, t, dx=tangents["x"], dt=1.0, cond=cond)
    tangent.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


# --- the finite-difference JVP option ------------------------------------------------------------------------

def test_fd_jvp_converges_at_second_order_to_the_exact_jvp(f64_case):
    """Central differences: error = h²/6 · v''' + O(h⁴), so halving h divides it by 4 (float64, h where
    truncation dominates round-off)."""
    net, x, s, t, tangents, cond = f64_case
    exact = FlowMap(net).v_jvp(x, s, t, dx=tangents["x"], ds=tangents["s"], dt=tangents["t"], cond=cond)[1]
    errors = []
    try:
        net.jvp = "fd"
        for eps in (4e-2, 2e-2, 1e-2):
            net.fd_eps = eps
            v, dv = FlowMap(net).v_jvp(x, s, t, dx=tangents["x"], ds=tangents["s"], dt=tangents["t"],
                                       cond=cond)
            torch.testing.assert_close(v, net(x, s, t, cond=cond), rtol=1e-12, atol=1e-12)
            errors.append(rel_err(dv, exact))
    finally:
        net.jvp, net.fd_eps = "exact", 3e-3
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0, errors
    assert errors[-1] < 1e-2


def test_fd_jvp_in_fp32_is_close_to_the_exact_jvp_and_passes_gradients():
    """fp32 with the default step: truncation ~h² and round-off ~ε₃₂/h (ε₃₂ ≈ 6e-8, h = 3e-3) both stay
    orders of magnitude under 1 %; the FD pass uses the fused attention."""
    torch.manual_seed(0)
    net = perturb(tiny(num_classes=3, jvp="fd"))
    ref = tiny(num_classes=3).double()
    ref.load_state_dict(net.state_dict())
    x, s, t, tangents = inputs()
    cond = torch.tensor([0, 1, 3])
    v, dv = FlowMap(net).v_jvp(x, s, t, dx=tangents["x"], ds=tangents["s"], dt=tangents["t"], cond=cond)
    _, exact = FlowMap(ref).v_jvp(x.double(), s.double(), t.double(), dx=tangents["x"].double(),
                                  ds=tangents["s"].double(), dt=tangents["t"].double(), cond=cond)
    assert rel_err(dv.double(), exact) < 1e-2
    # Tangent only in s (dx = None): the step scales with |ds|, the result is still the JVP.
    _, dv_s = FlowMap(net).v_jvp(x, s, t, ds=1.0, cond=cond)
    _, exact_s = FlowMap(ref).v_jvp(x.double(), s.double(), t.double(), ds=1.0, cond=cond)
    assert rel_err(dv_s.double(), exact_s) < 1e-2
    dv.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# --- sizes and bad input ----------------------------------------------------------------------------------

def test_named_sizes():
    assert DIT_SIZES == {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    assert parse_dit_size("B/2") == ("B", 2) and parse_dit_size("xl") == ("XL", None)
    net = DiT.from_size("B/4", (4, 32, 32), width=32, depth=2, heads=2)
    assert net.patch == 4 and len(net.blocks) == 2 and net.grid == (8, 8)
    # DiT-S/2 on 4×32×32 latents with 1000 classes: DiT's table lists 33.0M; ours has a second time
    # embedder (+0.25M) and a C-channel output instead of 2C (−6k).
    small = DiT.from_size("S/2", (4, 32, 32), num_classes=1000)
    assert abs(small.parameter_count() / 33.0e6 - 1) < 0.02
    with pytest.raises(ValueError, match="unknown DiT size"):
        parse_dit_size("M/2")


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_shape=(4, 30, 30), patch=4), "not divisible by the patch 4"),
    (dict(width=18, heads=4), "heads 4 does not divide the width 18"),
    (dict(width=18, heads=3), "multiple of 4"),
    (dict(qk_norm="batch"), "qk_norm"),
    (dict(attention="flash"), "attention"),
    (dict(jvp="reverse"), "jvp"),
    (dict(guidance_conditioning=True), "num_classes > 0"),
    (dict(fd_eps=0.0), "fd_eps"),
    (dict(image_shape=(4, 8)), "image_shape"),
])
def test_bad_arguments(kwargs, message):
    kwargs = dict(kwargs)
    shape = kwargs.pop("image_shape", (4, 8, 8))
    with pytest.raises(ValueError, match=message) as err:
        tiny(shape, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_call_arguments():
    net = tiny()
    x, s, t, _ = inputs()
    with pytest.raises(ValueError, match="expects inputs of shape"):
        net(x[:, :1], s, t)
    with pytest.raises(ValueError, match="times s and t"):
        net(x, s[:2], t)
    with pytest.raises(ValueError, match="num_classes=0"):
        net(x, s, t, cond=torch.tensor([0, 1, 2]))


# --- config, every objective, CLI --------------------------------------------------------------------------

DIT = ["model.name=dit", "model.dit_width=16", "model.dit_depth=1", "model.heads=2"]
DIGITS_SCALES = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 64, "shape": [1, 8, 8], "num_classes": 0}


def test_bad_config_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="not divisible by the patch 3") as err:
        build_model(load_config("digits", None, DIT + ["model.patch=3"]), DIGITS_SCALES)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="heads 3 does not divide the width 16"):
        build_model(load_config("digits", None, DIT + ["model.heads=3"]), DIGITS_SCALES)
    with pytest.raises(ConfigError, match="model.dit_size"):
        load_config("digits", None, DIT + ["model.dit_size=M"])
    with pytest.raises(ConfigError, match="no dropout"):
        load_config("digits", None, DIT + ["model.dropout=0.1"])
    with pytest.raises(ConfigError, match="needs image data"):
        cfg = load_config("gmm", None, ["model.name=dit"])
        ex.resolve_scales(cfg, ex.build_data(cfg))


def test_config_builds_the_named_size_with_overrides():
    cfg = load_config("digits", None, ["model.name=dit", "model.dit_size=S", "model.dit_depth=1",
                                       "model.qk_norm=layer", "model.jvp=fd", "model.fd_eps=0.01"])
    net = build_model(cfg, DIGITS_SCALES).net
    assert isinstance(net, DiT) and len(net.blocks) == 1 and net.blocks[0].attn.qkv.in_features == 384
    assert isinstance(net.blocks[0].attn.q_norm, torch.nn.LayerNorm) and net.jvp == "fd"
    assert net.fd_eps == 0.01 and net.patch == 2 and net.sigma_data == 0.5


@pytest.mark.parametrize("name", CHOICES["objective.name"])
def test_every_objective_steps_on_a_tiny_dit(name):
    overrides = DIT + [f"objective.name={name}", "objective.stage_steps=1", "model.class_conditional=true"]
    if name == "imf":
        overrides += ["model.guidance_conditioning=true", "objective.guidance_max=7"]
    cfg = load_config("digits", None, overrides)
    scales = dict(DIGITS_SCALES, num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg, scales)
    assert isinstance(model.net, DiT)
    teacher = None
    if ex.needs_teacher(cfg):
        teacher = perturb(build_model(cfg, scales)).requires_grad_(False)
    objective = ex.build_objective(cfg, build_interpolant(cfg, scales), teacher, num_classes=10)
    g = torch.Generator().manual_seed(0)
    data, labels = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10
    trainer = Trainer(model, objective, data, batch_size=8, lr=1e-3, grad_clip=1.0, labels=labels,
                      label_dropout=0.1, null_label=10, ema_decay=0.9)
    before = model.net.linear_out.weight.detach().clone()
    for _ in range(2):  # PFMM: the second step is stage 1, against a frozen snapshot
        out = trainer.step()
        assert out.skipped is None and torch.isfinite(out.loss), name
    assert not torch.equal(before, model.net.linear_out.weight)  # the zero-initialised output learned


TINY_CLI = DIT + ["train.batch_size=16", "train.log_every=2", "eval.n_samples=40", "eval.steps=1,2",
                  "--quiet"]


def test_cli_trains_distils_samples_and_exports_a_dit(tmp_path):
    runs = tmp_path / "runs"
    assert main(["train", "--preset", "digits", "--out", str(runs / "teacher"), "train.steps=3",
                 *TINY_CLI]) == 0
    for objective in ("lmd", "emd"):
        assert main(["distill", "--preset", "digits", "--teacher", str(runs / "teacher"), "--objective",
                     objective, "--out", str(runs / objective), "train.steps=2", *TINY_CLI]) == 0
    for objective in ("lsd", "meanflow"):
        assert main(["train", "--preset", "digits", "--objective", objective, "--out",
                     str(runs / objective), "train.steps=2", *TINY_CLI]) == 0
    groups, meta = load_checkpoint(runs / "lsd" / "checkpoints" / "final")
    assert any(k.startswith("net.blocks.0.attn") for k in groups["model"])
    assert main(["sample", str(runs / "lmd"), "--steps", "2", "--n", "6", "--out", str(tmp_path / "s")]) == 0
    x = np.load(tmp_path / "s" / "samples_steps2.npy", allow_pickle=False)
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    assert main(["export", str(runs / "meanflow"), str(tmp_path / "exported")]) == 0
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["network"]["class"] == "DiT" and config["network"]["options"]["width"] == 16
    loaded = fm.load(tmp_path / "exported")
    assert isinstance(loaded.net, DiT)


# --- export/load and resume ----------------------------------------------------------------------------------

def test_a_guidance_conditioned_dit_round_trips(tmp_path):
    torch.manual_seed(0)
    net = perturb(tiny((4, 8, 8), patch=4, num_classes=3, guidance_conditioning=True, qk_norm="layer",
                       sigma_data=1.0, jvp="fd", fd_eps=5e-3))
    model = FlowMap(net)
    model.interpolant, model.domain, model.sample_shape = fm.Linear(), "triangle", (4, 8, 8)
    model.save_pretrained(tmp_path / "d")
    again = FlowMap.from_pretrained(tmp_path / "d")
    assert isinstance(again.net, DiT) and again.num_classes == 3 and again.net.jvp == "fd"
    assert again.net.fd_eps == 5e-3 and again.domain == "triangle"
    x0 = torch.randn(4, 4, 8, 8)
    cond = guidance_condition(torch.tensor([0, 1, 2, 3]), scale=2.0)
    with torch.no_grad():
        assert torch.equal(model.sample(x0, steps=2, cond=cond), again.sample(x0, steps=2, cond=cond))


def _trainer(init_seed: int = 0, objective: str = "lsd") -> Trainer:
    cfg = load_config("digits", None, DIT + [f"objective.name={objective}"])
    torch.manual_seed(init_seed)
    model = build_model(cfg, DIGITS_SCALES)
    obj = ex.build_objective(cfg, build_interpolant(cfg, DIGITS_SCALES))
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    trainer = Trainer(model, obj, data, batch_size=8, lr=5e-3, grad_clip=1.0, ema_decay=0.9, seed=3,
                      lr_decay_start=3)
    trainer.saved_with = cfg
    return trainer


def _everything(trainer: Trainer) -> dict:
    tensors, _ = trainer.state_dict()
    return {f"{g}.{k}": v for g, state in tensors.items() if g != "rng" for k, v in state.items()}


@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_resume_through_disk_is_bit_identical(objective, tmp_path):
    straight = _trainer(objective=objective)
    straight.run(6, progress=False)
    first = _trainer(objective=objective)
    first.run(3, progress=False)
    save_model(tmp_path / "ckpt", first.model, first.ema, first.saved_with, DIGITS_SCALES, None,
                  first.step_count, trainer_state=first.state_dict())
    groups, saved = load_checkpoint(tmp_path / "ckpt")
    resumed = _trainer(init_seed=123, objective=objective)  # all weights must come from disk
    resumed.load_state_dict(groups, saved["trainer"])
    resumed.run(3, progress=False)
    a, b = _everything(resumed), _everything(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not math.isclose(float(a["model.net.linear_out.weight"].abs().sum()), 0.0)


# --- the imagenet256 presets (GPU settings, stepped here at reduced width) ------------------------------

LATENT_SCALES = {"sigma0": 1.0, "sigma_data": 1.0, "dim": 4096, "shape": [4, 32, 32], "num_classes": 1000}
REDUCED = ["model.dit_width=32", "model.dit_depth=2", "model.heads=2", "train.device=cpu"]


def full_size_parameters(cfg) -> int:
    """The preset's full network counted on the meta device (no memory, no values)."""
    with torch.device("meta"):
        return build_model(cfg, LATENT_SCALES).net.parameter_count()


@pytest.mark.parametrize("preset, size, millions", [("imagenet256", "B", 130), ("imagenet256_xl", "XL", 675)])
def test_imagenet256_presets_carry_the_papers_settings(preset, size, millions):
    base = load_config(preset)
    m, t = base.model, base.train
    assert (m.name, m.dit_size, m.patch, m.qk_norm, m.sigma_data, m.class_conditional) == (
        "dit", size, 2, "rms", 1.0, True)
    assert (t.optimizer, t.lr, t.betas, t.lr_schedule, t.batch_size, t.ema_decay, t.ema_warmup,
            t.label_dropout, t.weight_decay) == ("adam", 1e-4, [0.9, 0.95], "constant", 256, 0.9999, False,
                                                0.1, 0.0)
    assert base.data.name == "latents" and base.eval.steps == [1, 2]
    # DiT's table: B/2 130M, XL/2 675M parameters (ours: one more time embedder, C output channels)
    assert abs(full_size_parameters(base) / (millions * 1e6) - 1) < 0.02
    mf = load_config(preset, None, ["objective.name=meanflow"]).objective
    assert (mf.eta, mf.distribution, mf.time_mean, mf.time_std, mf.adaptive_p, mf.adaptive_eps, mf.guidance,
            mf.guidance_kappa) == (0.75, "logit_normal", 0.4, 1.0, 1.0, 0.01, 1.0, 0.5)
    imf = load_config(preset, None, ["objective.name=imf"])
    assert (imf.objective.eta, imf.objective.guidance_max, imf.model.guidance_conditioning) == (0.5, 7.0, True)
    assert (imf.train.batch_size, imf.train.steps, imf.train.warmup_steps) == (1024, 800000, 12500)
    lsd = load_config(preset, None, ["objective.name=lsd"]).objective
    assert (lsd.eta, lsd.weighting, lsd.times, lsd.distribution, lsd.source) == (
        0.75, "learned", "triangle", "uniform", "self")


@pytest.mark.parametrize("preset", ["imagenet256", "imagenet256_xl"])
@pytest.mark.parametrize("objective", ["meanflow", "imf", "lsd", "lmd"])
def test_imagenet256_presets_build_and_step_at_reduced_width(preset, objective):
    cfg = load_config(preset, None, [f"objective.name={objective}", *REDUCED])
    t = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg, LATENT_SCALES)
    assert isinstance(model.net, DiT) and model.net.grid == (16, 16)  # 32x32 latents, patch 2
    teacher = None
    if ex.needs_teacher(cfg):
        teacher_cfg = load_config(preset, None, REDUCED)
        teacher = perturb(build_model(teacher_cfg, LATENT_SCALES)).requires_grad_(False)
    objective_ = ex.build_objective(cfg, build_interpolant(cfg, LATENT_SCALES), teacher, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(4, 4, 32, 32, generator=g), torch.tensor([0, 999, 5, 17])
    trainer = Trainer(model, objective_, latents, batch_size=2, lr=t.lr, optimizer=t.optimizer,
                      betas=tuple(t.betas), grad_clip=t.grad_clip, lr_schedule=t.lr_schedule,
                      lr_decay_start=t.lr_decay_start, warmup_steps=t.warmup_steps, ema_decay=t.ema_decay,
                      ema_warmup=t.ema_warmup, labels=labels, label_dropout=t.label_dropout, null_label=1000)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    for _ in range(2):
        assert torch.isfinite(trainer.step().loss)
    with torch.no_grad():
        cond = torch.tensor([3, 1000])
        if cfg.model.guidance_conditioning:
            cond = guidance_condition(cond, scale=2.0, lo=0.35, hi=0.6)
        x = trainer.ema.sample(torch.randn(2, 4, 32, 32), steps=2, cond=cond)
    assert x.shape == (2, 4, 32, 32) and torch.isfinite(x).all()


def test_imagenet256_without_its_latents_folder_is_refused_in_one_line():
    from flowmaps.data.latents import LatentDataError

    with pytest.raises(LatentDataError, match="data.path imagenet256-latents: no such folder") as err:
        ex.build_data(load_config("imagenet256"))
    assert "\n" not in str(err.value)


def test_betas_reach_the_optimiser_and_bad_betas_are_refused():
    assert load_config("digits", None, ["train.betas=0.8,0.9"]).train.betas == [0.8, 0.9]
    with pytest.raises(ConfigError, match="train.betas"):
        load_config("digits", None, ["train.betas=0.9,1.0"])
    with pytest.raises(ConfigError, match="train.betas"):
        load_config("digits", None, ["train.betas=0.9"])
    model = FlowMap(tiny((1, 8, 8)))
    trainer = Trainer(model, fm.objectives.Velocity(fm.Linear()), torch.zeros(4, 1, 8, 8), batch_size=2,
                      betas=(0.5, 0.6))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.5, 0.6)
    with pytest.raises(ValueError, match="betas"):
        Trainer(model, fm.objectives.Velocity(fm.Linear()), torch.zeros(4, 1, 8, 8), betas=(0.9, 1.5))
