"""Improved MeanFlow (iMF, arXiv 2512.02012) against its official loss written in its own convention.

The reference below is ``imf.py::forward`` of ``Lyy-iiis/imeanflow`` (boundary variant) in MeanFlow time:
``z_τ = (1 − τ) x + τ e`` (``τ = 1`` noise), the average velocity ``u(z, r, τ)``, the instantaneous one
``v(z, τ) = u(z, τ, τ)``; ``V = u + (τ − r) sg(du/dτ)`` with ``du/dτ`` the JVP along ``(v, 0, 1)`` in
``(z, r, τ)``, regressed on ``e − x`` (guided: ``+ (1 − 1/ω)(v_c − v_u)``), each per-sample sum of squares
divided by ``sg(ℓ + 0.01)``. Our network enters only through ``u(z, r, τ) := −v̂_{1−τ, 1−r}(z)``.

Mutations of the defaults tried by hand, each failing a test here: η 0.5 → 0.75, adaptive ε 0.01 → 10⁻³,
p 1 → 0.5, the JVP tangent İ instead of the network's velocity (MeanFlow's), the time mean's sign, the
diagonal times from one draw instead of a pair's start, the guided target's factor (1 − 1/ω) → (ω − 1),
the interval's ``lo ~ U[0, 0.4]`` instead of ``U[0, ½]``.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp, kstest
from torch import nn
from torch.func import jvp

from conftest import F64
from test_self_distillation import PerSampleShift
import flowmaps as fm
from flowmaps import FlowMap
from flowmaps.exact import GaussianMixture
from flowmaps.nets import UNet, guidance_condition
from flowmaps.objectives import ImprovedMeanFlow, MeanFlow

INTERP = fm.Linear()
REF = GaussianMixture([[1.5, 0.0], [-1.0, 1.0]], stds=[0.4, 0.3], interpolant=INTERP)
K = 3  # classes; label K is the null label


def small_model(seed=0):
    torch.manual_seed(seed)
    net = fm.MLP(2, width=24, depth=2, n_frequencies=4).double()
    with torch.no_grad():  # a non-trivial map (the output layer starts at zero)
        net.out.weight.normal_(0, 0.3)
        net.out.bias.normal_(0, 0.1)
    return FlowMap(net)


class ConditionalNet(nn.Module):
    """v(x, s, t | c) = tanh(W x) + e_c (s + t²) + u_c: a non-linear conditional two-time network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.w = nn.Linear(2, 2).double()
        self.e = nn.Embedding(K + 1, 2).double()
        self.u = nn.Embedding(K + 1, 2).double()

    def forward(self, x, s, t, cond):
        return torch.tanh(self.w(x)) * (1 + s)[:, None] + self.e(cond) * (s + t * t)[:, None] + self.u(cond)


def batch(n, n_d, seed=3):
    """x0, x1 and times with the first ``n_d`` samples on the diagonal (the library's layout)."""
    g = torch.Generator().manual_seed(seed)
    x1 = REF.sample(n, g, dtype=F64)
    x0 = torch.randn(n, 2, generator=g, dtype=F64)
    a, b = torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
    s, t = torch.minimum(a, b), torch.maximum(a, b)
    t[:n_d] = s[:n_d]
    cond = torch.randint(0, K + 1, (n,), generator=g)
    return x0, x1, s, t, cond


def official_loss(net, x0, x1, s, t, cond=None, omega=None, eps=0.01):
    """``imf.py::forward`` in MeanFlow time (boundary variant), with our network as ``u``."""
    e, x = x0, x1
    tau, r = 1 - s, 1 - t  # MeanFlow's t (noisier) and r

    def u(z, r_, tau_, c):
        return -(net(z, 1 - tau_, 1 - r_) if c is None else net(z, 1 - tau_, 1 - r_, c))

    z = (1 - tau)[:, None] * x + tau[:, None] * e
    v_t = e - x
    with torch.no_grad():
        v_c = u(z, tau, tau, cond)  # the network's own instantaneous velocity: the JVP tangent
        v_g = v_t
        if omega is not None:
            v_u = u(z, tau, tau, torch.full_like(cond, K))
            guided = v_t + (1 - 1 / omega) * (v_c - v_u)
            v_g = torch.where((cond != K)[:, None], guided, v_t)
    out, du_dtau = jvp(lambda z_, r_, tau_: u(z_, r_, tau_, cond), (z, r, tau),
                       (v_c, torch.zeros_like(r), torch.ones_like(tau)))
    big_v = out + (tau - r)[:, None] * du_dtau.detach()
    loss = ((big_v - v_g) ** 2).sum(dim=1)
    return (loss / (loss.detach() + eps)).mean()


def library_loss(objective, model, x0, x1, s, t, cond=None):
    terms = objective.terms(model, x0, x1, s, t, cond)
    return objective.combine(terms, s, t).mean()


def grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_the_loss_is_the_official_one_in_its_own_time_convention():
    model = small_model()
    objective = ImprovedMeanFlow(INTERP)
    n = 64
    n_d = objective.times.n_diagonal(n)
    assert n_d == 32  # half the batch on the diagonal (data_proportion 0.5)
    x0, x1, s, t, _ = batch(n, n_d)
    params = list(model.parameters())
    ours = grads(library_loss(objective, model, x0, x1, s, t), params)
    theirs = grads(official_loss(model.net, x0, x1, s, t), params)
    assert (ours - theirs).norm() <= 1e-12 * theirs.norm()
    # and it is not MeanFlow's loss: the JVP is transported along the network's velocity, not İ
    meanflow = MeanFlow(INTERP, eta=0.5, adaptive_eps=0.01, offdiag_dropout=False)
    other = grads(library_loss(meanflow, model, x0, x1, s, t), params)
    assert (other - theirs).norm() > 1e-3 * theirs.norm()


def test_fixed_scale_guidance_is_the_official_guided_target():
    model = FlowMap(ConditionalNet())
    omega = 2.5
    objective = ImprovedMeanFlow(INTERP, guidance=omega, null_label=K)
    n = 48
    x0, x1, s, t, cond = batch(n, objective.times.n_diagonal(n), seed=5)
    assert (cond == K).any() and (cond != K).any()
    params = list(model.parameters())
    ours = grads(library_loss(objective, model, x0, x1, s, t, cond), params)
    theirs = grads(official_loss(model.net, x0, x1, s, t, cond, omega=omega), params)
    assert (ours - theirs).norm() <= 1e-12 * theirs.norm()


def official_times(n, g, proportion=0.5):
    """``sample_tr``: two σ(N(−0.4, 1)) draws, t = max, r = min, r = t on the first proportion·n."""
    a = torch.sigmoid(torch.randn(n, generator=g, dtype=F64) - 0.4)
    b = torch.sigmoid(torch.randn(n, generator=g, dtype=F64) - 0.4)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    m = int(n * proportion)
    r[:m] = t[:m]
    return 1 - t, 1 - r  # our (s, t)


def test_time_sampler_matches_the_official_sample_tr():
    n = 40000
    s, t = ImprovedMeanFlow(INTERP).times(n, torch.zeros(1, dtype=F64), torch.Generator().manual_seed(0))
    s_ref, t_ref = official_times(n, torch.Generator().manual_seed(1))
    half = n // 2
    assert torch.equal(s[:half], t[:half]) and (s[half:] < t[half:]).all()
    bound = 1.63 * math.sqrt(2 / half)  # two-sample KS at the 1 % level
    for ours, theirs in ((s[:half], s_ref[:half]), (s[half:], s_ref[half:]), (t[half:], t_ref[half:])):
        assert ks_2samp(ours.numpy(), theirs.numpy()).statistic < bound


def test_expected_gradient_vanishes_at_the_exact_map_and_not_off_it():
    gmm = GaussianMixture([[1.5, 0.0], [-1.0, 1.0]], stds=[0.4, 0.3], interpolant=INTERP, steps=32)
    n = 3000
    objective = ImprovedMeanFlow(INTERP, eta=0.0, weighting="none")
    g = torch.Generator().manual_seed(6)
    x1 = gmm.sample(n, g, dtype=F64)
    x0 = torch.randn(n, 2, generator=g, dtype=F64)
    s = torch.rand(n, generator=g, dtype=F64) * 0.6
    t = s + 0.1 + 0.3 * torch.rand(n, generator=g, dtype=F64)

    def per_sample_gradients(theta0):
        model = FlowMap(PerSampleShift(gmm.as_network(), torch.full((n,), theta0, dtype=F64)))
        loss = objective.terms(model, x0, x1, s, t, cond=None)["eulerian"].sum()
        return torch.autograd.grad(loss, [model.net.theta])[0]

    at_exact = per_sample_gradients(0.0)
    mean, se = at_exact.mean().item(), at_exact.std().item() / math.sqrt(n)
    assert abs(mean) < 3.5 * se and at_exact.std() > 0.05
    off = per_sample_gradients(0.3)
    assert abs(off.mean().item()) > 8 * off.std().item() / math.sqrt(n)


def tiny_unet():
    torch.manual_seed(0)
    net = UNet((1, 4, 4), channels=8, channel_mults=(1,), blocks_per_level=1, attention_resolutions=(),
               num_classes=K, guidance_conditioning=True, mid_attention=False).double()
    with torch.no_grad():  # the output layer starts at zero
        net.conv_out.weight.normal_(0, 0.1)
    return net


