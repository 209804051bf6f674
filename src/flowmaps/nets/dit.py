"""A two-time diffusion transformer (DiT) ``v_θ(x, s, t)`` for flow maps of images or latents ``(B, C, H, W)``.

The flow map is ``X_{s,t}(x) = x + (t − s) · σ_data · DiT(x / σ_data; s, t − s)``: :class:`~flowmaps.FlowMap`
adds the ``x + (t − s)`` part, and :class:`DiT` is the network ``v`` (its forward includes the ``σ_data``
pre/post scaling, as the U-Net's does). Time convention: ``t = 0`` base (noise), ``t = 1`` data; times are
per-sample tensors of shape ``(B,)``.

Architecture (DiT, Peebles & Xie 2023, with the two-time conditioning of the U-Net, spec §5.2.2):

* patchify: a ``p × p`` stride-``p`` convolution to ``width`` channels, tokens ``N = (H/p)(W/p)``, plus a
  fixed 2-D sin-cos positional embedding (MAE/DiT: half the channels encode the column, half the row);
* conditioning ``c = E_s(s) + E_gap(t − s) [+ E_y(label)] [+ E_ω(1 − 1/ω, lo, hi)]``: each time goes through a
  sinusoidal positional embedding (``freq_dim`` features, ``max_period`` 10⁴, times multiplied by
  ``time_scale``), Linear → SiLU → Linear; the class table has a null row ``num_classes`` for
  classifier-free guidance; the guidance-condition embedding (improved MeanFlow, :mod:`.guidance`) is a
  zero-initialised linear layer, so a new guidance-conditioned DiT equals the plain one. The embedding math
  runs in fp32 (float64 for a float64 network) with autocast off;
* ``depth`` adaLN-zero blocks: ``(γ₁, β₁, α₁, γ₂, β₂, α₂) = Linear(SiLU(c))`` (zero-initialised), then
  ``h ← h + α₁ · Attn(LN(h)(1 + γ₁) + β₁)`` and ``h ← h + α₂ · MLP(LN(h)(1 + γ₂) + β₂)``; multi-head
  self-attention with QK-norm (RMSNorm or LayerNorm on each head's queries and keys), an MLP of ratio
  ``mlp_ratio`` with tanh-GELU;
* a final adaLN layer (``LN(h)(1 + γ) + β``) and a linear layer to ``p·p·C`` per token, both zero-initialised,
  then unpatchify. The output is exactly 0 at initialisation, so ``FlowMap(DiT(...))`` starts as the identity.

Attention and forward mode. PyTorch's fused ``scaled_dot_product_attention`` kernels have no forward-mode
rule (on torch 2.13's CPU the flash kernel raises under ``torch.func.jvp`` and under
``torch.autograd.forward_ad``). ``attention="auto"`` (default) uses the fused kernel for plain passes and the
explicit math path ``softmax(q kᵀ/√d) v`` whenever a forward-mode derivative is being taken; the network
knows it from the tensors themselves: inside ``torch.func`` transforms they are functorch-wrapped
(``torch._C._functorch.is_functorch_wrapped_tensor``), and under ``torch.autograd.forward_ad`` a dual level
is open. (Inside ``vmap``/``grad`` transforms the math path is used too: correct, only slower.)
``"math"`` always uses the explicit path, ``"sdpa"`` always the fused kernel (forward mode then fails unless
``jvp="fd"``).

JVPs. :meth:`DiT.forward_and_jvp` (the optional protocol of :meth:`FlowMap.v_jvp`) returns
``(v, ∂v·(dx, ds, dt))``: with ``jvp="exact"`` (default) from ``torch.func.jvp`` (the math attention path,
the same values as FlowMap's own fallback); with ``jvp="fd"`` from the central finite difference that
FastGen offers for kernels without a forward-mode rule,
``∂v·u ≈ (v(z + h u) − v(z − h u)) / 2h``, ``z = (x, s, t)``, ``u = (dx, ds, dt)``, with a per-sample step
``h = fd_eps / max(rms(dx), |ds|, |dt|)`` (so ``fd_eps`` is the size of the input perturbation). The three
evaluations run as one batch of ``3B`` through the fused attention kernel; reverse mode through them is plain
autograd. Its error is ``O(h²)`` truncation plus ``O(ε_mach/h)`` round-off (``tests/test_dit.py`` measures it
against the exact JVP); in fp32 the default ``fd_eps = 3e-3`` sat at the measured minimum, a relative error of
about 5e-5 (``benchmarks/dit_jvp.py``, spec addition E.9).

Precision (spec addition E.12, :mod:`flowmaps.precision`). Under bf16 autocast a plain pass runs its
patch embedding, linear layers and attention (the fused kernel included) in bf16, with the conditioning
embedding in fp32 (autocast off) and the QK-norm in the weights' precision; the output is bf16.
:class:`~flowmaps.FlowMap` runs :meth:`DiT.forward_and_jvp` (both modes) with autocast off in full fp32
while its ``jvp_fp32`` is on: the finite difference above would have a round-off error of
``2^-8 / h ≈ 1`` in bf16, a tangent of noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from .._tensor import jvp_of_inputs
from ..flowmap import register_network
from .guidance import check_image_inputs, class_labels, guidance_features, is_guidance_condition
from .unet import PositionalEmbedding

__all__ = ["DiT", "DIT_SIZES", "parse_dit_size", "forward_mode_active"]

# DiT's sizes (Peebles & Xie, Table 1): (width, depth, heads); patch 2, 4 or 8 is chosen separately.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
"""DiT's sizes by name (Peebles & Xie, Table 1): ``(width, depth, heads)`` of DiT-S, -B, -L and -XL;
the patch (2, 4 or 8) is chosen separately, as in ``"B/2"``."""
QK_NORMS = ("rms", "layer", "none")
ATTENTION_MODES = ("auto", "math", "sdpa")
JVP_MODES = ("exact", "fd")


def parse_dit_size(size: str) -> tuple[str, int | None]:
    """``"B/2"`` → ``("B", 2)``, ``"XL"`` → ``("XL", None)``; a ``ValueError`` names the sizes."""
    name, _, patch = str(size).partition("/")
    name = name.upper()
    if name not in DIT_SIZES or (patch and not patch.isdigit()):
        raise ValueError(f"unknown DiT size {size!r}; use one of {', '.join(DIT_SIZES)}, optionally with "
                         "a patch such as 'B/2'")
    return name, int(patch) if patch else None


def forward_mode_active(tensor: Tensor) -> bool:
    """Whether a forward-mode derivative may be flowing through ``tensor``: it is wrapped by a
    ``torch.func`` transform (``jvp``; also ``vmap``/``grad``), or a ``torch.autograd.forward_ad`` dual
    level is open. Both are private torch APIs (checked on torch 2.13 by tests/test_dit.py); where one is
    missing the answer is ``True``: the math path is always correct, only slower."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    level = getattr(forward_ad, "_current_level", None)
    if wrapped is None or level is None:
        return True
    return bool(wrapped(tensor)) or level >= 0


