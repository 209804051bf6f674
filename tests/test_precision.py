"""Precision on every path (issue 18 part 3, spec addition E.12, :mod:`flowmaps.precision`): bf16 autocast
against fp32 for every objective on a tiny MLP map and for a tiny DiT, from the same weights, batch and
generator; JVPs in full fp32; an exact teacher unaffected; LSD's fused pass split under bf16; the TF32
switch and its flags; the VAE's decode under bf16.

The tolerances are bounds derived from bf16's precision, not fitted to the measurements. bf16 keeps 8
significant bits: one rounding errs by at most ``2^-9`` relative. An autocast matmul or convolution rounds
its operands and its result, so we charge each such op ``U = 2^-8`` relative, and let these errors add
along the longest chain of ``N`` ops from the inputs to a loss term (first order, layers of gain about 1):
the bf16 value errs by at most ``N·U`` relative. The loss squares residuals formed from such a value and
fp32 terms of the same size (random weights, far from the fixed point: no cancellation), so the relative
loss difference is at most ``2·N·U``. The backward pass rounds again (the incoming gradients and the
saved bf16 activations), so the gradient's relative error is at most ``4·N·U``, and the cosine between
the two gradients at least ``1 − (4·N·U)²/2``. The measured differences are far below the bounds (the
roundings are random and partly cancel); the bounds catch a wrong precision (fp16 overflow, a bf16 time,
a loss formed in bf16), and the other checks are exact: bf16 must change the gradient (autocast ran),
and every JVP must be fp32 and equal, bit for bit, to the same JVP computed without autocast.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowmaps as fm
from flowmaps import objectives as O
from flowmaps.exact import GaussianMixture
from flowmaps.flowmap import FlowMap
from flowmaps.nets import DiT
from flowmaps.precision import full_fp32, reduced_precision, tf32_flags, tf32_scope
from flowmaps.runs.config import ConfigError, dump_config, load_config, to_dict
from flowmaps.runs.validation import CHOICES

torch.set_num_threads(1)

U = 2.0 ** -8  # what one autocast op may cost, relative (its operands and its result rounded to bf16)
# Tiny MLP student: 3 hidden layers + the output layer = 4 linear layers; its teacher has 3. The longest
# chain is two passes in sequence (a semigroup target: v_{s,u}, then v_{u,t} at X_{s,u}): N = 8.
N_MLP = 8
# Tiny DiT (depth 2): patch embedding, per block qkv → q·kᵀ → softmax·v → proj → MLP (2 linears), the
# output layer: 1 + 6·2 + 1 = 14 ops in one pass; each objective below chains one pass into a term.
N_DIT = 14

interp = fm.Linear()


def loss_bound(n: int) -> float:
    return 2 * n * U


def grad_bound(n: int) -> float:
    return 4 * n * U


def randomise(model: torch.nn.Module, seed: int, bias: float = 0.1) -> torch.nn.Module:
    """Weights of unit gain (std 1/√fan-in) and small biases: the zero-initialised output layers would
    make the map the identity, whose value bf16 cannot change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(fan) if p.ndim > 1 else bias))
    return model


def mlp_map(seed: int = 0, depth: int = 3) -> FlowMap:
    return randomise(FlowMap(fm.MLP(2, width=32, depth=depth)), seed)


MLP_TEACHER = randomise(FlowMap(fm.MLP(2, width=32, depth=2)), 123).eval().requires_grad_(False)


def mlp_teacher(x, t):
    return MLP_TEACHER.velocity(x, t)


# Every objective of the config (objective.name), built with its defaults; the distillations use a
# network teacher, so that the teacher's forward autocasts too.
OBJECTIVES = {
    "velocity": lambda: O.Velocity(interp), "fmm": lambda: O.FMM(interp),
    "lmd": lambda: O.LMD(interp, mlp_teacher), "emd": lambda: O.EMD(interp, mlp_teacher),
    "pfmm": lambda: O.PFMM(interp, mlp_teacher), "lsd": lambda: O.LSD(interp),
    "esd": lambda: O.ESD(interp), "psd": lambda: O.PSD(interp), "meanflow": lambda: O.MeanFlow(interp),
    "shortcut": lambda: O.Shortcut(interp), "ct": lambda: O.CT(interp),
    "imf": lambda: O.ImprovedMeanFlow(interp), "alphaflow": lambda: O.AlphaFlow(interp, alpha_steps=(0, 10)),
    "sct": lambda: O.SCT(interp),
}
# Their whole loss is one JVP pass with the conditional velocity (no plain pass), or (PFMM) a residual
# kept in full fp32 on purpose: bf16 changes nothing.
NO_PLAIN_PASS = {"ct", "sct", "pfmm"}
WITH_JVP = {"fmm", "lmd", "emd", "lsd", "esd", "meanflow", "ct", "imf", "sct"}


