"""The fused forward-mode pass (FlowMap's optional ``forward_and_jvp`` protocol, implemented by MLP) against
``torch.func.jvp``, and every objective's parameter gradient on the fused path against the torch.func
path and against the pre-fusion implementation of the objective (float64).

What must hold: the fused pass computes the same primal as ``MLP.forward`` (bit for bit) and the same
tangent as ``torch.func.jvp`` of it; reverse mode through both outputs (plain autograd on the fused pass,
reverse-over-forward on torch.func) gives the same parameter gradients; the one-pass, several-tangent
variant used by semigradient EMD gives the gradient of the two separate JVPs it replaces; and every
objective's loss and parameter gradient are unchanged (to 1e-10) by the fast path.
"""

from __future__ import annotations


import pytest
import torch
from torch.func import jvp as func_jvp

import flowmaps as fm
from flowmaps import MLP, FlowMap
from flowmaps._tensor import expand_as_data, sq_norm
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import EMD, FMM, LMD, PFMM, Velocity
from flowmaps.objectives.base import teacher_no_grad

F64 = torch.float64
B = 24
TOL = dict(rtol=1e-10, atol=1e-10)
TANGENTS = ["x", "s", "t", "xs", "st", "xst"]


def random_mlp(seed: int = 0, dim: int = 2, activation: str = "gelu", cond_dim: int = 0,
               sigma_data=1.0, width: int = 32, depth: int = 3) -> MLP:
    """A float64 MLP with random weights everywhere, including the (normally zero) output layer."""
    torch.manual_seed(seed)
    net = MLP(dim, width=width, depth=depth, activation=activation, cond_dim=cond_dim,
              sigma_data=sigma_data, n_frequencies=8).double()   # the Fourier features' tangents too
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        net.out.weight.copy_(0.5 * torch.randn(net.out.weight.shape, generator=g, dtype=F64))
        net.out.bias.copy_(0.3 * torch.randn(net.out.bias.shape, generator=g, dtype=F64))
    return net


def make_inputs(shape=(B, 2), cond_dim: int = 0, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    s = torch.rand(shape[0], generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64)
    tangents = dict(x=torch.randn(shape, generator=g, dtype=F64),
                    s=torch.randn(shape[0], generator=g, dtype=F64),
                    t=torch.randn(shape[0], generator=g, dtype=F64))
    cond = torch.randn(shape[0], cond_dim, generator=g, dtype=F64) if cond_dim else None
    return x, s, t, tangents, cond


def func_reference(net, x, s, t, dx, ds, dt, cond):
    """``torch.func.jvp`` of ``net.forward`` in the given tangent directions."""
    names = [n for n, d in (("x", dx), ("s", ds), ("t", dt)) if d is not None]
    primals = {"x": x, "s": s, "t": t}
    tangents = {"x": dx, "s": ds, "t": dt}

    def f(*args):
        inputs = dict(primals, **dict(zip(names, args)))
        return net(inputs["x"], inputs["s"], inputs["t"], cond)

    return func_jvp(f, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))


def pick(tangents, which):
    return (tangents["x"] if "x" in which else None, tangents["s"] if "s" in which else None,
            tangents["t"] if "t" in which else None)


def param_grads(loss, module):
    return torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad],
                               allow_unused=True)


def assert_grads_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, **TOL)


# --- the network's fused pass -----------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "softplus"])
@pytest.mark.parametrize("which", TANGENTS)
def test_forward_and_jvp_equals_torch_func_jvp(activation, which):
    net = random_mlp(1, activation=activation)
    x, s, t, tangents, _ = make_inputs()
    dx, ds, dt = pick(tangents, which)
    value, tangent = net.forward_and_jvp(x, s, t, dx, ds, dt, None)
    want_value, want_tangent = func_reference(net, x, s, t, dx, ds, dt, None)
    assert torch.equal(value, net(x, s, t))          # same ops as forward: bit for bit
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-12, atol=1e-12)
    assert tangent.abs().max() > 1e-3                 # a non-trivial tangent was compared


