"""The papers' losses and time samplers, written again in each paper's own time convention and
variable names, independently of ``flowmaps.objectives`` (used by ``test_paper_references.py``).

Nothing here imports the library's objectives: every loss is a plain float64 function of a network
``net(x, s, t[, cond])`` (the library's ``v̂_{s,t}(x)``), of the batch and of the times, with forward-mode
derivatives from ``torch.func.jvp`` on plain closures (never the library's fused JVP). Each paper sees the
network through its own change of variables:

* [P1]/[P2] (Boffi et al.; LMD, EMD, LSD, ESD, PSD, CT) — the library's convention: ``t = 0`` base,
  ``t = 1`` data, ``I_t = (1 − t) x0 + t x1``, ``X_{s,t}(x) = x + (t − s) v_{s,t}(x)``, so
  ``v_{s,t}(x) = net(x, s, t)``. Sources: [P2] eqs. (13)–(15), (19), (22), (26)–(29), (39), (41);
  [C2] ``losses.py`` (``diagonal_term``, ``lsd_term``, ``esd_term``, ``psd_term``) and ``loss_args.py``
  (``_sample_diagonal``, ``_sample_triangle``, ``_get_diag_offdiag_bs``), as read in spec §3.1–3.4, App. A, C.
* MeanFlow (Geng et al.; Gsunshine/meanflow ``meanflow.py``, class ``MeanFlow``) — ``t = 1`` noise:
  ``z_t = (1 − t) x + t e`` (``x`` data, ``e`` noise), ``v = e − x``, average velocity ``u(z, r, t)`` with
  ``z_r = z_t − (t − r) u``. The library's network is read as ``u(z, r, t | y) := −net(z, 1 − t, 1 − r | y)``.
* Shortcut models (Frans et al.; kvfrans/shortcut-models ``targets_shortcut.get_targets``, ``train.py``)
  — ``t = 0`` noise as ours: ``x_t = (1 − t) x_0 + t x_1``, ``s_θ(x_t, t, d)`` the step of size ``d``,
  read as ``s_θ(x, t, d) := net(x, t, t + d)``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor
from torch.func import functional_call, jvp

F64 = torch.float64


def col(a: Tensor) -> Tensor:
    """A per-sample scalar as a column, to scale 2-D data ``(B, D)``."""
    return a[:, None]


def sum_sq(r: Tensor) -> Tensor:
    """Per-sample squared norm (sum over the data dimensions: [C2], MeanFlow)."""
    return r.pow(2).flatten(1).sum(1)


@contextlib.contextmanager
def mode(net: torch.nn.Module, train: bool):
    """Run ``net`` in train or eval mode (its dropout on or off), restoring the previous mode."""
    previous = net.training
    net.train(train)
    try:
        yield
    finally:
        net.train(previous)


# ------------------------------------------------------------------------------------------------
# [P2] eq. (19) / [C2]: the learned log-variance weight w(s, t)
# ------------------------------------------------------------------------------------------------

def learned_log_variance(weight: Tensor, bias: Tensor, s: Tensor, t: Tensor, channels: int = 128,
                         max_period: float = 1e4) -> Tensor:
    """``w(s, t) = Linear( MPsum(PosEmb(s), PosEmb(t)) )``, ``MPsum(a, b) = (a + b)/√2`` (spec §3.1: [C2]'s
    EDM2 variant, 128 channels, on ``(s, t)`` — not ``(s, t − s)``). ``PosEmb(τ) = [cos(τ f_k), sin(τ f_k)]``,
    ``f_k = max_period^{−k/64}``, ``k = 0..63``. EDM2 keeps its embeddings in fp32: the times and the
    frequencies enter rounded to fp32, everything after is float64."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=F64) / half).float().double()

    def pos_emb(tau: Tensor) -> Tensor:
        angles = col(tau.float().double()) * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    features = (pos_emb(s) + pos_emb(t)) / math.sqrt(2.0)
    return features @ weight.reshape(-1) + bias.reshape(())


def uncertainty_weighted(loss: Tensor, w: Tensor) -> Tensor:
    """[P2] eq. (19): ``e^{−w} ℓ + w`` per sample."""
    return torch.exp(-w) * loss + w