def test_the_cases_are_every_objective():
    assert set(OBJECTIVES) == set(CHOICES["objective.name"])


class JVPRecorder:
    """Records every call of the map's ``v_jvp``/``v_jvps`` (and what they returned)."""

    def __init__(self, model: FlowMap):
        self.calls = []
        for name in ("v_jvp", "v_jvps"):
            bound = getattr(FlowMap, name).__get__(model)
            setattr(model, name, self._spy(name, bound))

    def _spy(self, name, bound):
        def spy(*args, **kwargs):
            out = bound(*args, **kwargs)
            self.calls.append((bound, args, kwargs, out, reduced_precision("cpu")))
            return out
        return spy

    def check(self, bf16: bool) -> None:
        """Each tangent is fp32 and equals, bit for bit, the same call made without autocast; with
        ``bf16``, calls made under the autocast (the outer ones) must be among them."""
        assert any(autocast for *_, autocast in self.calls) == bf16
        for bound, args, kwargs, (value, tangents), _ in self.calls:
            tangents = tangents if isinstance(tangents, list) else [tangents]
            assert all(d.dtype == torch.float32 for d in tangents)
            _, again = bound(*args, **kwargs)  # in grad mode, as the step (same kernels)
            again = again if isinstance(again, list) else [again]
            assert all(torch.equal(a, b) for a, b in zip(tangents, again))


