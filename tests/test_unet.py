"""The image U-Net ``v_θ(x, s, t[, cond])`` (flowmaps.nets.unet).

What must hold: output shape equals input shape for 8×8, 28×28 (odd sizes after downsampling) and 32×32
images; the output is exactly zero at initialisation, so ``FlowMap(UNet(...))`` is the identity; once the
output layer is non-zero the output depends on ``s``, ``t`` and the label; forward-mode JVPs through the
whole network (GroupNorm, attention, upsampling, time embedding) agree with central finite differences in
float64, both with ``torch.func.jvp`` and through ``FlowMap.v_jvp``/``FlowMap.jvp``; parameter gradients
flow through the JVP tangent; the null label equals ``cond=None``; presets build (the full-size CIFAR-10
one is only counted); bad arguments raise one-line ValueErrors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp as func_jvp

from flowmaps import FlowMap
from flowmaps.nets.unet import UNET_PRESETS, UNet, unet_preset

F64 = torch.float64
EPS = 1e-6          # central finite-difference step (float64)
FD_RTOL = 1e-6      # relative error allowed between a JVP and its finite difference


def tiny(image_shape, **overrides) -> UNet:
    """A very small U-Net: 8 base channels, two levels (one block each), attention at the lowest level."""
    settings = dict(channels=8, channel_mults=(1, 2), blocks_per_level=1, heads=2)
    settings.update(overrides)
    if "attention_resolutions" not in settings:
        side = image_shape[1]
        for _ in settings["channel_mults"][1:]:
            side = (side + 1) // 2
        settings["attention_resolutions"] = (side,)
    return UNet(image_shape, **settings)


def perturb(net: UNet, seed: int = 0, everything: bool = True) -> UNet:
    """Give the zero-initialised output layer random weights, and (``everything``) jitter every parameter
    so that no tangent is trivially zero (e.g. GroupNorm affine parameters away from 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.startswith("conv_out"):
                p.copy_(0.2 * noise)
            elif everything:
                p.add_(0.05 * noise)
    return net


def inputs(image_shape, batch: int = 3, seed: int = 1, dtype=torch.float32):
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


# --- shapes and initialisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("image_shape, mults", [((1, 8, 8), (1, 2)), ((1, 28, 28), (1, 2, 2)),
                                                ((3, 32, 32), (1, 2, 2)), ((2, 7, 5), (1, 1, 2))])