# ------------------------------------------------------------------------------------------------
# [P1]/[P2] in Boffi's convention (= the library's)
# ------------------------------------------------------------------------------------------------

class Boffi:
    """A network seen as [P2]'s ``v_{s,t}(x)``, its map ``X_{s,t}(x) = x + (t − s) v_{s,t}(x)`` and the
    linear interpolant ``I_t = (1 − t) x0 + t x1``, ``İ_t = x1 − x0`` ([P2]: all experiments linear)."""

    def __init__(self, net):
        self.net = net

    def v(self, s, t, x):
        return self.net(x, s, t)

    def X(self, s, t, x):
        return x + col(t - s) * self.v(s, t, x)

    def b(self, t, x):
        """The diagonal ``v_{t,t}(x)``: the learned velocity."""
        return self.v(t, t, x)

    @staticmethod
    def I(t, x0, x1):  # noqa: E743 - the papers' name
        return col(1 - t) * x0 + col(t) * x1

    @staticmethod
    def I_dot(x0, x1):
        return x1 - x0

    # --- jvps on plain closures -----------------------------------------------------------------
    def partial_t(self, s, t, x):
        """``(X_{s,t}(x), ∂_t X_{s,t}(x))``: one JVP in ``t`` ([C2] ``method="partial_t"``)."""
        return jvp(lambda t_: self.X(s, t_, x), (t,), (torch.ones_like(t),))

    def partial_s(self, s, t, x):
        return jvp(lambda s_: self.X(s_, t, x), (s,), (torch.ones_like(s),))[1]

    def grad_X_dot(self, s, t, x, b):
        """``∇X_{s,t}(x) · b``."""
        return jvp(lambda x_: self.X(s, t, x_), (x,), (b,))[1]


def p2_diagonal(model: Boffi, x0, x1, t):
    """[C2] ``diagonal_term``: ``|v_{t,t}(I_t) − İ_t|²`` (dropout on in their code; none in our nets)."""
    return sum_sq(model.b(t, Boffi.I(t, x0, x1)) - Boffi.I_dot(x0, x1))


def p2_lsd(model: Boffi, x0, x1, s, t):
    """[P2] eq. (13), [C2] ``lsd_term`` with ``stopgrad_type="convex"``: the transported point and the
    teacher ``v_{t,t}`` (current parameters) under sg; the gradient through ``∂_t X`` only."""
    i_s = Boffi.I(s, x0, x1)
    x_st, dt_x = model.partial_t(s, t, i_s)
    with torch.no_grad():
        b_eval = model.b(t, x_st.detach())
    return sum_sq(b_eval - dt_x)


def p2_esd(model: Boffi, x0, x1, s, t):
    """[P2] eq. (14), [C2] ``esd_term`` with ``stopgrad_type="full"``:
    ``∂_s X + sg(∇X · sg v_{s,s}(I_s))``."""
    i_s = Boffi.I(s, x0, x1)
    ds_x = model.partial_s(s, t, i_s)
    with torch.no_grad():
        b_eval = model.b(s, i_s)
        grad_x_b = model.grad_X_dot(s, t, i_s, b_eval)
    return sum_sq(ds_x + grad_x_b)


def p2_psd(model: Boffi, x0, x1, s, t, h):
    """[P2] eq. (15)/(22), [C2] ``psd_term`` (``"convex"``) with ``u = h s + (1 − h) t`` (``loss_args``:
    ``hbatch ~ U[0, 1]`` for PSD-U, ``u = (s + t)/2`` for PSD-M): ``φ_{s,t}(I_s)`` against
    ``sg((1 − h) φ_{s,u}(I_s) + h φ_{u,t}(X_{s,u}(I_s)))``."""
    i_s = Boffi.I(s, x0, x1)
    u = h * s + (1 - h) * t
    with torch.no_grad():
        phi_su = model.v(s, u, i_s)
        x_su = i_s + col(u - s) * phi_su
        phi_ut = model.v(u, t, x_su)
        teacher = col(1 - h) * phi_su + col(h) * phi_ut
    return sum_sq(model.v(s, t, i_s) - teacher)


