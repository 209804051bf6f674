"""Engineering of the self-distillation step: the fused forward-mode path equals torch.func (and really
runs), dropout only in the diagonal pass, classifier-free guidance of the velocity source, labels matched
to their samples through the batch split, the fused GELU with frozen layers, and the training domain
recorded with the map.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import F64
import flowmaps as fm
from flowmaps import FlowMap
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import (CT, EMD, ESD, FMM, LMD, LSD, PSD, GuidedVelocity, MeanFlow,
                                 SelfDistillation, Shortcut)
from flowmaps.objectives.residuals import lagrangian

INTERP = fm.Linear()
REF = GaussianMixture([[1.5, 0.0], [-1.0, 1.0]], stds=[0.4, 0.3], interpolant=INTERP)
TOL = dict(rtol=1e-10, atol=1e-10)

NAMED = {
    "lsd": lambda: LSD(INTERP), "lsd-v": lambda: LSD(INTERP, form="v"), "esd": lambda: ESD(INTERP),
    "psd-u": lambda: PSD(INTERP), "psd-m": lambda: PSD(INTERP, gamma="midpoint"),
    "meanflow": lambda: MeanFlow(INTERP), "shortcut": lambda: Shortcut(INTERP), "ct": lambda: CT(INTERP),
    "ct-eta": lambda: CT(INTERP, eta=0.5), "esd-source": lambda: ESD(INTERP, stopgrad="source"),
    "lsd-tangent": lambda: LSD(INTERP, form="v", weighting="tangent", tangent_warmup=10),
    "lsd-anneal": lambda: LSD(INTERP, fm_steps=1, anneal_steps=4),
}
USES_JVP = {"lsd", "lsd-v", "esd", "meanflow", "ct", "ct-eta", "esd-source", "lsd-tangent", "lsd-anneal"}


def mlp(seed=0):
    torch.manual_seed(seed)
    net = fm.MLP(2, width=24, depth=2).double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
    return net


def loss_and_grads(objective, model, params, seed=3, step=2):
    objective.begin_step(model, step)
    x1 = REF.sample(64, torch.Generator().manual_seed(seed), dtype=F64)
    out = objective(model, x1, generator=torch.Generator().manual_seed(seed + 1))
    extra = [p for m in objective.trainable_modules() for p in m.parameters()]
    return out.loss, torch.autograd.grad(out.loss, params + extra)


@pytest.mark.parametrize("name", list(NAMED))
def test_fused_path_equals_torch_func_and_really_runs(name):
    net = mlp()
    calls = []
    original = net._forward_and_jvps
    net._forward_and_jvps = lambda *a, **k: calls.append(1) or original(*a, **k)
    params = list(net.parameters())
    objective = NAMED[name]()
    loss_fused, g_fused = loss_and_grads(objective, FlowMap(net), params)
    n_fused = len(calls)
    objective = NAMED[name]()
    loss_func, g_func = loss_and_grads(objective, FlowMap(net, fused_jvp=False), params)
    assert len(calls) == n_fused  # the torch.func path leaves the fused pass alone
    if name in USES_JVP:
        assert n_fused >= 1
    else:
        assert n_fused == 0  # semigroup residuals take no derivative
    torch.testing.assert_close(loss_fused, loss_func, **TOL)
    for a, b in zip(g_fused, g_func):
        torch.testing.assert_close(a, b, **TOL)


def test_fused_gelu_keeps_the_curvature_term_when_the_first_layer_is_frozen():
    """FMM differentiates the map at y = X̂_{t,s}(I_t), which depends on the parameters; with the first
    Linear frozen its tangent is a constant but its pre-activation is not, and the GELU's curvature
    term of the tangent's gradient must still be there."""
    net = mlp(4)
    net.body[0].requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    objective = FMM(INTERP)
    _, fused = loss_and_grads(objective, FlowMap(net), params)
    _, plain = loss_and_grads(objective, FlowMap(net, fused_jvp=False), params)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------------
# Dropout: on in the diagonal flow-matching pass only (spec Q10)
# ------------------------------------------------------------------------------------------------