@pytest.mark.parametrize("which", ["x", "s", "xst"])
def test_forward_and_jvp_with_conditioning_and_sample_shape(which):
    """Per-dimension σ_data, a (B, 2, 3) sample shape (flattened to 6 features) and a conditioning vector."""
    net = random_mlp(2, dim=6, cond_dim=3, sigma_data=torch.linspace(0.5, 2.0, 6))
    x, s, t, tangents, cond = make_inputs(shape=(B, 2, 3), cond_dim=3)
    dx, ds, dt = pick(tangents, which)
    value, tangent = net.forward_and_jvp(x, s, t, dx, ds, dt, cond)
    want_value, want_tangent = func_reference(net, x, s, t, dx, ds, dt, cond)
    assert value.shape == tangent.shape == x.shape
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "softplus"])
@pytest.mark.parametrize("which", TANGENTS)
def test_reverse_mode_through_the_fused_pass_equals_reverse_over_torch_func(activation, which):
    """Parameter and input gradients of a loss of both outputs (value and tangent)."""
    net = random_mlp(3, activation=activation)
    x, s, t, tangents, _ = make_inputs(seed=11)
    dx, ds, dt = pick(tangents, which)
    g = torch.Generator().manual_seed(5)
    w_value, w_tangent = (torch.randn(x.shape, generator=g, dtype=F64) for _ in range(2))

    def loss(value, tangent):
        return (w_value * value).sum() + (w_tangent * tangent).pow(2).sum() + (value * tangent).sum()

    xg = x.clone().requires_grad_()   # FMM differentiates through the point the JVP is taken at
    got = torch.autograd.grad(loss(*net.forward_and_jvp(xg, s, t, dx, ds, dt, None)),
                              [xg, *net.parameters()])
    xg2 = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(*func_reference(net, xg2, s, t, dx, ds, dt, None)),
                               [xg2, *net.parameters()])
    assert_grads_close(got, want)


def test_several_tangents_in_one_pass_with_stop_gradient():
    """forward_and_jvps: every tangent equals its own JVP; a detached tangent carries no graph, and the
    gradient equals that of separate passes with the detached one under no_grad."""
    net = random_mlp(4)
    x, s, t, tangents, _ = make_inputs(seed=13)
    ones = torch.ones_like(s)
    directions = [(None, ones, None), (tangents["x"], None, None), (None, None, tangents["t"])]
    for detach in ([False, True, False], [True, True, True], [False, False, False]):
        value, outs = net.forward_and_jvps(x, s, t, directions, None, detach)
        total = value.sum()
        reference_total = None
        for (dx, ds, dt), out, stop in zip(directions, outs, detach):
            with torch.set_grad_enabled(not stop):
                want_value, want = func_reference(net, x, s, t, dx, ds, dt, None)
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(value, want_value, rtol=0, atol=0)
            assert (out.grad_fn is None) == stop
            total = total + (out * out.detach().sin()).sum()
            term = (want * want.detach().sin()).sum()
            reference_total = term if reference_total is None else reference_total + term
        reference_total = reference_total + func_reference(net, x, s, t, None, ones, None, None)[0].sum()
        assert_grads_close(param_grads(total, net), param_grads(reference_total, net))


def test_flowmap_uses_the_fused_pass_and_can_be_switched_off(monkeypatch):
    net = random_mlp(5)
    x, s, t, tangents, _ = make_inputs()
    calls = []
    original = MLP.forward_and_jvps

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MLP, "forward_and_jvps", spy)
    fused = FlowMap(net)
    plain = FlowMap(net, fused_jvp=False)
    for kw in (dict(dt=1.0), dict(ds=1.0), dict(dx=tangents["x"], ds=0.5, dt=tangents["t"])):
        n = len(calls)
        got = fused.jvp(x, s, t, **kw)
        assert len(calls) == n + 1
        want = plain.jvp(x, s, t, **kw)
        assert len(calls) == n + 1                        # torch.func path: the network method unused
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # several tangents: one fused pass vs the per-tangent fallback
    directions = [(None, 1.0, None), (tangents["x"], None, None)]
    got_x, got = fused.jvps(x, s, t, directions, detach=(False, True))
    want_x, want = plain.jvps(x, s, t, directions, detach=(False, True))
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[1].grad_fn is None and want[1].grad_fn is None


