"""Warm start (issue 17, part 1): ``fm.two_time`` makes a two-time student from the teacher's own network,
exactly the teacher at initialisation, ``v_{s,t}(x) = b_s(x)`` (so ``X_{s,t}`` is one Euler step of the
teacher from ``s``), for flowmaps' MLP and U-Net, diffusers' UNet2DModel / DiT / SD3 transformer,
torchcfm's MLP and U-Net, a flow_matching ModelWrapper and any other module (the generic correction).

Each architecture (tiny configs built from config, nothing downloaded) is checked for: exactness against
the teacher in our convention at several (s, t) with s ≠ t (float64 where the model allows it); the
added embedding's last layer is zero and receives gradient; one real LMD step and one real LSD step
(finite loss, parameters change); the student's time-JVP (the one LMD takes) equals central finite
differences.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flowmaps as fm
from flowmaps import teachers
from flowmaps.objectives import LMD, LSD
from flowmaps.teachers.warm_start import (CorrectedStudent, FactoryStudent, HookedStudent, WarmStartError,
                                          math_attention)

F64 = torch.float64
S = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.25, 0.9], dtype=F64)
T = torch.tensor([0.6, 0.3, 0.95, 0.2, 0.8, 1.0], dtype=F64)   # s < t, s = t and s > t


def perturbed(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Random weights everywhere (zero-initialised output layers included): a non-trivial teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# --- teachers: (velocity b(x, t) in our convention, sample shape, dtype, cond) -------------------------

def flowmaps_mlp():
    net = perturbed(fm.MLP(3, width=16, depth=2, n_frequencies=4).double())
    return fm.FlowMap(net), (3,), F64, None


def flowmaps_unet():
    net = perturbed(fm.UNet((1, 8, 8), channels=8, channel_mults=(1, 1), blocks_per_level=1,
                            attention_resolutions=(4,), emb_channels=16).double())
    return fm.FlowMap(net), (1, 8, 8), F64, None


def diffusers_unet2d():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).double().eval()
    return teachers.diffusers_vp(unet, DDPMScheduler()), (1, 8, 8), F64, None


def diffusers_dit():
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=1).double().eval()
    perturbed(dit)  # its adaLN-zero layers start at zero
    velocity = teachers.diffusers_vp(dit, DDPMScheduler(prediction_type="v_prediction"),
                                     cond_kwarg="class_labels")
    return velocity, (1, 8, 8), F64, torch.tensor([0, 3, 5, 9, 1, 2])


class Prompted(nn.Module):
    """A user's wrapper: an SD3 transformer with one fixed prompt (its text and pooled embeddings),
    called ``(x, timestep=...)`` as diffusers' flow adapter calls it, for any batch size."""

    def __init__(self, sd3):
        super().__init__()
        self.sd3 = sd3
        g = torch.Generator().manual_seed(1)
        self.register_buffer("text", torch.randn(1, 3, 16, generator=g, dtype=F64))
        self.register_buffer("pooled", torch.randn(1, 8, generator=g, dtype=F64))

    def forward(self, x, timestep):
        n = x.shape[0]
        return self.sd3(x, timestep=timestep, encoder_hidden_states=self.text.expand(n, -1, -1),
                        pooled_projections=self.pooled.expand(n, -1)).sample


def diffusers_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=1, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=1, pos_embed_max_size=8).double().eval()
    perturbed(sd3)
    return teachers.diffusers_flow(Prompted(sd3)), (1, 8, 8), F64, None


def torchcfm_mlp():
    from torchcfm.models.models import MLP

    torch.manual_seed(0)
    return teachers.torchcfm(MLP(dim=3, w=16, time_varying=True).double()), (3,), F64, None


def torchcfm_unet():
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(0)
    unet = UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                            attention_resolutions="4", num_head_channels=8).eval()
    perturbed(unet)  # zero-initialised output convolution; float32: its time embedding is float32
    return teachers.torchcfm(unet), (1, 8, 8), torch.float32, None


def flow_matching_wrapped():
    """Meta's ModelWrapper around a torchcfm U-Net, with an ε-predicting cosine path (converted)."""
    from flow_matching.path.scheduler import CosineScheduler
    from flow_matching.utils import ModelWrapper
    from torchcfm.models.unet.unet import UNetModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(t, x)

    torch.manual_seed(0)
    unet = perturbed(UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1,),
                                      attention_resolutions="4", num_head_channels=8).eval())
    velocity = teachers.flow_matching(Wrapped(unet), CosineScheduler(), prediction="epsilon")
    return velocity, (1, 8, 8), torch.float32, None