def sincos_2d(width: int, rows: int, cols: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding ``(rows·cols, width)`` (MAE/DiT): the first half of the channels
    is the 1-D embedding ``[sin(p ω_k), cos(p ω_k)]`` of the column, the second half of the row,
    ``ω_k = 10000^(−k / (width/4))``. Tokens are in row-major order."""
    quarter = width // 4
    omega = 1.0 / 10_000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_d(pos: Tensor) -> Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                              torch.arange(cols, dtype=torch.float64), indexing="ij")
    return torch.cat([one_d(col.reshape(-1)), one_d(row.reshape(-1))], dim=1).float()


def _qk_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    return nn.Identity()


class _Attention(nn.Module):
    """Multi-head self-attention over tokens with QK-norm; fused SDPA or the explicit math path."""

    def __init__(self, width: int, heads: int, qk_norm: str):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor, mode: str) -> Tensor:
        batch, tokens, width = h.shape
        q, k, v = self.qkv(h).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if q.dtype != self.qkv.weight.dtype:  # autocast: QK-norm in the weights' precision (fp32)
            work = self.qkv.weight.dtype
            q, k = self.q_norm(q.to(work)).to(v.dtype), self.k_norm(k.to(work)).to(v.dtype)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        if mode == "math" or (mode == "auto" and forward_mode_active(q)):
            weights = (torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(dim=-1)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _Block(nn.Module):
    """adaLN-zero transformer block: attention and MLP, each modulated and gated by the conditioning."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        for layer in (self.attn.qkv, self.attn.proj, self.mlp[0], self.mlp[2]):  # DiT's initialisation
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.ada = nn.Linear(width, 6 * width)  # adaLN-zero: the block starts as the identity
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: Tensor, c: Tensor, mode: str) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attn(torch.addcmul(shift1, self.norm1(h), 1.0 + scale1), mode)
        return h + gate2 * self.mlp(torch.addcmul(shift2, self.norm2(h), 1.0 + scale2))