def test_shape_zero_output_and_identity_at_init(image_shape, mults):
    torch.manual_seed(0)
    net = tiny(image_shape, channel_mults=mults)
    x, s, t, _ = inputs(image_shape, batch=2)
    out = net(x, s, t)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    flow = FlowMap(net)
    assert torch.equal(flow(x, s, t), x)
    assert torch.equal(flow(x, 0.0, 1.0), x)
    value, tangent = flow.jvp(x, s, t, dt=1.0)
    assert torch.equal(value, x) and torch.equal(tangent, torch.zeros_like(x))
    perturb(net)
    out = net(x, s, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 1e-3


def test_output_depends_on_s_t_and_label_after_output_layer_perturbation():
    torch.manual_seed(0)
    net = perturb(tiny((1, 8, 8), num_classes=3), everything=False)  # only the output conv moved
    x, s, t, _ = inputs((1, 8, 8))
    base = net(x, s, t, cond=torch.tensor([0, 1, 2]))
    assert base.abs().max() > 1e-3
    assert (net(x, s + 0.3, t, cond=torch.tensor([0, 1, 2])) - base).abs().max() > 1e-5
    assert (net(x, s, t + 0.3, cond=torch.tensor([0, 1, 2])) - base).abs().max() > 1e-5
    assert (net(x, s, t, cond=torch.tensor([1, 2, 0])) - base).abs().max() > 1e-5
    # (s, t − s) conditioning: moving s and t together changes only the s input.
    assert (net(x, s + 0.3, t + 0.3, cond=torch.tensor([0, 1, 2])) - base).abs().max() > 1e-5


def test_pre_post_scaling_with_sigma_data():
    """``out = σ_data · g(x / σ_data)``: two nets with the same weights and different σ_data agree."""
    torch.manual_seed(0)
    a = perturb(tiny((1, 8, 8), sigma_data=0.5))
    b = tiny((1, 8, 8), sigma_data=2.0)
    b.load_state_dict(a.state_dict())
    x, s, t, _ = inputs((1, 8, 8))
    torch.testing.assert_close(b(4.0 * x, s, t), 4.0 * a(x, s, t), rtol=1e-5, atol=1e-6)


# --- forward mode ------------------------------------------------------------------------------------------

def _fd_net(f, x, s, t, tangents, which):
    dx = tangents["x"] if "x" in which else torch.zeros_like(x)
    ds = tangents["s"] if "s" in which else torch.zeros_like(s)
    dt = tangents["t"] if "t" in which else torch.zeros_like(t)
    plus = f(x + EPS * dx, s + EPS * ds, t + EPS * dt)
    minus = f(x - EPS * dx, s - EPS * ds, t - EPS * dt)
    return (plus - minus) / (2 * EPS)


@pytest.fixture(scope="module")
def f64_case():
    """A float64 U-Net on odd-sized images (7×7 → 4×4: the upsampling path restores 7×7), with attention
    at 4×4 and in the middle, class conditioning, and every weight perturbed."""
    torch.manual_seed(3)
    net = perturb(tiny((2, 7, 7), num_classes=4, attention_resolutions=(7, 4),
                       time_scale=10.0).double(), seed=5)
    x, s, t, tangents = inputs((2, 7, 7), batch=3, dtype=F64)
    cond = torch.tensor([0, 3, 4])  # 4 is the null label
    return net, x, s, t, tangents, cond


@pytest.mark.parametrize("which", ["x", "s", "t", "xs", "st", "xst"])
def test_func_jvp_matches_finite_differences(f64_case, which):
    net, x, s, t, tangents, cond = f64_case
    names = [n for n in "xst" if n in which]
    primals = {"x": x, "s": s, "t": t}

    def f(*args):
        inp = dict(primals, **dict(zip(names, args)))
        return net(inp["x"], inp["s"], inp["t"], cond=cond)

    value, tangent = func_jvp(f, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))
    torch.testing.assert_close(value, net(x, s, t, cond=cond), rtol=1e-12, atol=1e-12)
    fd = _fd_net(lambda a, b, c: net(a, b, c, cond=cond), x, s, t, tangents, which)
    assert fd.norm() > 1e-3 * value.norm()  # not a trivial 0 = 0
    assert rel_err(tangent, fd) < FD_RTOL


@pytest.mark.parametrize("which", ["x", "s", "t", "xst"])
def test_flowmap_jvp_matches_finite_differences(f64_case, which):
    net, x, s, t, tangents, cond = f64_case
    flow = FlowMap(net)
    assert not hasattr(net, "forward_and_jvp")  # FlowMap goes through torch.func.jvp
    kw = {f"d{n}": tangents[n] for n in which}
    v, dv = flow.v_jvp(x, s, t, cond=cond, **kw)
    fd_v = _fd_net(lambda a, b, c: flow.v(a, b, c, cond=cond), x, s, t, tangents, which)
    assert rel_err(dv, fd_v) < FD_RTOL
    value, d_map = flow.jvp(x, s, t, cond=cond, **kw)
    torch.testing.assert_close(value, flow(x, s, t, cond=cond), rtol=1e-12, atol=1e-12)
    fd_map = _fd_net(lambda a, b, c: flow(a, b, c, cond=cond), x, s, t, tangents, which)
    assert rel_err(d_map, fd_map) < FD_RTOL