def test_sampled_guidance_is_fed_to_the_network_and_starts_inert():
    net = tiny_unet()
    x = torch.randn(6, 1, 4, 4, dtype=F64)
    s, t = torch.rand(6, dtype=F64), torch.ones(6, dtype=F64)
    labels = torch.tensor([0, 1, 2, K, 0, 1])
    packed = guidance_condition(labels, 3.0, 0.2, 0.7, dtype=F64)
    torch.testing.assert_close(net(x, s, t, packed), net(x, s, t, labels))  # zero-initialised
    with torch.no_grad():
        net.emb_guidance.weight.normal_(0, 0.1)
    assert (net(x, s, t, packed) - net(x, s, t, labels)).abs().max().item() > 1e-4

    seen = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x_, s_, t_, cond=None):
            seen.append(cond.detach().clone())
            return self.inner(x_, s_, t_, cond)

    objective = ImprovedMeanFlow(INTERP, guidance_max=7.0, null_label=K)
    n = 400
    x1 = torch.randn(n, 1, 4, 4, dtype=F64)
    cond = torch.randint(0, K + 1, (n,), generator=torch.Generator().manual_seed(0))
    out = objective(FlowMap(Spy(net)), x1, cond, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)
    diag_net = seen[-2]  # the diagonal's pass, then the residual's
    res_net = seen[-1]
    n_d = objective.times.n_diagonal(n)
    assert diag_net.shape == (n_d, 4) and res_net.shape == (n - n_d, 4)
    scale, lo, hi = res_net[:, 1], res_net[:, 2], res_net[:, 3]
    assert (scale >= 1).all() and (scale <= 8).all()
    # log ω is uniform on [0, log 8]
    bound = 1.63 / math.sqrt(n - n_d)
    ks = ks_2samp(torch.log(scale).numpy(), torch.rand(20000).mul(math.log(8)).numpy()).statistic
    assert ks < bound + 1.63 / math.sqrt(20000)
    # the interval: lo ~ U[0, ½], hi ~ U[½, 1] (t_min, t_max of the official sampler, in our time)
    assert kstest((2 * lo).numpy(), "uniform").statistic < bound
    assert kstest((2 * hi - 1).numpy(), "uniform").statistic < bound
    assert (diag_net[:, 2] == 0).all() and (diag_net[:, 3] == 1).all()
    assert torch.equal(diag_net[:, 0].long(), cond[:n_d]) and torch.equal(res_net[:, 0].long(), cond[n_d:])


@pytest.mark.parametrize("options, message", [
    (dict(guidance=2.0), "null_label"),
    (dict(guidance=2.0, guidance_max=7.0, null_label=K), "not both"),
    (dict(guidance=0.5, null_label=K), ">= 1"),
    (dict(residual="lagrangian", source="self"), "v-form Eulerian"),
    (dict(guidance_kappa=0.5), "does not apply"),
    (dict(guidance_interval=(0.7, 0.2), guidance=2.0, null_label=K), "lo < hi"),
])
def test_nonsense_is_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        ImprovedMeanFlow(INTERP, **options)
    assert "\n" not in str(err.value)


DIGITS_TINY = ["model.channels=8", "model.channel_mults=[1]", "model.attention_resolutions=[]",
               "train.batch_size=16", "train.log_every=5", "--quiet"]


def test_guidance_is_chosen_at_sampling_time_through_the_command_line(tmp_path, capsys):
    import numpy as np

    from flowmaps.cli import main
    from flowmaps.runs.models import load_model

    run = tmp_path / "imf"
    assert main(["train", "--preset", "digits", "--objective", "imf", "--out", str(run),
                 "train.steps=4", "model.class_conditional=true", "model.guidance_conditioning=true",
                 "objective.guidance_max=7", *DIGITS_TINY]) == 0
    loaded = load_model(run)
    assert loaded.model.net.emb_guidance is not None
    assert loaded.config.objective.guidance_max == 7.0
    for scale in ("1", "1.5", "4"):
        out = tmp_path / f"s{scale}"
        assert main(["sample", str(run), "--steps", "1,2", "--n", "8", "--label", "3", "--guidance", scale,
                     "--guidance-interval", "0.3,0.7", "--out", str(out)]) == 0
        x = np.load(out / "samples_steps2.npy", allow_pickle=False)
        assert x.shape == (8, 1, 8, 8) and np.isfinite(x).all()
    capsys.readouterr()
    # guidance needs a guidance-conditioned map; the sampled scale needs the network to take it
    plain = tmp_path / "plain"
    assert main(["train", "--preset", "gmm", "--objective", "imf", "--out", str(plain), "train.steps=2",
                 "model.width=16", "model.depth=2", "data.n_train=200", "data.n_eval=50",
                 "eval.n_samples=50", "--quiet"]) == 0
    assert main(["sample", str(plain), "--guidance", "2", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
    assert main(["train", "--preset", "digits", "--objective", "imf", "--out", str(tmp_path / "bad"),
                 "objective.guidance_max=7", *DIGITS_TINY]) == 2
    err = capsys.readouterr().err
    assert "guidance_conditioning" in err and len(err.strip().splitlines()) == 1