class EpsNet(nn.Module):
    """A user's own ε-network of vectors with a time input it embeds its own way (no known embedding)."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.lift = nn.Linear(dim, 32)
        self.when = nn.Linear(1, 32)
        self.out = nn.Linear(32, dim)

    def forward(self, x, timestep):
        return self.out(torch.tanh(self.lift(x) * torch.cos(self.when(timestep[:, None] / 1000.0))))


def generic_epsilon():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    return teachers.diffusers_vp(EpsNet().double(), DDPMScheduler()), (3,), F64, None


TEACHERS = {"flowmaps_mlp": flowmaps_mlp, "flowmaps_unet": flowmaps_unet, "diffusers_unet2d": diffusers_unet2d,
            "diffusers_dit": diffusers_dit, "diffusers_sd3": diffusers_sd3, "torchcfm_mlp": torchcfm_mlp,
            "torchcfm_unet": torchcfm_unet, "flow_matching_wrapper": flow_matching_wrapped,
            "generic_epsilon": generic_epsilon}
KIND = {"flowmaps_mlp": fm.MLP, "flowmaps_unet": fm.UNet, "generic_epsilon": CorrectedStudent}


def teacher_velocity(teacher, x, t, cond):
    with torch.no_grad():
        if isinstance(teacher, fm.FlowMap):
            return teacher.velocity(x, t, cond)
        return teacher(x, t, cond)


def zero_layer(student) -> tuple[torch.Tensor, tuple]:
    """The zero-initialised weights that carry the second time: (parameter, index into it)."""
    if isinstance(student, fm.MLP):
        start = student.dim + student.time_features.dim
        return student.body[0].weight, (slice(None), slice(start, start + student.time_features.dim))
    if isinstance(student, fm.UNet):
        return student.emb_gap.weight, (...,)
    if isinstance(student, HookedStudent):
        return student.gap_embedding.out.weight, (...,)
    return student.correction.out.weight, (...,)


def randomise_zero_layer(student, seed: int) -> None:
    weight, index = zero_layer(student)
    with torch.no_grad():
        part = weight[index]
        weight[index] = 0.1 * torch.randn(part.shape, generator=torch.Generator().manual_seed(seed),
                                          dtype=part.dtype)


def make(name):
    teacher, shape, dtype, cond = TEACHERS[name]()
    student = fm.two_time(teacher, sample_shape=shape)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return teacher, student, x, cond


@pytest.mark.parametrize("name", list(TEACHERS))
def test_student_is_exactly_the_teacher_at_initialisation(name):
    """v_{s,t}(x) = b_s(x) in our convention at six (s, t) pairs (s < t, s = t, s > t), and the map is
    one Euler step of the teacher; the teacher is a separate copy, left frozen and unchanged."""
    teacher, student, x, cond = make(name)
    assert isinstance(student, KIND.get(name, HookedStudent))
    before = copy.deepcopy(teacher.state_dict())
    b_s = teacher_velocity(teacher, x, S, cond)
    with torch.no_grad():
        v = student(x, S, T, cond) if cond is not None else student(x, S, T)
        mapped = fm.FlowMap(student)(x, S, T, cond)
    scale = b_s.abs().max()
    assert scale > 1e-3  # a non-trivial teacher
    tol = (1e-12 if x.dtype == F64 else 1e-6) * max(1.0, float(scale))
    assert (v - b_s).abs().max() <= tol
    step = x + (T - S).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) * b_s
    assert (mapped - step).abs().max() <= tol
    # The gap embedding is really read: changing the zero weights changes v off the diagonal only.
    randomise_zero_layer(student, 3)
    with torch.no_grad():
        moved = student(x, S, T, cond) if cond is not None else student(x, S, T)
    off = (S != T)
    assert (moved - v)[off].abs().max() > 1e-6
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("name", list(TEACHERS))
def test_zero_layer_starts_at_zero_and_receives_gradient(name):
    teacher, student, x, cond = make(name)
    weight, index = zero_layer(student)
    assert bool((weight[index] == 0).all())
    fm.FlowMap(student)(x, S, T, cond).square().sum().backward()
    assert weight.grad is not None and float(weight.grad[index].abs().max()) > 0


@pytest.mark.parametrize("name", list(TEACHERS))
def test_time_jvp_of_the_student_matches_finite_differences(name):
    """The JVP LMD takes (∂_t of the map, through torch.func.jvp or the MLP's fused pass, with the
    math attention backend for the diffusers attention models) against central differences in t."""
    teacher, student, x, cond = make(name)
    randomise_zero_layer(student, 4)  # a student whose second time matters
    model = fm.FlowMap(student)
    s, t = S.to(x.dtype), T.clamp(max=0.9).to(x.dtype)
    _, dX = model.jvp(x, s, t, dt=torch.ones_like(t), cond=cond)
    h, tol = (1e-6, 1e-6) if x.dtype == F64 else (1e-3, 3e-3)
    with torch.no_grad():
        fd = (model(x, s, t + h, cond) - model(x, s, t - h, cond)) / (2 * h)
    assert (dX - fd).abs().max() <= tol * max(1.0, float(fd.abs().max()))


def one_step(objective, model, x1, cond):
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    out = objective(model, x1, cond, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    return float(out.loss), changed, len(params)


@pytest.mark.parametrize("name", list(TEACHERS))
@pytest.mark.parametrize("objective", ["lmd", "lsd"])
def test_one_real_distillation_step_from_the_warm_start(name, objective):
    """One LMD step against the teacher (and one LSD step, the student against its own diagonal) from
    the warm start: the loss is finite and the weights move, the zero layers included."""
    teacher, student, x1, cond = make(name)
    model = fm.FlowMap(student)
    if objective == "lmd":
        frozen = teacher.requires_grad_(False)
        loss_fn = LMD(fm.Linear(), frozen.velocity if isinstance(frozen, fm.FlowMap) else frozen)
    else:
        loss_fn = LSD(fm.Linear())
    loss, changed, total = one_step(loss_fn, model, x1, cond)
    weight, index = zero_layer(student)
    assert loss >= 0 and changed >= 1 and float(weight[index].abs().max()) > 0


def test_lmd_loss_at_the_warm_start_is_the_teachers_euler_defect():
    """For a warm student, X_{s,t} = x + (t − s) b_s, so LMD's residual ∂_t X − b_t(X) is
    b_s(x) − b_t(x + (t − s) b_s(x)) exactly: the loss is that of the teacher's own Euler step, and is
    zero on the diagonal."""
    teacher, student, x, _ = make("flowmaps_mlp")
    model = fm.FlowMap(student)
    _, dX = model.jvp(x, S, T, dt=torch.ones_like(T))
    with torch.no_grad():
        b_s = teacher.velocity(x, S)
        want = b_s - teacher.velocity(x + (T - S)[:, None] * b_s, T)
        got = dX - teacher.velocity(model(x, S, T), T)
    assert torch.allclose(got, want, atol=1e-12)
    assert float(got[S == T].abs().max()) <= 1e-12


def test_attention_jvp_needs_the_math_backend():
    """The reason for math_attention: the fused CPU SDPA kernel has no forward-mode rule."""
    q = torch.randn(1, 1, 4, 8)
    f = lambda a: torch.nn.functional.scaled_dot_product_attention(a, a, a)  # noqa: E731
    with pytest.raises(RuntimeError):
        torch.func.jvp(f, (q,), (torch.ones_like(q),))

    def g(a):
        with math_attention():
            return f(a)

    out, tangent = torch.func.jvp(g, (q,), (torch.ones_like(q),))
    assert torch.isfinite(tangent).all()


def test_copies_share_nothing_with_the_original_student():
    """EMA copies (deepcopy) keep their own hooks: a copy's embedding moves its own output only."""
    _, student, x, _ = make("torchcfm_unet")
    twin = copy.deepcopy(student)
    with torch.no_grad():
        twin.gap_embedding.out.weight.normal_(0, 0.1)
        assert torch.equal(student(x, S, T), copy.deepcopy(student)(x, S, T))
        assert not torch.allclose(twin(x, S, T), student(x, S, T))