def test_gradients_flow_through_the_jvp_tangent():
    """Reverse-over-forward: ``loss = ‖∂_t X‖²`` gives finite, non-zero gradients to every parameter."""
    torch.manual_seed(0)
    net = perturb(tiny((1, 8, 8), num_classes=2))
    x, s, t, tangents = inputs((1, 8, 8))
    cond = torch.tensor([0, 1, 2])  # every class row, including the null label, is used
    _, tangent = FlowMap(net).jvp(x, s, t, dx=tangents["x"], dt=1.0, cond=cond)
    tangent.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# --- class conditioning ---------------------------------------------------------------------------------

def test_null_label_and_class_conditioning():
    torch.manual_seed(0)
    net = perturb(tiny((1, 8, 8), num_classes=10))
    assert net.null_label == 10
    x, s, t, _ = inputs((1, 8, 8))
    null = torch.full((3,), net.null_label, dtype=torch.long)
    torch.testing.assert_close(net(x, s, t), net(x, s, t, cond=null), rtol=0, atol=0)
    flow = FlowMap(net)
    torch.testing.assert_close(flow(x, s, t), flow(x, s, t, cond=null), rtol=0, atol=0)
    a = net(x, s, t, cond=torch.tensor([0, 0, 0]))
    b = net(x, s, t, cond=torch.tensor([5, 5, 5]))
    assert (a - b).abs().max() > 1e-4
    assert (a - net(x, s, t)).abs().max() > 1e-4
    # int32 labels work too
    torch.testing.assert_close(net(x, s, t, cond=torch.tensor([5, 5, 5], dtype=torch.int32)), b)