def test_fused_pass_is_first_order_only():
    """The fused GELU has an analytic first-order backward; a second backward raises instead of silently
    returning a wrong result (``FlowMap(net, fused_jvp=False)`` keeps higher orders)."""
    net = random_mlp(6)
    x, s, t, _, _ = make_inputs()
    _, tangent = FlowMap(net).jvp(x, s, t, dt=1.0)
    (grad,) = torch.autograd.grad(tangent.pow(2).sum(), [net.body[0].weight], create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
    _, tangent = FlowMap(net, fused_jvp=False).jvp(x, s, t, dt=1.0)
    (grad,) = torch.autograd.grad(tangent.pow(2).sum(), [net.body[0].weight], create_graph=True)
    grad.sum().backward()


# --- objectives: fused path vs torch.func path vs the pre-fusion implementation -----------------------

def reference_terms(name, objective, model, x0, x1, s, t):
    """The objectives' ``terms`` as implemented before the fused pass (copied), for the torch.func model."""
    interp = objective.interpolant
    if name.startswith("lmd"):
        i_s = interp.interpolate(x0, x1, s)
        x_st, dt_x = model.jvp(i_s, s, t, dt=1.0)
        target = (teacher_no_grad(objective.teacher, x_st, t) if objective.semigradient
                  else objective.teacher(x_st, t))
        return sq_norm(dt_x - target)
    if name.startswith("emd"):
        i_s = interp.interpolate(x0, x1, s)
        b = teacher_no_grad(objective.teacher, i_s, s)
        if objective.emd_form == "semigradient":
            with torch.no_grad():
                _, advection = model.jvp(i_s, s, t, dx=b)
            _, ds_x = model.jvp(i_s, s, t, ds=1.0)
            return sq_norm(ds_x + advection)
        if objective.emd_form == "full":
            return sq_norm(model.jvp(i_s, s, t, dx=b, ds=1.0)[1])
        v, dv = model.v_jvp(i_s, s, t, dx=b, ds=1.0)
        return sq_norm(v - (b + expand_as_data(t - s, v) * dv).detach())
    if name == "fmm":
        i_t, di_t = interp(x0, x1, t)
        y = model(i_t, t, s)
        x_back, dt_x = model.jvp(y, s, t, dt=1.0)
        return sq_norm(dt_x - di_t) + objective.invertibility_weight * sq_norm(x_back - i_t)
    raise ValueError(name)


@pytest.fixture(scope="module")
def teachers():
    interp = fm.Linear()
    gmm = GaussianMixture(means=[[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], stds=[0.4, 0.3, 0.5],
                          weights=[0.5, 0.3, 0.2], interpolant=interp)
    net_teacher = FlowMap(random_mlp(99))
    net_teacher.requires_grad_(False)
    return interp, {"gmm": gmm, "net": net_teacher}


OBJECTIVES = ["velocity", "lmd", "lmd-full", "emd-semigradient", "emd-full", "emd-v", "fmm",
              "pfmm", "pfmm-frozen"]


def build_objective(name, interp, teacher):
    if name == "velocity":
        return Velocity(interp)
    if name == "lmd":
        return LMD(interp, teacher)
    if name == "lmd-full":
        return LMD(interp, teacher, semigradient=False)
    if name.startswith("emd-"):
        return EMD(interp, teacher, form=name.split("-", 1)[1])
    if name == "fmm":
        return FMM(interp, invertibility_weight=0.7)
    if name.startswith("pfmm"):
        return PFMM(interp, teacher, stage_steps=1 if name == "pfmm-frozen" else 100)
    raise ValueError(name)


@pytest.mark.parametrize("name, teacher_kind", [
    (name, kind) for name in OBJECTIVES for kind in ("net", "gmm")
    if not (kind == "gmm" and name in ("velocity", "fmm"))])  # those two take no teacher
def test_objective_gradient_is_unchanged_by_the_fused_path(teachers, name, teacher_kind):
    interp, available = teachers
    net = random_mlp(21)
    fused, plain = FlowMap(net), FlowMap(net, fused_jvp=False)
    objective = build_objective(name, interp, available[teacher_kind])
    if name == "pfmm-frozen":   # stage 1: the teacher is a frozen copy of the student
        objective.begin_step(fused, 1)
        assert objective.frozen is not None
    x1 = available["gmm"].sample(B, generator=torch.Generator().manual_seed(3), dtype=F64)

    def run(model):
        out = objective(model, x1, generator=torch.Generator().manual_seed(17))
        return out.loss, param_grads(out.loss, net)

    loss_fused, grad_fused = run(fused)
    loss_plain, grad_plain = run(plain)
    torch.testing.assert_close(loss_fused, loss_plain, **TOL)
    assert_grads_close(grad_fused, grad_plain)
    assert max(g.abs().max() for g in grad_fused if g is not None) > 1e-6

    if name.split("-")[0] in ("lmd", "emd", "fmm"):  # against the implementation before the fused path
        g = torch.Generator().manual_seed(17)
        x0 = interp.sample_base(x1, g)
        s, t = objective.times(B, x1, g)
        loss_ref = reference_terms(name, objective, plain, x0, x1, s, t).mean()
        torch.testing.assert_close(loss_fused, loss_ref, **TOL)
        assert_grads_close(grad_fused, param_grads(loss_ref, net))


def test_emd_semigradient_without_jvps_falls_back_to_two_passes(teachers):
    """A model object with only ``jvp`` (no ``jvps``) still works, through the two-JVP form."""
    interp, available = teachers
    net = random_mlp(22)

    class OnlyJvp:
        def __init__(self, model):
            self.model = model

        def jvp(self, *args, **kwargs):
            return self.model.jvp(*args, **kwargs)

    objective = EMD(interp, available["net"])
    x1 = available["gmm"].sample(B, generator=torch.Generator().manual_seed(4), dtype=F64)
    loss = objective(FlowMap(net), x1, generator=torch.Generator().manual_seed(8)).loss
    loss_fallback = objective(OnlyJvp(FlowMap(net)), x1,
                              generator=torch.Generator().manual_seed(8)).loss
    torch.testing.assert_close(loss, loss_fallback, **TOL)
    assert_grads_close(param_grads(loss, net), param_grads(loss_fallback, net))
