"""Reference two-time networks ``v_θ(x, s, t)`` for flow maps of vector data.

Every network here takes per-sample times ``s, t`` of shape ``(B,)`` (``t = 0`` base, ``t = 1`` data),
uses only smooth operations that have forward-mode rules (so ``torch.func.jvp`` works through it), and
has a zero-initialised output layer, so ``FlowMap(net)`` starts as the identity map.

:class:`MLP` also implements the optional fused forward-mode protocol of :class:`~flowmaps.FlowMap`:
``forward_and_jvp(x, s, t, dx, ds, dt, cond) -> (value, tangent)`` propagates the tangent beside the
primal layer by layer (Linear: ``W·dh``; activation: ``σ'(z)·dz``; Fourier features: ``cos``/``−sin``),
built from ordinary differentiable torch ops, so reverse mode through it is plain autograd (no
``torch.func`` transform; forward+backward about 0.6× the cost of reverse-over-``torch.func.jvp``); and
``forward_and_jvps`` carries several tangents on one primal pass (some of them under stop-gradient).
Under bf16 training :class:`~flowmaps.FlowMap` runs the fused passes with autocast off in fp32, so a pass
that carries a tangent is fp32 throughout, its primal included (spec addition E.12).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..flowmap import register_network

__all__ = ["TimeFeatures", "MLP"]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "softplus": nn.Softplus}

Tangent = tuple  # (dx, ds, dt): each a tensor or None (zero)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _GeluTangents(torch.autograd.Function):
    """Exact (erf) GELU with tangents ``(gelu(z), g, dz_1·g, …)``, ``g = gelu'(z) = Φ(z) + zφ(z)``.

    Backward: ``∂/∂z = gh·g + Σ_k gdh_k·q_k`` with ``q_k = dz_k·gelu''(z)``,
    ``gelu''(z) = φ(z)(2 − z²)``, and ``∂/∂dz_k = gdh_k·g``. ``q_k`` is formed in the forward pass, and
    only ``g`` and ``q_k`` are saved, so the backward is three elementwise passes; plain autograd through
    ``gelu_backward`` would run PyTorch's composite ``gelu_double_backward`` (a dozen unfused passes,
    several times slower on a CPU, where these passes are memory-bound). The values are those of
    ``torch.func.jvp`` (``g`` is ``gelu_backward`` of ones). ``g`` is returned (non-differentiable) for
    stop-gradient tangents. First-order only: a second backward through it raises.
    """

    # Old-style forward(ctx, ...): with a separate setup_context, Function.apply re-binds the
    # arguments through inspect.signature on every call (~40 µs each here).
    @staticmethod
    def forward(ctx, z: Tensor, offset: int, *dzs: Tensor):
        # The tangents dz_k describe rows offset: of z (offset 0: all rows).
        g = torch.ops.aten.gelu_backward(torch.ones_like(z), z)
        g_tail = g[offset:]
        qs = []
        # The curvature term of ∂(dz·g(z))/∂z is needed whenever z needs a gradient, whether or not dz
        # does (e.g. a frozen first layer: its tangent is a constant, its pre-activation is not).
        if ctx.needs_input_grad[0] and dzs:
            z2 = z[offset:] * z[offset:]
            curvature = z2.mul(-0.5).exp_().mul_(z2.neg_().add_(2.0).mul_(_INV_SQRT_2PI))
            del z2
            qs = [dz * curvature for dz in dzs]
        ctx.offset = offset
        ctx.save_for_backward(g, *qs)
        ctx.mark_non_differentiable(g)
        ctx.set_materialize_grads(False)
        return (F.gelu(z), g, *[dz * g_tail for dz in dzs])

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, _gg, *gdhs):
        g, *qs = ctx.saved_tensors
        offset = ctx.offset
        need_z = ctx.needs_input_grad[0]
        grad_z = gh * g if (gh is not None and need_z) else None
        grads_dz = []
        for k, gdh in enumerate(gdhs):
            if gdh is None:
                grads_dz.append(None)
                continue
            if need_z and qs:
                if grad_z is None:
                    grad_z = torch.zeros_like(g)
                grad_z[offset:].addcmul_(gdh, qs[k])
            grads_dz.append(gdh * g[offset:] if ctx.needs_input_grad[2 + k] else None)
        return (grad_z, None, *grads_dz)


def activation_jvp(act: nn.Module, z: Tensor, value: Tensor, dz: Tensor) -> Tensor:
    """Tangent ``σ'(z) · dz`` of an elementwise activation with ``value = σ(z)``.

    Uses the same formulas as PyTorch's forward-mode rules (``gelu_backward`` is the exact erf GELU
    derivative ``Φ(z) + z φ(z)``), written with differentiable ops so reverse mode works through them.
    """
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(dz, z, approximate=act.approximate)
    if isinstance(act, nn.Tanh):
        return torch.ops.aten.tanh_backward(dz, value)
    if isinstance(act, nn.Softplus):
        return torch.ops.aten.softplus_backward(dz, z, act.beta, act.threshold)
    if isinstance(act, nn.SiLU):  # silu_backward has no derivative; this is PyTorch's
        sig = torch.sigmoid(z)    # infinitely differentiable form of the same formula
        return dz * sig * (1.0 + z * (1.0 - sig))
    raise NotImplementedError(f"no forward-mode rule for {type(act).__name__}")


class TimeFeatures(nn.Module):
    """Fourier features of a scalar time: ``[τ, sin(2π f_k τ), cos(2π f_k τ)]_k``.

    Frequencies ``f_k`` are log-spaced from ``min_frequency`` to ``max_frequency``. Smooth in ``τ``, so
    time-JVPs are exact and well scaled (a smooth, bounded ``∂_τ`` matters for the Lagrangian losses).
    """

    def __init__(self, n_frequencies: int = 8, min_frequency: float = 0.25,
                 max_frequency: float = 8.0):
        super().__init__()
        freqs = torch.logspace(math.log10(min_frequency), math.log10(max_frequency), n_frequencies)
        self.register_buffer("frequencies", 2 * math.pi * freqs, persistent=False)
        self.dim = 1 + 2 * n_frequencies

    def forward(self, tau: Tensor) -> Tensor:
        # Kept in fp32 under autocast: high frequencies of a bf16 time lose the time's low digits.
        with torch.autocast(tau.device.type, enabled=False):
            tau = tau.float() if tau.dtype in (torch.bfloat16, torch.float16) else tau
            angles = tau[:, None] * self.frequencies.to(tau.dtype)
            return torch.cat([tau[:, None], angles.sin(), angles.cos()], dim=1)

    def forward_and_jvps(self, tau: Tensor, dtaus: Sequence[Tensor | None]
                         ) -> tuple[Tensor, list[Tensor | None]]:
        """``(φ(τ), [φ'(τ)·dτ_k])`` for per-sample tangents ``dτ_k`` of shape ``(B,)`` (``None``: 0).

        ``φ' = [1, 2πf cos(2πf τ), −2πf sin(2πf τ)]``; ``sin``/``cos`` are shared with the primal.
        """
        freqs = self.frequencies.to(tau.dtype)
        angles = tau[:, None] * freqs
        sin, cos = angles.sin(), angles.cos()
        value = torch.cat([tau[:, None], sin, cos], dim=1)
        tangents: list[Tensor | None] = []
        for dtau in dtaus:
            if dtau is None:
                tangents.append(None)
                continue
            d_angles = dtau[:, None] * freqs
            tangents.append(torch.cat([dtau[:, None], d_angles * cos, -(d_angles * sin)], dim=1))
        return value, tangents


_COMPILED: dict = {}


def _compiled_forward_and_jvps(backend: str = "inductor"):
    """``torch.compile`` of :meth:`MLP._forward_and_jvps` with ``backend``, built on first use and shared
    by every MLP (the module is an argument, so copies and EMA/frozen snapshots use their own weights)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(MLP._forward_and_jvps, backend=backend)
    return _COMPILED[backend]


@register_network
class MLP(nn.Module):
    """Two-time MLP ``v_θ(x, s, t)`` for vectors of any dimension.

    Input: ``[x / σ_data, φ(s), φ(t − s), cond]`` where ``φ`` are :class:`TimeFeatures` (spec Q4:
    ``(s, t − s)`` conditioning); ``depth`` hidden layers of width ``width``; output multiplied by
    ``σ_data`` and produced by a zero-initialised linear layer (identity map at initialisation).
    Inputs of shape ``(B, *shape)`` are flattened and the output is reshaped back.

    Args:
        dim: number of features per sample (product of the sample shape).
        width: hidden width.
        depth: number of hidden layers.
        activation: ``"gelu"`` (default; smooth, needed by the Eulerian losses, spec Appendix B),
            ``"silu"``, ``"tanh"`` or ``"softplus"``.
        sigma_data: scalar or per-dimension data scale for the pre/post scaling.
        cond_dim: size of an optional conditioning vector appended to the input.
        n_frequencies: number of Fourier time features (see :class:`TimeFeatures`); ``0`` (default)
            feeds the raw times ``s`` and ``t − s`` only. Measured on the LMD maps of
            ``benchmarks/quality_per_budget.py``: 8 frequencies up to 8 cycles per unit time gave
            1.5–2.6× larger 1-step errors than raw times (gmm_hard, 2000 steps; the checkerboard with an
            EMA), so Fourier features are opt-in.
        max_frequency: the highest of those frequencies, in cycles per unit time.
        skip: residual connections around every hidden layer after the first,
            ``h ← h + σ(W h + c)`` (same parameters and state-dict keys as without).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 4, activation: str = "gelu",
                 sigma_data: float | Tensor = 1.0, cond_dim: int = 0, n_frequencies: int = 0,
                 max_frequency: float = 8.0, skip: bool = False):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError("dim, width and depth must be positive")
        if n_frequencies < 0:
            raise ValueError("n_frequencies must be >= 0")
        self.skip = bool(skip)
        self.dim, self.cond_dim = dim, cond_dim
        self.time_features = TimeFeatures(n_frequencies, max_frequency=max_frequency)
        sigma = torch.as_tensor(sigma_data, dtype=torch.float32).reshape(-1)
        if sigma.numel() not in (1, dim) or (sigma <= 0).any():
            raise ValueError(f"sigma_data must be positive with 1 or {dim} entries")
        self.register_buffer("sigma_data", sigma.expand(dim).clone())
        layers: list[nn.Module] = []
        fan_in = dim + 2 * self.time_features.dim + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), _ACTIVATIONS[activation]()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.compiled_jvp = False  # see compile_jvp

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"network expects {self.dim} features per sample, got {flat.shape[1]}")
        sigma = self.sigma_data.to(flat.dtype)
        parts = [flat / sigma, self.time_features(s.to(flat.dtype)),
                 self.time_features((t - s).to(flat.dtype))]
        if self.cond_dim:
            if cond is None:
                raise ValueError("this network was built with cond_dim > 0 and needs cond")
            parts.append(cond.reshape(shape[0], -1).to(flat.dtype))
        h = torch.cat(parts, dim=1)
        if not self.skip:
            h = self.body(h)
        else:
            for i, (linear, act) in enumerate(self._blocks()):
                z = act(linear(h))
                h = h + z if i else z
        out = self.out(h) * sigma
        return out.reshape(shape)

    def _blocks(self) -> list[tuple[nn.Module, nn.Module]]:
        """The hidden layers as (Linear, activation) pairs."""
        layers = list(self.body)
        return list(zip(layers[0::2], layers[1::2]))

    # --- fused forward-mode pass (the optional protocol of FlowMap.v_jvp) ----------------------------
    def forward_and_jvp(self, x: Tensor, s: Tensor, t: Tensor, dx: Tensor | None = None,
                        ds: Tensor | None = None, dt: Tensor | None = None,
                        cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v(x, s, t), ∂v·(dx, ds, dt))`` in one pass; ``None`` tangents are zero.

        Equals ``torch.func.jvp`` of :meth:`forward` (same per-op formulas), but is built from ordinary
        differentiable ops, so gradients flow through both outputs with plain autograd.
        """
        value, (tangent,) = self.forward_and_jvps(x, s, t, [(dx, ds, dt)], cond)
        return value, tangent

    def forward_and_jvps(self, x: Tensor, s: Tensor, t: Tensor, tangents: Sequence[Tangent],
                         cond: Tensor | None = None, detach: Sequence[bool] | None = None,
                         offset: int = 0) -> tuple[Tensor, list[Tensor]]:
        """One primal pass carrying several tangents ``(dx, ds, dt)``; returns ``(value, [tangent_k])``.

        ``detach[k]`` computes tangent ``k`` under stop-gradient (from detached weights and
        activations, so no graph is recorded for it) — the same values as a separate JVP under
        ``torch.no_grad()``, at the cost of the tangent propagation only (the primal is shared).
        ``offset``: the tangents concern rows ``offset:`` only (their tensors have that many rows, and so
        have the returned tangents); the primal covers the whole batch. One pass then serves rows that
        need a value only (a flow-matching diagonal) beside rows that need a JVP, in one set of matmuls.
        """
        detach = [False] * len(tangents) if detach is None else [bool(d) for d in detach]
        if len(detach) != len(tangents):
            raise ValueError("detach needs one flag per tangent")
        tangents = [tuple(tangent) for tangent in tangents]
        offset = int(offset)
        if not 0 <= offset < x.shape[0]:
            raise ValueError(f"offset must lie in [0, batch), got {offset} for a batch of {x.shape[0]}")
        if getattr(self, "compiled_jvp", False):
            backend = getattr(self, "compile_backend", "inductor")
            return _compiled_forward_and_jvps(backend)(self, x, s, t, tangents, cond, detach, offset)
        return self._forward_and_jvps(x, s, t, tangents, cond, detach, offset)

    def compile_jvp(self, enable: bool = True, backend: str = "inductor") -> "MLP":
        """Opt-in: run the fused forward+JVP pass through ``torch.compile`` (fuses the elementwise work
        of the tangent propagation and its backward). The first calls compile (tens of seconds on a
        CPU, again for new batch sizes or tangent patterns); it pays off only for long runs — measure
        with ``benchmarks/training_cost.py --compile``. Plain :meth:`forward` is not compiled.
        ``backend``: torch.compile's backend (``"inductor"`` generates C++/Triton kernels;
        ``"aot_eager"`` traces without code generation, no compiler needed)."""
        self.compiled_jvp = bool(enable)
        self.compile_backend = str(backend)
        return self

    def _forward_and_jvps(self, x: Tensor, s: Tensor, t: Tensor, tangents: list, cond: Tensor | None,
                          detach: list[bool], offset: int = 0) -> tuple[Tensor, list[Tensor]]:
        shape = x.shape
        batch = shape[0]
        tail = batch - offset
        flat = x.reshape(batch, -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"network expects {self.dim} features per sample, got {flat.shape[1]}")
        dtype = flat.dtype
        sigma = self.sigma_data.to(dtype)
        cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
        tangents = [(dx, cast(ds), cast(dt)) for dx, ds, dt in tangents]
        d_gaps = [None if dt is None and ds is None else dt if ds is None else
                  -ds if dt is None else dt - ds for _, ds, dt in tangents]
        d_s = [ds for _, ds, _ in tangents]
        phi_s, dphi_s = self.time_features.forward_and_jvps(s.to(dtype), d_s if not offset else [])
        phi_gap, dphi_gap = self.time_features.forward_and_jvps((t - s).to(dtype),
                                                                d_gaps if not offset else [])
        if offset:  # the time features' tangents on the tangent rows only
            _, dphi_s = self.time_features.forward_and_jvps(s[offset:].to(dtype), d_s)
            _, dphi_gap = self.time_features.forward_and_jvps((t - s)[offset:].to(dtype), d_gaps)
        parts = [flat / sigma, phi_s, phi_gap]
        if self.cond_dim:
            if cond is None:
                raise ValueError("this network was built with cond_dim > 0 and needs cond")
            parts.append(cond.reshape(batch, -1).to(dtype))
        h = torch.cat(parts, dim=1)
        dhs = []
        for k, (dx, _, _) in enumerate(tangents):
            tparts = [torch.zeros_like(flat[offset:]) if dx is None else
                      dx.reshape(tail, -1).to(dtype) / sigma,
                      torch.zeros_like(phi_s[offset:]) if dphi_s[k] is None else dphi_s[k],
                      torch.zeros_like(phi_gap[offset:]) if dphi_gap[k] is None else dphi_gap[k]]
            if self.cond_dim:
                tparts.append(torch.zeros_like(parts[-1][offset:]))
            dh = torch.cat(tparts, dim=1)
            dhs.append(dh.detach() if detach[k] else dh)
        for i, (linear, act) in enumerate(self._blocks()):
            h_in, dhs_in = h, dhs
            h = linear(h)
            dhs = [F.linear(dh, linear.weight.detach() if stop else linear.weight)
                   for dh, stop in zip(dhs, detach)]
            if isinstance(act, nn.GELU) and act.approximate == "none":
                live = [k for k, stop in enumerate(detach) if not stop]
                h, g, *live_dhs = _GeluTangents.apply(h, offset, *[dhs[k] for k in live])
                live_dhs = dict(zip(live, live_dhs))  # g carries no graph: stop-gradient tangents
                dhs = [live_dhs[k] if k in live_dhs else dh * g[offset:] for k, dh in enumerate(dhs)]
            else:
                z, h = h, act(h)
                z_t, h_t = z[offset:], h[offset:]
                dhs = [activation_jvp(act, z_t.detach(), h_t.detach(), dh) if stop
                       else activation_jvp(act, z_t, h_t, dh) for dh, stop in zip(dhs, detach)]
            if self.skip and i:
                h = h_in + h
                dhs = [a + b for a, b in zip(dhs_in, dhs)]
        value = (self.out(h) * sigma).reshape(shape)
        outs = [(F.linear(dh, self.out.weight.detach() if stop else self.out.weight) * sigma
                 ).reshape((tail,) + tuple(shape[1:])) for dh, stop in zip(dhs, detach)]
        return value, outs