def test_time_embedding_stays_fp32_under_autocast():
    torch.manual_seed(0)
    net = perturb(tiny((1, 8, 8)))
    x, s, t, _ = inputs((1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net.embedding(s, t)
        out = net(x, s, t)
    assert emb.dtype == torch.float32
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    # and the bf16 forward is close to the fp32 one
    assert rel_err(out.float(), net(x, s, t)) < 0.1


def test_head_dim_option():
    net = tiny((1, 8, 8), heads=1, head_dim=4, channels=8, channel_mults=(1, 2))
    attn = [m for m in net.modules() if type(m).__name__ == "_Attention"]
    assert attn and all(m.heads == 16 // 4 for m in attn)
    perturb(net)
    x, s, t, _ = inputs((1, 8, 8))
    assert net(x, s, t).shape == x.shape


# --- presets -----------------------------------------------------------------------------------------------

def _forward_and_jvp(net: UNet, image_shape, num_classes: int = 0):
    perturb(net)
    x, s, t, tangents = inputs(image_shape, batch=2)
    cond = torch.tensor([0, num_classes]) if num_classes else None
    out = net(x, s, t, cond=cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    value, tangent = FlowMap(net).jvp(x, s, t, dx=tangents["x"], dt=1.0, cond=cond)
    assert tangent.shape == x.shape and torch.isfinite(tangent).all() and tangent.abs().max() > 0


def test_small_presets_build_and_run():
    digits = unet_preset("digits", (1, 8, 8))
    assert digits.parameter_count() <= 300_000
    assert digits.config["attention_resolutions"] == (4,)
    _forward_and_jvp(digits, (1, 8, 8))
    mnist = unet_preset("mnist", (1, 28, 28), num_classes=10)
    assert mnist.config["attention_resolutions"] == (7,)
    assert mnist.null_label == 10
    assert mnist.parameter_count() < 5_000_000
    x, s, t, _ = inputs((1, 28, 28), batch=2)
    assert mnist(x, s, t, cond=torch.tensor([3, 10])).shape == x.shape


@pytest.mark.parametrize("name, attention", [("cifar10", (16,)), ("imagenet32", (16, 8))])
def test_large_presets_at_reduced_width(name, attention):
    torch.manual_seed(0)
    net = unet_preset(name, (3, 32, 32), num_classes=10, channels=8)
    assert net.config["attention_resolutions"] == attention
    assert net.config["channel_mults"] == UNET_PRESETS[name]["channel_mults"]
    net.train()  # cifar10 has dropout 0.13: the JVP must work with dropout active
    _forward_and_jvp(net, (3, 32, 32), num_classes=10)


def test_full_size_cifar10_parameter_count():
    net = unet_preset("cifar10", (3, 32, 32))
    assert net.config["dropout"] == 0.13 and net.config["blocks_per_level"] == 4
    assert 20e6 < net.parameter_count() < 100e6
    assert net.parameter_count() == sum(p.numel() for p in net.parameters())
    # net.config rebuilds the same architecture (for checkpoints)
    rebuilt = UNet(**net.config)
    assert rebuilt.parameter_count() == net.parameter_count()
    rebuilt.load_state_dict(net.state_dict())


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown UNet preset 'celeba'"):
        unet_preset("celeba", (3, 64, 64))


# --- argument validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(image_shape=(8, 8)), "image_shape"),
    (dict(image_shape=(1, 0, 8)), "image_shape"),
    (dict(channels=0), "channels"),
    (dict(channel_mults=()), "channel_mults"),
    (dict(channel_mults=(1, 1.5)), "channel_mults"),
    (dict(blocks_per_level=0), "blocks_per_level"),
    (dict(attention_resolutions=(3,)), r"attention_resolutions \[3\].*\[8, 4\]"),
    (dict(heads=3), "heads 3 does not divide the attention width 16"),
    (dict(heads=0), "heads"),
    (dict(head_dim=5), "head_dim 5"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=-1), "num_classes"),
    (dict(sigma_data=0.0), "sigma_data"),
    (dict(time_scale=-1.0), "time_scale"),
    (dict(max_period=1.0), "max_period"),
    (dict(emb_channels=0), "emb_channels"),
])
def test_bad_arguments(kwargs, message):
    settings = dict(image_shape=(1, 8, 8), channels=8, channel_mults=(1, 2), blocks_per_level=1,
                    attention_resolutions=(4,))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        UNet(**settings)


def test_bad_call_arguments():
    net = tiny((1, 8, 8))
    conditional = tiny((1, 8, 8), num_classes=3)
    x, s, t, _ = inputs((1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 8, 8\)"):
        net(x[:, :, :4], s, t)
    with pytest.raises(ValueError, match="times"):
        net(x, s[:2], t)
    with pytest.raises(ValueError, match="num_classes=0"):
        net(x, s, t, cond=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        conditional(x, s, t, cond=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        conditional(x, s, t, cond=torch.tensor([[0], [1], [2]]))


def test_positional_embedding_frequencies():
    """Spec §5.2.2: sinusoidal positional embeddings with max_period 1e4 of the raw times."""
    net = tiny((1, 8, 8), channels=8)
    pe = net.pos_embedding
    assert pe.dim == 8
    torch.testing.assert_close(pe.frequencies, torch.tensor([1e4 ** (-k / 4) for k in range(4)]))
    tau = torch.tensor([0.0, 0.5])
    angles = tau[:, None] * pe.frequencies
    expected = torch.cat([angles.cos(), angles.sin()], dim=1)
    torch.testing.assert_close(pe(tau), expected)
    assert math.isclose(pe(torch.tensor([0.0]))[0, :4].sum().item(), 4.0)


def test_attention_does_not_use_fused_sdpa(monkeypatch):
    """The fused CPU ``scaled_dot_product_attention`` kernel has no forward-mode rule, so the attention
    blocks must not call it (whether PyTorch happens to pick the fused kernel depends on strides)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    net = perturb(tiny((1, 8, 8), attention_resolutions=(8, 4)))
    x, s, t, tangents = inputs((1, 8, 8))
    _, tangent = FlowMap(net).jvp(x, s, t, dx=tangents["x"], ds=tangents["s"])
    assert torch.isfinite(tangent).all() and tangent.abs().max() > 0