def p2_ct(model: Boffi, x0, x1, s, t):
    """[P2] eq. (41), continuous-time consistency training: ``∂_s X_{s,t}(I_s) + sg(∇X_{s,t}(I_s) İ_s)``."""
    i_s = Boffi.I(s, x0, x1)
    ds_x = model.partial_s(s, t, i_s)
    with torch.no_grad():
        advection = model.grad_X_dot(s, t, i_s, Boffi.I_dot(x0, x1))
    return sum_sq(ds_x + advection)


def p1_lmd(model: Boffi, teacher, x0, x1, s, t):
    """[P2] eq. (27) (LMD of [P1], semigradient): ``|∂_t X_{s,t}(I_s) − sg(b̂_t(X_{s,t}(I_s)))|²``."""
    i_s = Boffi.I(s, x0, x1)
    x_st, dt_x = model.partial_t(s, t, i_s)
    with torch.no_grad():
        target = teacher(x_st.detach(), t)
    return sum_sq(dt_x - target)


def p1_emd(model: Boffi, teacher, x0, x1, s, t, form: str):
    """EMD of [P1] as [P2] restates it: eq. (29) ``"semigradient"`` ``∂_s X + sg(∇X b̂_s(I_s))``, eq. (28)
    ``"full"`` ``∂_s X + ∇X b̂_s(I_s)`` (one augmented JVP, gradient through both), eq. (39) ``"v"``
    ``v_{s,t}(I_s) − sg(b̂_s + (t − s)[∂_s v_{s,t} + ∇v_{s,t} b̂_s](I_s))``."""
    i_s = Boffi.I(s, x0, x1)
    with torch.no_grad():
        b = teacher(i_s, s)
    if form == "semigradient":
        ds_x = model.partial_s(s, t, i_s)
        with torch.no_grad():
            advection = model.grad_X_dot(s, t, i_s, b)
        return sum_sq(ds_x + advection)
    if form == "full":
        _, residual = jvp(lambda s_, x_: model.X(s_, t, x_), (s, i_s), (torch.ones_like(s), b))
        return sum_sq(residual)
    if form == "v":
        v_st = model.v(s, t, i_s)
        with torch.no_grad():
            _, dv = jvp(lambda s_, x_: model.v(s_, t, x_), (s, i_s), (torch.ones_like(s), b))
            target = b + col(t - s) * dv
        return sum_sq(v_st - target)
    raise ValueError(form)


# ------------------------------------------------------------------------------------------------
# MeanFlow: Gsunshine/meanflow, meanflow.py, MeanFlow.forward (ImageNet, JAX), in its own time
# ------------------------------------------------------------------------------------------------