@register_network
class DiT(nn.Module):
    """Two-time diffusion transformer ``v_θ(x, s, t[, cond])``, conditioned on ``(s, t − s)``.

    Computes ``σ_data · DiT(x / σ_data; s, t − s)``; wrapped in :class:`~flowmaps.FlowMap` it gives
    ``X_{s,t}(x) = x + (t − s) · σ_data · DiT(x / σ_data; s, t − s)`` (``t = 0`` base, ``t = 1`` data). The
    output layers are zero-initialised, so the map starts as the identity. See the module docstring for the
    layout, the attention paths and the JVP modes.

    Args:
        image_shape: ``(C, H, W)`` of one sample; ``H`` and ``W`` must be multiples of ``patch``.
        patch: patch side ``p`` (DiT: 2, 4 or 8).
        width: token width, a multiple of 4 (the 2-D positional embedding) and of ``heads``. The
            defaults of ``width``, ``depth`` and ``heads`` are DiT-S; named sizes: :meth:`from_size`.
        depth: number of transformer blocks.
        heads: attention heads (dividing ``width``).
        mlp_ratio: MLP hidden width over ``width`` (4 in DiT).
        num_classes: ``> 0`` adds a class embedding with ``num_classes + 1`` rows; row ``num_classes`` is the
            null (unconditional) label, :attr:`null_label`.
        qk_norm: ``"rms"`` (RMSNorm on each head's q and k, default), ``"layer"`` (LayerNorm) or ``"none"``.
        sigma_data: data scale of the pre/post scaling (0.5 for pixels in ``[−1, 1]``; about 1 for VAE
            latents multiplied by the VAE's scaling factor).
        time_scale: the sinusoidal time embedding takes the times ``s`` and ``t − s`` multiplied by this.
        max_period: the longest period of that embedding.
        freq_dim: its number of features.
        guidance_conditioning: also take the guidance condition ``[label, ω, lo, hi]`` of
            :mod:`flowmaps.nets.guidance` (improved MeanFlow); needs ``num_classes > 0``.
        attention: ``"auto"`` | ``"math"`` | ``"sdpa"`` (see the module docstring).
        jvp: ``"exact"`` (``torch.func.jvp``) or ``"fd"`` (central finite difference) for
            :meth:`forward_and_jvp`.
        fd_eps: input-space step of the finite-difference JVP.

    ``forward(x, s, t, cond=None)``: ``x`` of shape ``(B, C, H, W)``, ``s`` and ``t`` of shape ``(B,)``;
    ``cond`` an integer tensor ``(B,)`` of labels in ``[0, num_classes]``, or a ``(B, 4)`` guidance
    condition; ``None`` means the null label.
    """

    def __init__(self, image_shape: Sequence[int], patch: int = 2, width: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0, qk_norm: str = "rms",
                 sigma_data: float = 0.5, time_scale: float = 1.0, max_period: float = 10_000.0,
                 freq_dim: int = 256, guidance_conditioning: bool = False, attention: str = "auto",
                 jvp: str = "exact", fd_eps: float = 3e-3):
        super().__init__()
        image_shape = tuple(int(n) for n in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive entries, got {image_shape}")
        patch, width, depth, heads = int(patch), int(width), int(depth), int(heads)
        if patch < 1 or width < 1 or depth < 1 or heads < 1:
            raise ValueError(f"patch, width, depth and heads must be positive, got {patch}, {width}, "
                             f"{depth}, {heads}")
        channels, height, side = image_shape
        if height % patch or side % patch:
            raise ValueError(f"image size {height}x{side} is not divisible by the patch {patch}")
        if width % heads:
            raise ValueError(f"heads {heads} does not divide the width {width}")
        if width % 4:
            raise ValueError(f"width must be a multiple of 4 (2-D sin-cos positions), got {width}")
        if not (math.isfinite(float(mlp_ratio)) and float(mlp_ratio) > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio}")
        if int(num_classes) < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {qk_norm!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        if jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {', '.join(JVP_MODES)}, got {jvp!r}")
        for name, value in (("sigma_data", sigma_data), ("time_scale", time_scale), ("fd_eps", fd_eps)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (math.isfinite(float(max_period)) and float(max_period) > 1):
            raise ValueError(f"max_period must be a number > 1, got {max_period}")
        if int(freq_dim) < 2:
            raise ValueError(f"freq_dim must be at least 2, got {freq_dim}")
        if guidance_conditioning and int(num_classes) < 1:
            raise ValueError("guidance_conditioning needs a class-conditional network (num_classes > 0)")

        self.image_shape = image_shape
        self.patch = patch
        self.grid = (height // patch, side // patch)
        self.sigma_data = float(sigma_data)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.attention = attention
        self.jvp = jvp
        self.fd_eps = float(fd_eps)

        # Conditioning.
        self.pos_embedding = PositionalEmbedding(int(freq_dim), max_period, time_scale)
        freq = self.pos_embedding.dim

        def time_mlp() -> nn.Sequential:
            mlp = nn.Sequential(nn.Linear(freq, width), nn.SiLU(), nn.Linear(width, width))
            for layer in (mlp[0], mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            return mlp

        self.emb_s = time_mlp()
        self.emb_gap = time_mlp()
        self.emb_class = None
        if self.num_classes:
            self.emb_class = nn.Embedding(self.num_classes + 1, width)
            nn.init.normal_(self.emb_class.weight, std=0.02)
        self.emb_guidance = None
        if guidance_conditioning:
            self.emb_guidance = nn.Linear(3 * freq, width)
            nn.init.zeros_(self.emb_guidance.weight)
            nn.init.zeros_(self.emb_guidance.bias)

        # Tokens.
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.register_buffer("positions", sincos_2d(width, *self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(_Block(width, heads, float(mlp_ratio), qk_norm) for _ in range(depth))
        fan = self.patch_embed.weight
        nn.init.xavier_uniform_(fan.view(fan.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

        # Final adaLN layer and linear projection, zero-initialised (v = 0 at initialisation).
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(width, 2 * width)
        self.linear_out = nn.Linear(width, patch * patch * channels)
        for layer in (self.ada_out, self.linear_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_size(cls, size: str, image_shape: Sequence[int], **overrides) -> "DiT":
        """A DiT of a named size: ``"S"``, ``"B"``, ``"L"``, ``"XL"`` (DiT's widths, depths and heads),
        optionally with the patch, ``"B/2"``, ``"XL/2"``; keyword ``overrides`` replace any setting (e.g.
        ``width=32, depth=2, heads=2`` for a CPU-sized network with the size's other settings)."""
        name, patch = parse_dit_size(size)
        width, depth, heads = DIT_SIZES[name]
        options = dict(width=width, depth=depth, heads=heads)
        if patch is not None:
            options["patch"] = patch
        options.update(overrides)
        return cls(image_shape, **options)

    # --- conditioning ---------------------------------------------------------------------------------
    def embedding(self, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The conditioning vector ``c`` ``(B, width)`` of ``(s, t − s)``, the label and the guidance
        condition, computed with autocast off in fp32 (float64 for a float64 network)."""
        with torch.autocast(s.device.type, enabled=False):
            work = torch.promote_types(self.emb_s[0].weight.dtype, torch.float32)
            s = s.to(work)
            emb = self.emb_s(self.pos_embedding(s)) + self.emb_gap(self.pos_embedding(t.to(work) - s))
            if self.emb_guidance is not None and is_guidance_condition(cond):
                labels, features = guidance_features(cond, self.pos_embedding, work)
                emb = emb + self.emb_guidance(features)
                cond = labels
            if self.emb_class is not None:
                emb = emb + self.emb_class(self._labels(cond, s.shape[0], s.device)).to(work)
            elif cond is not None:
                raise ValueError("this DiT was built with num_classes=0 and takes no cond")
            return emb

    def _labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        return class_labels(cond, batch, device, self.null_label, self.emb_guidance is not None)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``σ_data · DiT(x / σ_data; s, t − s)`` for ``x`` of shape ``(B, C, H, W)``, times ``(B,)``."""
        check_image_inputs("DiT", x, s, t, self.image_shape)
        c = F.silu(self.embedding(s, t, cond))
        h = self.patch_embed(x / self.sigma_data).flatten(2).transpose(1, 2)
        h = h + self.positions.to(h.dtype)
        for block in self.blocks:
            h = block(h, c, self.attention)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        h = self.linear_out(torch.addcmul(shift, self.norm_out(h), 1.0 + scale))
        return self._unpatchify(h) * self.sigma_data

    def _unpatchify(self, h: Tensor) -> Tensor:
        """``(B, N, p·p·C)`` tokens → ``(B, C, H, W)``."""
        channels = self.image_shape[0]
        rows, cols = self.grid
        p = self.patch
        h = h.reshape(h.shape[0], rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(h.shape[0], channels, rows * p, cols * p)

    # --- forward mode ---------------------------------------------------------------------------------
    def forward_and_jvp(self, x: Tensor, s: Tensor, t: Tensor, dx: Tensor | None = None,
                        ds: Tensor | None = None, dt: Tensor | None = None,
                        cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v(x, s, t), ∂v·(dx, ds, dt))``; ``None`` tangents are zero. ``jvp="exact"``: one
        ``torch.func.jvp`` (the attention takes its math path); ``jvp="fd"``: the central difference
        ``(v(z + h u) − v(z − h u)) / 2h`` with ``h = fd_eps / max(rms(dx), |ds|, |dt|)`` per sample,
        evaluated with the value as one batch of ``3B`` (fused attention)."""
        if self.jvp == "exact":
            return self._exact_jvp(x, s, t, dx, ds, dt, cond)
        return self._fd_jvp(x, s, t, dx, ds, dt, cond)

    def _exact_jvp(self, x, s, t, dx, ds, dt, cond):
        if dx is None and ds is None and dt is None:
            value = self(x, s, t, cond)
            return value, torch.zeros_like(value)
        return jvp_of_inputs(lambda x_, s_, t_: self(x_, s_, t_, cond), x, s, t, dx, ds, dt)

    def _fd_jvp(self, x, s, t, dx, ds, dt, cond):
        batch = x.shape[0]
        size = torch.zeros(batch, dtype=x.dtype, device=x.device)
        if dx is not None:
            size = torch.maximum(size, dx.detach().reshape(batch, -1).pow(2).mean(1).sqrt())
        for d in (ds, dt):
            if d is not None:
                size = torch.maximum(size, d.detach().abs().to(x.dtype))
        step = self.fd_eps / torch.where(size > 0, size, torch.ones_like(size))
        h_data = step.reshape(batch, *([1] * (x.ndim - 1)))
        xs = [x, x, x] if dx is None else [x, x + h_data * dx, x - h_data * dx]
        ss = [s, s, s] if ds is None else [s, s + step.to(s.dtype) * ds, s - step.to(s.dtype) * ds]
        ts = [t, t, t] if dt is None else [t, t + step.to(t.dtype) * dt, t - step.to(t.dtype) * dt]
        conds = None if cond is None else torch.cat([cond, cond, cond])
        out = self(torch.cat(xs), torch.cat(ss), torch.cat(ts), conds)
        value, plus, minus = out[:batch], out[batch:2 * batch], out[2 * batch:]
        return value, (plus - minus) / (2 * h_data)

    def parameter_count(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())