def test_bad_teachers_get_one_line_errors():
    from diffusers import UNet2DModel

    raw = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8,),
                      down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    with pytest.raises(WarmStartError, match="convert it first"):
        fm.two_time(raw)
    with pytest.raises(WarmStartError, match="sample_shape"):
        fm.two_time(lambda x, t: x)
    velocity, *_ = generic_epsilon()
    with pytest.raises(WarmStartError, match="no module 'nope'"):
        fm.two_time(velocity, embedding="nope")
    for err in (WarmStartError("x"),):
        assert "\n" not in str(err)


def test_factory_student_rebuilds_from_its_json_options(tmp_path):
    """FactoryStudent (the student of a teacher.factory teacher) saves with save_pretrained and reloads
    from config.json + model.safetensors alone, giving the same outputs."""
    import sys

    (tmp_path / "ws_user_teacher.py").write_text(
        "import torch\nfrom diffusers import DDPMScheduler, UNet2DModel\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,\n"
        "        block_out_channels=(8,), down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',),\n"
        "        norm_num_groups=4)\n"
        "    return unet, DDPMScheduler()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        net = FactoryStudent("ws_user_teacher:make", adapter="diffusers_vp", sample_shape=[1, 8, 8])
        assert isinstance(net.student, HookedStudent)
        with torch.no_grad():
            net.student.gap_embedding.out.weight.normal_(0, 0.1)
        model = fm.FlowMap(net)
        model.sample_shape = (1, 8, 8)
        model.save_pretrained(tmp_path / "export", interpolant=fm.Linear())
        loaded = fm.FlowMap.from_pretrained(tmp_path / "export")
        x = torch.randn(4, 1, 8, 8)
        s, t = torch.full((4,), 0.2), torch.full((4,), 0.7)
        with torch.no_grad():
            assert torch.allclose(loaded(x, s, t), model(x, s, t), atol=1e-6)
            assert not torch.allclose(loaded(x, s, t), x + 0.5 * model.velocity(x, s), atol=1e-4)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ws_user_teacher", None)