def loss_and_grad(model, objective, x1, bf16: bool, cond=None):
    """The objective's loss and the gradient of every trained parameter (model and objective), on a
    fixed batch with a fixed generator, under bf16 autocast or not."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = objective(model, x1, cond, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    params = [*model.parameters(), *(p for m in objective.trainable_modules() for p in m.parameters())]
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    return out, grad


def compare(make_model, make_objective, x1, n_ops: int, plain_pass: bool = True, jvp: bool = True):
    runs = []
    for bf16 in (False, True):
        model, objective = make_model(), make_objective()
        objective.begin_step(model, 5)
        recorder = JVPRecorder(model)
        out, grad = loss_and_grad(model, objective, x1, bf16)
        runs.append((out, grad))
        assert out.loss.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in out.terms.values())
        if jvp:
            recorder.check(bf16)
        else:
            assert not recorder.calls
    (a, ga), (b, gb) = runs
    if not plain_pass:
        assert a.loss.item() == b.loss.item() and torch.equal(ga, gb)
        return
    assert not torch.equal(ga, gb)  # the autocast did run
    loss_error = abs(b.loss.item() - a.loss.item()) / abs(a.loss.item())
    grad_error = float((gb - ga).norm() / ga.norm())
    cosine = float(torch.nn.functional.cosine_similarity(ga, gb, dim=0))
    assert loss_error <= loss_bound(n_ops), loss_error
    assert grad_error <= grad_bound(n_ops), grad_error
    assert cosine >= 1 - grad_bound(n_ops) ** 2 / 2, cosine


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_in_bf16_is_fp32_within_the_bf16_bound(name):
    x1 = 1.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    compare(mlp_map, OBJECTIVES[name], x1, N_MLP, plain_pass=name not in NO_PLAIN_PASS,
            jvp=name in WITH_JVP)


def tiny_dit_map(seed: int, **options) -> FlowMap:
    net = DiT((2, 8, 8), patch=2, width=32, depth=2, heads=2, freq_dim=32, **options)
    return randomise(FlowMap(net), seed, bias=0.05)


DIT_TEACHER = tiny_dit_map(123).eval().requires_grad_(False)
DIT_CASES = {
    "lmd": (lambda: O.LMD(interp, lambda x, t: DIT_TEACHER.velocity(x, t)), {}),
    "lsd": (lambda: O.LSD(interp), {}),
    "lsd-fd": (lambda: O.LSD(interp), {"jvp": "fd"}),
    "meanflow": (lambda: O.MeanFlow(interp), {}),
}


@pytest.mark.parametrize("case", list(DIT_CASES))
def test_the_dit_in_bf16_is_fp32_within_the_bf16_bound(case):
    """The DiT's plain passes autocast (fused attention in bf16), its JVPs (exact and finite-difference)
    run in fp32."""
    make_objective, options = DIT_CASES[case]
    x1 = 0.5 * torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    compare(lambda: tiny_dit_map(0, **options), make_objective, x1, N_DIT)


def test_lsd_splits_its_fused_pass_under_bf16():
    """fp32: the diagonal and the Lagrangian JVP share one pass (``offset``); bf16: the diagonal is a plain
    pass under the autocast, the JVP a pass of its own in fp32."""
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for bf16 in (False, True):
        model = mlp_map()
        net = model.net
        calls = {"fused_offsets": [], "plain_under_autocast": 0}
        fused, forward = net.forward_and_jvps, net.forward

        def spy_fused(*args, offset=0, **kwargs):
            calls["fused_offsets"].append(offset)
            return fused(*args, offset=offset, **kwargs)

        def spy_forward(*args, **kwargs):
            calls["plain_under_autocast"] += torch.is_autocast_enabled("cpu")
            return forward(*args, **kwargs)

        net.forward_and_jvps, net.forward = spy_fused, spy_forward
        objective = O.LSD(interp)
        loss_and_grad(model, objective, x1, bf16)
        if bf16:
            assert calls == {"fused_offsets": [0], "plain_under_autocast": 2}  # diagonal and target
        else:
            n_diagonal = objective.times.n_diagonal(64)
            assert calls["fused_offsets"] == [n_diagonal] and calls["plain_under_autocast"] == 0


def test_an_exact_teacher_stays_exact_under_autocast():
    gmm = GaussianMixture([[2.0, 0.0], [-1.0, 1.5]], stds=[0.3, 0.2])
    x, t = torch.randn(32, 2), torch.rand(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gmm.velocity(x, t)
    assert inside.dtype == torch.float32 and torch.equal(inside, gmm.velocity(x, t))


# --------------------------------------------------------------------------------------------- TF32

def test_tf32_scope_sets_the_cuda_flags_and_restores_them():
    before = tf32_flags()
    try:
        for start in ((False, False), (True, True), (False, True)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = start
            for enabled in (True, False):
                with tf32_scope(enabled, "cuda"):
                    assert tf32_flags() == (enabled, enabled)
                    assert reduced_precision("cuda") == enabled
                    with full_fp32("cuda"):  # a JVP's scope: TF32 and autocast off
                        assert tf32_flags() == (False, False) and not reduced_precision("cuda")
                    assert tf32_flags() == (enabled, enabled)
                assert tf32_flags() == start
                with pytest.raises(KeyError), tf32_scope(enabled, "cuda"):
                    raise KeyError("restored on an exception too")
                assert tf32_flags() == start
                with tf32_scope(enabled, "cpu"):  # no effect on the CPU
                    assert tf32_flags() == start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_trainer_scopes_each_step_and_tf32_changes_nothing_on_the_cpu(monkeypatch):
    import flowmaps.train.trainer as trainer_module

    scopes = []
    original = trainer_module.tf32_scope
    monkeypatch.setattr(trainer_module, "tf32_scope",
                        lambda enabled, device: scopes.append((enabled, device)) or original(enabled, device))
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    weights, losses = [], []
    before = tf32_flags()
    for tf32 in (False, True):
        model = mlp_map()
        trainer = fm.Trainer(model, O.LMD(interp, mlp_teacher), data, batch_size=32, seed=1, tf32=tf32)
        losses.append(trainer.run(3, progress=False))
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert tf32_flags() == before
    assert scopes == [(False, "cpu")] * 3 + [(True, "cpu")] * 3
    assert losses[0] == losses[1] and torch.equal(*weights)
    with pytest.raises(ValueError, match="tf32 must be True or False"):
        fm.Trainer(mlp_map(), O.Velocity(interp), data, tf32="maybe")


def test_train_tf32_in_the_config(tmp_path):
    cfg = load_config("gmm", overrides=["train.tf32=true"])
    assert cfg.train.tf32 is True and load_config("gmm").train.tf32 is False
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert to_dict(load_config(None, saved))["train"]["tf32"] is True  # in the run's saved config
    with pytest.raises(ConfigError, match=r"^train.tf32: expected true or false, got str 'maybe'$"):
        load_config("gmm", overrides=["train.tf32=maybe"])


# ---------------------------------------------------------------------------------------------- VAE

def test_the_vae_decodes_under_bf16_close_to_fp32_but_not_equal(tmp_path):
    """A run's ``train.precision`` reaches the decoder (``latent_codec``, used by sample, evaluate and the
    training sheets). The tiny decoder chains at most 20 autocast ops (conv_in; a mid block of two
    resnets of two convolutions and an attention of four ops in chain; two up blocks of two resnets and
    an upsampling convolution; conv_out): its images err by at most ``20·2^-8`` of their scale."""
    from diffusers import AutoencoderKL  # the test extra pins diffusers

    from flowmaps.data.latents import load_vae, vae_summary
    from flowmaps.runs.latents import latent_codec

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(tmp_path / "vae")
    summary = vae_summary(load_vae(tmp_path / "vae"), tmp_path / "vae")
    scales = {"latents": {"config_sha256": summary["config_sha256"], "image_shape": [3, 8, 8]}}
    z = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    images = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config("gmm", overrides=[f"train.precision={precision}"])
        codec = latent_codec(cfg, scales, vae=str(tmp_path / "vae"))
        assert codec.precision == precision
        images[precision] = codec.decode(z)
    fp32, bf16 = images["fp32"], images["bf16"]
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert (bf16 - fp32).abs().max() <= 20 * U * fp32.abs().max()