class DropoutNet(nn.Module):
    """A two-time network with dropout and no fused pass (every JVP through torch.func)."""

    def __init__(self, p=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.inner = mlp(1)
        self.drop = nn.Dropout(p)
        self.mix = nn.Linear(2, 2).double()

    def forward(self, x, s, t):
        return self.mix(self.drop(self.inner(x, s, t)))


@pytest.mark.parametrize("make", [lambda: LMD(INTERP, REF), lambda: EMD(INTERP, REF),
                                  lambda: EMD(INTERP, REF, form="full"), lambda: FMM(INTERP),
                                  lambda: CT(INTERP), lambda: SelfDistillation(INTERP, eta=0.0,
                                                                              residual="eulerian",
                                                                              source="teacher",
                                                                              teacher=REF)])
def test_off_diagonal_residuals_run_without_dropout(make):
    model = FlowMap(DropoutNet()).train()
    x1 = REF.sample(32, torch.Generator().manual_seed(0), dtype=F64)
    objective = make()
    losses = [objective(model, x1, generator=torch.Generator().manual_seed(1)).loss for _ in range(2)]
    model.eval()
    reference = objective(model, x1, generator=torch.Generator().manual_seed(1)).loss
    assert model.net.drop.training is False
    model.train()
    assert model.net.drop.training  # restored after every call
    torch.testing.assert_close(losses[0], reference, **TOL)
    torch.testing.assert_close(losses[1], reference, **TOL)


def test_the_diagonal_term_runs_with_dropout():
    model = FlowMap(DropoutNet()).train()
    x1 = REF.sample(64, torch.Generator().manual_seed(0), dtype=F64)
    objective = LSD(INTERP, weighting="none")
    terms = [objective(model, x1, generator=torch.Generator().manual_seed(1)).terms for _ in range(2)]
    assert terms[0]["diagonal"] != terms[1]["diagonal"]      # a new mask each call
    assert terms[0]["lagrangian"] == terms[1]["lagrangian"]  # no mask off the diagonal


# ------------------------------------------------------------------------------------------------
# Guidance and labels
# ------------------------------------------------------------------------------------------------

K = 3  # classes; label K is the null label


def conditional_teacher(x, t, cond):
    """b(x, t | c) = (c + 1) x − t c (c = K: unconditional)."""
    c = cond.to(x.dtype)[:, None]
    return (c + 1) * x - t[:, None] * c


class ConditionalNet(nn.Module):
    """v(x, s, t | c) = W x + e_c (s + t) + u_c: a conditional two-time network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.w = nn.Linear(2, 2).double()
        self.e = nn.Embedding(K + 1, 2).double()
        self.u = nn.Embedding(K + 1, 2).double()

    def forward(self, x, s, t, cond):
        return self.w(x) + self.e(cond) * (s + t)[:, None] + self.u(cond)


def labelled_batch(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = REF.sample(n, g, dtype=F64)
    cond = torch.randint(0, K + 1, (n,), generator=g)  # some null labels among them
    x0 = INTERP.sample_base(x1, g)
    s = torch.rand(n, generator=g, dtype=F64) * 0.5
    t = s + 0.5
    return x0, x1, s, t, cond


@pytest.mark.parametrize("source", ["teacher", "self"])
def test_the_distillation_target_is_the_guided_velocity(source):
    w = 2.5
    model = FlowMap(ConditionalNet())
    options = dict(residual="lagrangian", guidance=w, null_label=K, source=source)
    if source == "teacher":
        options.update(teacher=conditional_teacher, eta=0.0)
    objective = SelfDistillation(INTERP, **options)
    x0, x1, s, t, cond = labelled_batch()
    i_s = INTERP.interpolate(x0, x1, s)
    r = lagrangian(model, i_s, s, t, cond, objective.source)
    x_st, dt_x = model.jvp(i_s, s, t, dt=1.0, cond=cond)
    target = dt_x - r
    base = conditional_teacher if source == "teacher" else model.velocity
    want = GuidedVelocity(base, w, null_label=K)(x_st.detach(), t, cond)
    torch.testing.assert_close(target, want, **TOL)
    null = torch.full_like(cond, K)
    explicit = base(x_st, t, null) + w * (base(x_st, t, cond) - base(x_st, t, null))
    torch.testing.assert_close(target, explicit.detach(), **TOL)
    dropped = cond == K
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(target[dropped], base(x_st, t, null)[dropped].detach(), **TOL)


def test_meanflow_guidance_mixes_the_conditional_velocity_with_the_unconditional_diagonal():
    w = 1.8
    model = FlowMap(ConditionalNet())
    objective = MeanFlow(INTERP, guidance=w, null_label=K)
    x0, x1, s, t, cond = labelled_batch(seed=1)
    i_s, di_s = INTERP(x0, x1, s)
    b = objective.source.conditional(model, i_s, di_s, s, cond)
    uncond = model.velocity(i_s, s, torch.full_like(cond, K)).detach()
    labelled = cond != K
    torch.testing.assert_close(b[labelled], (w * di_s + (1 - w) * uncond)[labelled], **TOL)
    torch.testing.assert_close(b[~labelled], di_s[~labelled], **TOL)


class LabelSpy(LSD):
    """LSD that checks, in both halves of the batch split, that every label matches its sample."""

    seen = 0

    def _check_labels(self, x1, cond):
        encoded = x1[:, 0].round().long()  # each sample carries its class in its first coordinate
        assert ((cond == encoded) | (cond == K)).all()
        LabelSpy.seen += x1.shape[0]

    def _diagonal(self, model, x0, x1, t, cond):
        self._check_labels(x1, cond)
        return super()._diagonal(model, x0, x1, t, cond)

    def _residual(self, model, x0, x1, s, t, cond):
        self._check_labels(x1, cond)
        return super()._residual(model, x0, x1, s, t, cond)


def test_labels_stay_matched_to_their_samples_through_the_trainer_and_the_split():
    labels = torch.arange(200) % K
    data = torch.stack([labels.double(), torch.randn(200, dtype=F64)], dim=1)
    model = FlowMap(ConditionalNet())
    objective = LabelSpy(INTERP, guidance=2.0, null_label=K, weighting="none")
    trainer = fm.Trainer(model, objective, data, batch_size=32, labels=labels, label_dropout=0.3,
                         null_label=K, seed=0)
    for _ in range(3):
        trainer.step()
    assert LabelSpy.seen == 3 * 32


# ------------------------------------------------------------------------------------------------
# The training domain is recorded with the map
# ------------------------------------------------------------------------------------------------

def sample64(n, generator=None):
    return REF.sample(n, generator, dtype=F64)


def test_inverse_is_refused_for_a_map_trained_on_forward_jumps_only():
    x1 = sample64(16, torch.Generator().manual_seed(0))
    forward = FlowMap(mlp())
    fm.fit(forward, LSD(INTERP), sample64, steps=1, batch_size=16)
    assert forward.domain == "triangle"
    with pytest.raises(ValueError, match="forward jumps"):
        forward.inverse(x1)
    with pytest.raises(ValueError, match="forward jumps"):
        forward.sample(x1, grid=torch.tensor([1.0, 0.5, 0.0]))
    both = FlowMap(mlp())
    fm.fit(both, LMD(INTERP, REF, times="square"), sample64, steps=1, batch_size=16)
    assert both.domain == "square"
    assert both.inverse(x1).shape == x1.shape
    assert FlowMap(mlp()).inverse(x1).shape == x1.shape  # unknown domain (never trained here): allowed


@pytest.mark.parametrize("make", [lambda: LSD(INTERP), lambda: LSD(INTERP, source="ema"),
                                  lambda: LMD(INTERP, REF, eta=0.25),
                                  lambda: LMD(INTERP, REF, eta=0.25, diagonal="teacher")],
                         ids=["lsd", "lsd-ema", "lmd-diagonal", "lmd-teacher-diagonal"])
def test_one_pass_for_the_diagonal_and_the_lagrangian_rows_equals_two(make):
    """LSD's diagonal rows (values) and Lagrangian rows (values and time-JVP) in one fused pass
    (``v_jvps(..., offset=n_d)``) give the two-pass step's loss, terms and gradients, and really run."""
    net = mlp()
    calls = []
    original = net._forward_and_jvps
    net._forward_and_jvps = lambda *a, **k: calls.append(a[-1] if len(a) > 6 else 0) or original(*a, **k)
    params = list(net.parameters())
    results = []
    for fuse in (True, False):
        objective = make()
        objective.fuse_passes = fuse
        loss, grads = loss_and_grads(objective, FlowMap(net), params)
        results.append((loss, grads))
    fused_offsets = [c for c in calls if c]
    if make().diagonal == "conditional":
        assert fused_offsets, "the fused pass did not run"
    else:  # the teacher diagonal is not fused: two passes as before
        assert not fused_offsets
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, **TOL)