def meanflow_official_loss(net, x, e, t, r, y=None, *, num_classes=None, omega=1.0, kappa=0.0,
                           t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01) -> Tensor:
    """MeanFlow's loss as its ImageNet code computes it, for given ``t, r`` (MF time, ``t = 1`` noise,
    ``t ≥ r``), data ``x``, noise ``e`` and labels ``y`` after ``cond_drop`` (label ``num_classes`` =
    null). ``guidance_eq="cfg"`` whenever ``y`` is given; the defaults are ``configs/default.py``'s
    ``norm_p = 1``, ``norm_eps = 0.01`` (ImageNet ``omega = 1``, ``kappa = 0.5`` must be passed).

    * ``u_fn(z, t, h=t − r, y, train=True)`` — the network, dropout on (train mode);
    * ``v_fn(z, t, y) = u_fn(z, t, h=0, y, train=False)`` — its instantaneous velocity, dropout off;
    * ``guidance_fn``: inside ``t ∈ [t_start, t_end]``, ``v_g = ω v + (1 − ω − κ) v_uncond + κ v_cond``
      (``κ > 0``) or ``v_uncond + ω (v − v_uncond)`` (``κ = 0``); outside, ``v_g = v``;
    * ``cond_drop``: samples with the null label regress on ``v`` (``v_g := v``);
    * ``u, du_dt = jvp(u_fn, (z_t, t, r), (v_g, 1, 0))``; ``u_tgt = sg(v_g − clip(t − r, 0, 1) du_dt)``;
    * ``loss_i = Σ (u − u_tgt)²`` over pixels; ``loss_i / sg((loss_i + norm_eps)^norm_p)``; batch mean.

    Every sample, ``r = t`` included, goes through the same formula (for ``r = t`` it is flow matching
    on ``v_g``)."""
    def call(z, tau_s, tau_t, labels):  # the library's network v̂_{s,t}(z | y)
        return net(z, tau_s, tau_t) if labels is None else net(z, tau_s, tau_t, cond=labels)

    def u_fn(z, t_, r_, labels, train=True):
        with mode(net, train):
            return -call(z, 1 - t_, 1 - r_, labels)

    def v_fn(z, t_, labels):
        return u_fn(z, t_, t_, labels, train=False)

    z_t = col(1 - t) * x + col(t) * e
    v = e - x
    v_g = v
    if y is not None:
        with torch.no_grad():
            y_null = torch.full_like(y, num_classes)
            v_uncond = v_fn(z_t, t, y_null)
            inside = (t >= t_start) & (t <= t_end)
            om = col(torch.where(inside, torch.tensor(omega, dtype=F64),
                                 torch.tensor(1.0, dtype=F64)))
            if kappa == 0:
                v_g = v_uncond + om * (v - v_uncond)
            else:
                v_cond = v_fn(z_t, t, y)
                ka = col(torch.where(inside, torch.tensor(kappa, dtype=F64),
                                     torch.tensor(0.0, dtype=F64)))
                v_g = om * v + (1 - om - ka) * v_uncond + ka * v_cond
            v_g = torch.where(col(y == num_classes), v, v_g)  # cond_drop
    u, du_dt = jvp(lambda z_, t_, r_: u_fn(z_, t_, r_, y), (z_t, t, r),
                   (v_g, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v_g - col((t - r).clamp(0.0, 1.0)) * du_dt).detach()
    loss = sum_sq(u - u_tgt)
    adp_wt = (loss + norm_eps) ** norm_p
    return (loss / adp_wt.detach()).mean()


def meanflow_sample_tr(bz: int, generator, P_mean=-0.4, P_std=1.0, data_proportion=0.75):
    """``MeanFlow.sample_tr`` (``noise_dist="logit_normal"``, ImageNet ``configs/default.py``): two
    logit-normal draws, ``t, r = max, min``; the first ``int(bz · data_proportion)`` samples get ``r = t``.
    MF time (``t = 1`` noise)."""
    def logit_normal():
        return torch.sigmoid(torch.randn(bz, generator=generator, dtype=F64) * P_std + P_mean)

    t, r = logit_normal(), logit_normal()
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    data_size = int(bz * data_proportion)
    zero_mask = torch.arange(bz) < data_size
    return t, torch.where(zero_mask, t, r)


# ------------------------------------------------------------------------------------------------
# Shortcut models: kvfrans/shortcut-models targets_shortcut.get_targets + train.update (t = 0 noise)
# ------------------------------------------------------------------------------------------------

def shortcut_official_loss(net, ema_params, x_0, x_1, t, dt, bootstrap, *, fm_dt=0.0, clip=4.0):
    """The shortcut loss for given per-sample start times ``t`` and step sizes ``dt`` (``2^{−dt_base}``
    on the ``bootstrap`` samples; the flow-matching samples ignore ``dt``):

    * ``x_t = (1 − t) x_0 + t x_1``, ``v_t = x_1 − x_0`` (their ``1 − (1 − 1e-5) t`` has
      ``σ_min = 10⁻⁵``; 0 here);
    * bootstrap (``call_model_ema``, EMA parameters, ``train=False``, no gradient):
      ``v_b1 = s(x_t, t, dt/2)``, ``x_t2 = clip(x_t + dt/2 · v_b1)``, ``v_b2 = s(x_t2, t + dt/2, dt/2)``,
      ``v_target = clip((v_b1 + v_b2)/2)``, trained at ``s_θ(x_t, t, dt)``;
    * flow matching: ``s_θ(x_t, t, fm_dt)`` against ``v_t`` (theirs conditions on ``dt = 1/128``, the
      library on its diagonal ``d = 0``: pass ``fm_dt``);
    * ``loss_fn``: ``mean((v_prime − v_t)², axis=pixels)``, then the plain batch mean.

    ``s_θ(x, t, d) := net(x, t, t + d)``. Returns ``(loss, clipped)``; ``clipped`` tells whether either
    clip changed a value."""
    def s_theta(x, t_, d, params=None):
        if params is None:
            return net(x, t_, t_ + d)
        return functional_call(net, params, (x, t_, t_ + d))

    x_t = col(1 - t) * x_0 + col(t) * x_1
    v_t = (x_1 - x_0).clone()
    dt_bootstrap = dt / 2
    with torch.no_grad():
        xb, tb, db = x_t[bootstrap], t[bootstrap], dt_bootstrap[bootstrap]
        v_b1 = s_theta(xb, tb, db, ema_params)
        x_t2 = xb + col(db) * v_b1
        x_t2c = x_t2.clamp(-clip, clip)
        v_b2 = s_theta(x_t2c, tb + db, db, ema_params)
        v_target = (v_b1 + v_b2) / 2
        v_targetc = v_target.clamp(-clip, clip)
        clipped = bool((x_t2c != x_t2).any() or (v_targetc != v_target).any())
        v_t[bootstrap] = v_targetc
    d_in = torch.where(bootstrap, dt, torch.full_like(dt, fm_dt))
    v_prime = s_theta(x_t, t, d_in)
    mse_v = (v_prime - v_t).pow(2).flatten(1).mean(1)
    return mse_v.mean(), clipped


def shortcut_sample_bootstrap(bootstrap_batchsize: int, generator, denoise_timesteps: int = 128):
    """``get_targets`` steps 1–2 (``bootstrap_dt_bias = 0``): levels ``dt_base = 6, 5, …, 0`` in equal
    shares (the remainder padded with level 0), ``dt = 2^{−dt_base}``, ``t = randint(0, 2^{dt_base}) /
    2^{dt_base}``. Returns ``(t, dt)``."""
    log2_sections = int(math.log2(denoise_timesteps))
    dt_base = torch.arange(log2_sections - 1, -1, -1).repeat_interleave(
        bootstrap_batchsize // log2_sections)
    dt_base = torch.cat([dt_base, torch.zeros(bootstrap_batchsize - dt_base.shape[0], dtype=torch.long)])
    dt = 1.0 / 2.0 ** dt_base.to(F64)
    dt_sections = 2 ** dt_base
    t = torch.floor(torch.rand(bootstrap_batchsize, generator=generator, dtype=F64)
                    * dt_sections.to(F64)) / dt_sections.to(F64)
    return t, dt


# ------------------------------------------------------------------------------------------------
# [C2] loss_args: the self-distillation time sampler
# ------------------------------------------------------------------------------------------------

def p2_times(bs: int, generator, diag_fraction: float = 0.75, tmin: float = 0.0, tmax: float = 1.0):
    """``get_loss_fn_args_randomness``: ``diag_bs = max(1, int(bs · diag_fraction))`` diagonal times
    ``U[tmin, tmax]`` (``_sample_diagonal``), then the off-diagonal pairs ``s = min, t = max`` of two
    uniforms (``_sample_triangle``), concatenated diagonal first. ``diag_fraction = 0`` (consistency
    training, LMD, EMD: no diagonal term) gives no diagonal samples."""
    diag_bs = max(1, int(bs * diag_fraction)) if diag_fraction > 0 else 0

    def uniform(n):
        return tmin + (tmax - tmin) * torch.rand(n, generator=generator, dtype=F64)

    t_diag = uniform(diag_bs)
    a, b = uniform(bs - diag_bs), uniform(bs - diag_bs)
    return (torch.cat([t_diag, torch.minimum(a, b)]), torch.cat([t_diag, torch.maximum(a, b)]),
            diag_bs)