def test_tangents_on_a_tail_of_the_rows_equal_those_of_the_tail_alone():
    net = mlp(3)
    x = torch.randn(12, 2, dtype=F64)
    s = torch.rand(12, dtype=F64)
    t = s + 0.4 * torch.rand(12, dtype=F64)
    dx = torch.randn(7, 2, dtype=F64)
    full, (whole,) = net.forward_and_jvps(x, s, t, [(None, None, torch.ones(12, dtype=F64))])
    value, (d_t, d_xs) = net.forward_and_jvps(x, s, t, [(None, None, torch.ones(7, dtype=F64)),
                                                        (dx, torch.ones(7, dtype=F64), None)],
                                              offset=5)
    _, (alone,) = net.forward_and_jvps(x[5:], s[5:], t[5:], [(dx, torch.ones(7, dtype=F64), None)])
    torch.testing.assert_close(value, full, **TOL)
    torch.testing.assert_close(d_t, whole[5:], **TOL)
    torch.testing.assert_close(d_xs, alone, **TOL)
    w = torch.randn(12, 2, dtype=F64)
    g_fused = torch.autograd.grad((value * w).sum() + (d_t * w[5:]).sum(), list(net.parameters()))
    g_full = torch.autograd.grad((full * w).sum() + (whole[5:] * w[5:]).sum(), list(net.parameters()))
    for a, b in zip(g_fused, g_full):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="offset"):
        net.forward_and_jvps(x, s, t, [(None, None, 1.0)], offset=12)
