"""A two-time U-Net ``v_θ(x, s, t)`` for flow maps of images ``(B, C, H, W)``.

The flow map is ``X_{s,t}(x) = x + (t − s) · σ_data · UNet(x / σ_data; s, t − s)`` (spec §5.2.2, [C2]):
:class:`~flowmaps.FlowMap` adds the ``x + (t − s)`` part, and :class:`UNet` is the network ``v`` (its
forward already includes the ``σ_data`` pre/post scaling). Time convention: ``t = 0`` base (noise),
``t = 1`` data; times are per-sample tensors of shape ``(B,)``.

Architecture (DDPM++ layout with EDM2-style conditioning, spec §5.2.2):

* input ``x / σ_data`` with an optional constant ones-channel (EDM2), a 3×3 input convolution;
* an encoder of ``len(channel_mults)`` levels, each with ``blocks_per_level`` residual blocks; 3×3 stride-2
  convolutions between levels (a side of ``n`` becomes ``ceil(n / 2)``, so odd sizes such as 28 → 14 → 7
  → 4 are fine); a middle block (residual, attention, residual); a decoder with ``blocks_per_level + 1``
  residual blocks per level fed by skip connections from the encoder, and nearest-neighbour upsampling
  to the exact size of the matching encoder activation followed by a 3×3 convolution;
* residual blocks: GroupNorm → SiLU → 3×3 conv → GroupNorm → FiLM ``h·(1 + scale) + shift`` from the
  conditioning embedding → SiLU → dropout → 3×3 conv, a 1×1 skip convolution when the width changes, and
  the residual sum scaled by ``1/√2``;
* self-attention at the resolutions in ``attention_resolutions`` and in the middle block, written with
  explicit matmul + softmax (not ``F.scaled_dot_product_attention``, whose fused CPU kernel has no
  forward-mode rule), so ``torch.func.jvp`` works through the whole network;
* conditioning on ``(s, t − s)``: sinusoidal *positional* embeddings (``max_period = 10⁴``, raw times in
  ``[0, 1]`` times ``time_scale``) of ``s`` and of ``t − s``, one linear layer each, the
  magnitude-preserving sum ``(a + b)/√2``, then SiLU → Linear → SiLU; an optional class embedding (with a
  null label for the unconditional model) is added to it. The embedding math runs in fp32 (float64 for a
  float64 network) with autocast off;
* GroupNorm → SiLU → a zero-initialised 3×3 output convolution, so the network outputs exactly 0 at
  initialisation and ``FlowMap(UNet(...))`` starts as the identity map.

Every operation is smooth or piecewise linear with a forward-mode rule, so :meth:`FlowMap.jvp` (which uses
``torch.func.jvp`` for this network) and reverse mode through its tangent both work.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flowmap import register_network
from .guidance import check_image_inputs, class_labels, guidance_features, is_guidance_condition

__all__ = ["UNet", "unet_preset", "UNET_PRESETS"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _groups(channels: int) -> int:
    """GroupNorm groups for a width: the largest divisor of ``channels`` not above
    ``min(32, channels // 4)`` (at least 1), so groups hold at least 4 channels where possible."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _pair(size) -> tuple[int, int]:
    return int(size[0]), int(size[1])


class PositionalEmbedding(nn.Module):
    """Sinusoidal positional embedding ``[cos(τ f_k), sin(τ f_k)]_k`` of a scalar per sample.

    ``f_k = max_period^(−k / half)`` for ``k = 0 … half − 1`` (frequencies from 1 down to about
    ``1 / max_period``), with ``τ = time_scale · time``. Computed with autocast off, in fp32 (or in the
    input's dtype if that is float64).
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, time_scale: float = 1.0):
        super().__init__()
        half = dim // 2
        if half < 1:
            raise ValueError(f"positional embedding width must be at least 2, got {dim}")
        exponents = torch.arange(half, dtype=torch.float64) / half
        self.register_buffer("frequencies", (max_period ** -exponents).float(), persistent=False)
        self.time_scale = float(time_scale)
        self.dim = 2 * half

    def forward(self, tau: Tensor) -> Tensor:
        with torch.autocast(tau.device.type, enabled=False):
            tau = tau if tau.dtype == torch.float64 else tau.float()
            angles = (tau * self.time_scale)[:, None] * self.frequencies.to(tau.dtype)
            return torch.cat([angles.cos(), angles.sin()], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, FiLM from the embedding, SiLU–dropout–conv, skip; sum scaled by 1/√2."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels, affine=False)  # FiLM is affine
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1.0 + scale))
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) * _INV_SQRT2


class _Attention(nn.Module):
    """Multi-head self-attention over the pixels, with explicit ``softmax(qᵀk/√d)`` (forward-mode
    differentiable everywhere), residual sum scaled by 1/√2."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        head_dim = channels // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, head_dim,
                                                 height * width).unbind(1)
        logits = torch.matmul(q.transpose(-1, -2), k) * (head_dim ** -0.5)  # (B, heads, N, N)
        weights = logits.softmax(dim=-1)
        out = torch.matmul(v, weights.transpose(-1, -2))                      # (B, heads, d, N)
        return (x + self.proj(out.reshape(batch, channels, height, width))) * _INV_SQRT2


class _Downsample(nn.Module):
    """3×3 convolution with stride 2: a side ``n`` becomes ``ceil(n / 2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest-neighbour upsampling to an exact target size (undoes odd-size rounding), then 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@register_network
class UNet(nn.Module):
    """Two-time U-Net ``v_θ(x, s, t[, cond])`` for images, conditioned on ``(s, t − s)``.

    Computes ``σ_data · UNet(x / σ_data; s, t − s)``; wrapped in :class:`~flowmaps.FlowMap` it gives the
    flow map ``X_{s,t}(x) = x + (t − s) · σ_data · UNet(x / σ_data; s, t − s)`` (spec §5.2.2). The output
    layer is zero-initialised, so the output is exactly 0 and the flow map the identity at
    initialisation. See the module docstring for the layout.

    Args:
        image_shape: ``(C, H, W)`` of one sample. Any ``H, W ≥ 1``: downsampling maps a side ``n`` to
            ``ceil(n / 2)`` and upsampling restores the exact encoder size, so odd sizes work
            (28 → 14 → 7).
        channels: base width; level ``i`` has ``channels · channel_mults[i]`` channels.
        channel_mults: one positive integer multiplier per resolution level.
        blocks_per_level: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map sides (heights) at which self-attention follows each
            residual block; each must be a side the network visits (``H``, ``ceil(H/2)``, …), else a
            ``ValueError`` lists the valid ones. ``()`` for none (the middle block still has one).
        heads: attention heads (must divide the width of every attention layer).
        head_dim: alternative to ``heads``: channels per head (``heads = width // head_dim`` per layer).
        dropout: dropout probability inside the residual blocks (active in ``train()`` mode only).
        num_classes: ``> 0`` adds a class embedding with ``num_classes + 1`` rows; row ``num_classes``
            is the null (unconditional) label, :attr:`null_label`.
        sigma_data: data scale of the pre/post scaling (0.5 for data in ``[−1, 1]``, spec §5.2.2).
        time_scale: multiplies ``s`` and ``t − s`` before the positional embedding (1.0: raw times
            in ``[0, 1]``, as in [C2]).
        max_period: longest period of the positional embedding (10⁴, spec §5.2.2).
        ones_channel: concatenate a constant ones-channel to the input (EDM2).
        emb_channels: width of the conditioning embedding (default: the widest level, as in EDM2); the
            positional embeddings have the width of the first level (spec §5.2.2).
        mid_attention: self-attention in the middle block.

    ``forward(x, s, t, cond=None)``: ``x`` of shape ``(B, C, H, W)``, ``s`` and ``t`` of shape ``(B,)``
    (``FlowMap`` broadcasts scalars); ``cond`` an integer tensor ``(B,)`` of labels in
    ``[0, num_classes]`` (``num_classes`` = null label); ``None`` means the null label. Classifier-free
    guidance is left to the caller (evaluate with the label and with :attr:`null_label`).
    """

    def __init__(self, image_shape: Sequence[int], channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2), blocks_per_level: int = 2,
                 attention_resolutions: Sequence[int] = (16,), heads: int = 1,
                 head_dim: int | None = None, dropout: float = 0.0, num_classes: int = 0,
                 sigma_data: float = 0.5, time_scale: float = 1.0, max_period: float = 10_000.0,
                 ones_channel: bool = True, emb_channels: int | None = None,
                 mid_attention: bool = True, guidance_conditioning: bool = False):
        super().__init__()
        image_shape = tuple(int(n) for n in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive entries, got {image_shape}")
        if int(channels) < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        channel_mults = tuple(channel_mults)
        if not channel_mults or any(int(m) != m or m < 1 for m in channel_mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of positive integers, "
                             f"got {channel_mults}")
        channel_mults = tuple(int(m) for m in channel_mults)
        if int(blocks_per_level) < 1:
            raise ValueError(f"blocks_per_level must be at least 1, got {blocks_per_level}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if int(num_classes) < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not (math.isfinite(float(sigma_data)) and float(sigma_data) > 0):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        if not (math.isfinite(float(time_scale)) and float(time_scale) > 0):
            raise ValueError(f"time_scale must be a positive number, got {time_scale}")
        if not (math.isfinite(float(max_period)) and float(max_period) > 1):
            raise ValueError(f"max_period must be a number > 1, got {max_period}")
        if head_dim is None and int(heads) < 1:
            raise ValueError(f"heads must be at least 1, got {heads}")
        if head_dim is not None and int(head_dim) < 1:
            raise ValueError(f"head_dim must be at least 1, got {head_dim}")
        if emb_channels is not None and int(emb_channels) < 1:
            raise ValueError(f"emb_channels must be positive, got {emb_channels}")
        if guidance_conditioning and int(num_classes) < 1:
            raise ValueError("guidance_conditioning needs a class-conditional network (num_classes > 0)")

        in_channels, height, width = image_shape
        widths = [int(channels) * m for m in channel_mults]
        sizes = [(height, width)]
        for _ in channel_mults[1:]:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        visited = [h for h, _ in sizes]
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        bad = [r for r in attention_resolutions if r not in visited]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature-map sides of this network; "
                             f"for image_shape {image_shape} and {len(channel_mults)} levels they are "
                             f"{visited}")

        def n_heads(c: int) -> int:
            count = c // int(head_dim) if head_dim is not None else int(heads)
            per = int(head_dim) if head_dim is not None else c // max(count, 1)
            if count < 1 or count * per != c:
                what = f"head_dim {head_dim}" if head_dim is not None else f"heads {heads}"
                raise ValueError(f"{what} does not divide the attention width {c}")
            return count

        self.image_shape = image_shape
        self.sigma_data = float(sigma_data)
        self.ones_channel = bool(ones_channel)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes  # the unconditional label (only used when num_classes > 0)
        self.resolutions = visited
        self.config = dict(image_shape=image_shape, channels=int(channels),
                           channel_mults=channel_mults, blocks_per_level=int(blocks_per_level),
                           attention_resolutions=attention_resolutions, heads=int(heads),
                           head_dim=None if head_dim is None else int(head_dim),
                           dropout=float(dropout), num_classes=self.num_classes,
                           sigma_data=self.sigma_data, time_scale=float(time_scale),
                           max_period=float(max_period), ones_channel=self.ones_channel,
                           emb_channels=None if emb_channels is None else int(emb_channels),
                           mid_attention=bool(mid_attention),
                           guidance_conditioning=bool(guidance_conditioning))

        # Conditioning: positional embeddings of s and t − s (width of the first level), one linear
        # layer each, (a + b)/√2, SiLU, Linear, SiLU.
        emb = int(emb_channels) if emb_channels is not None else max(widths)
        self.emb_channels = emb
        self.pos_embedding = PositionalEmbedding(widths[0], max_period, time_scale)
        self.emb_s = nn.Linear(self.pos_embedding.dim, emb)
        self.emb_gap = nn.Linear(self.pos_embedding.dim, emb)
        self.emb_class = nn.Embedding(self.num_classes + 1, emb) if self.num_classes else None
        # Guidance as a condition (nets/guidance.py): embeddings of 1 − 1/ω, lo and hi, one linear layer
        # that starts at zero, so a new guidance-conditioned network equals the plain one.
        self.emb_guidance = None
        if guidance_conditioning:
            self.emb_guidance = nn.Linear(3 * self.pos_embedding.dim, emb)
            nn.init.zeros_(self.emb_guidance.weight)
            nn.init.zeros_(self.emb_guidance.bias)
        self.emb_mlp = nn.Linear(emb, emb)

        # Encoder.
        blocks = int(blocks_per_level)
        self.conv_in = nn.Conv2d(in_channels + self.ones_channel, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        ch = widths[0]
        for level, out in enumerate(widths):
            for _ in range(blocks):
                self.down.append(_ResBlock(ch, out, emb, dropout))
                ch = out
                if visited[level] in attention_resolutions:
                    self.down.append(_Attention(ch, n_heads(ch)))
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(_Downsample(ch))
                skip_widths.append(ch)

        # Middle.
        self.mid = nn.ModuleList([_ResBlock(ch, ch, emb, dropout)])
        if mid_attention:
            self.mid.append(_Attention(ch, n_heads(ch)))
        self.mid.append(_ResBlock(ch, ch, emb, dropout))

        # Decoder: each residual block consumes one skip, in reverse order.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out = widths[level]
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(ch + skip_widths.pop(), out, emb, dropout))
                ch = out
                if visited[level] in attention_resolutions:
                    self.up.append(_Attention(ch, n_heads(ch)))
            if level > 0:
                self.up.append(_Upsample(ch))
        assert not skip_widths

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # --- conditioning -------------------------------------------------------------------------------
    def embedding(self, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The conditioning embedding ``(B, emb_channels)`` of ``(s, t − s)`` and the class label,
        computed with autocast off in fp32 (float64 if the network is float64)."""
        with torch.autocast(s.device.type, enabled=False):
            work = torch.promote_types(self.emb_s.weight.dtype, torch.float32)
            s = s.to(work)
            gap = t.to(work) - s
            emb = (self.emb_s(self.pos_embedding(s)) + self.emb_gap(self.pos_embedding(gap))) * _INV_SQRT2
            if self.emb_guidance is not None and is_guidance_condition(cond):
                labels, features = guidance_features(cond, self.pos_embedding, work)
                emb = emb + self.emb_guidance(features)
                cond = labels
            if self.emb_class is not None:
                labels = self._labels(cond, s.shape[0], s.device)
                emb = (emb + self.emb_class(labels).to(work)) * _INV_SQRT2
            elif cond is not None:
                raise ValueError("this UNet was built with num_classes=0 and takes no cond")
            return F.silu(self.emb_mlp(F.silu(emb)))

    def _labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        return class_labels(cond, batch, device, self.null_label, self.emb_guidance is not None)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``σ_data · UNet(x / σ_data; s, t − s)`` for ``x`` of shape ``(B, C, H, W)``, times ``(B,)``."""
        check_image_inputs("UNet", x, s, t, self.image_shape)
        emb = self.embedding(s, t, cond)
        h = x / self.sigma_data
        if self.ones_channel:
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        h = self.conv_in(h)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, _ResBlock):
                h = layer(h, emb)
                skips.append(h)
            elif isinstance(layer, _Attention):
                h = layer(h)
                skips[-1] = h
            else:
                h = layer(h)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            elif isinstance(layer, _Upsample):
                h = layer(h, _pair(skips[-1].shape[-2:]))
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h))) * self.sigma_data

    def parameter_count(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())


# Architecture presets. Attention is given as level indices and converted to feature-map sides for the
# image shape at hand (so "mnist" attends at 7×7 for 28×28 inputs and at 8×8 for 32×32 inputs).
UNET_PRESETS: dict[str, dict] = {
    # Tiny CPU model for 8×8 sklearn digits: ~0.27M parameters, attention at 4×4. Multipliers (1, 1):
    # with (1, 2) the 64-channel 4×4 level alone takes the model past 0.6M parameters.
    "digits": dict(channels=32, channel_mults=(1, 1), blocks_per_level=1, attention_levels=(1,),
                   dropout=0.0, emb_channels=64),
    # CPU model for 28×28 MNIST: attention at 7×7 (the lowest level), ~1.6M parameters.
    "mnist": dict(channels=32, channel_mults=(1, 2, 2), blocks_per_level=2, attention_levels=(2,),
                  dropout=0.0),
    # Spec Table 2, CIFAR-10 column (§5.2.1): 128 channels, multipliers [2, 2, 2], 4 residual blocks per
    # resolution, attention at 16×16, dropout 0.13.
    "cifar10": dict(channels=128, channel_mults=(2, 2, 2), blocks_per_level=4, attention_levels=(1,),
                    dropout=0.13),
    # Spec Table 2, CelebA-64/AFHQ-64 columns (EDM2 "ImageNet-S" with 128 channels): 3 residual blocks per
    # resolution, attention at 16×16 and 8×8, dropout 0; multipliers [1, 2, 3, 4] for 64×64 become
    # (1, 2, 2, 2) for 32×32 (resolutions 32, 16, 8, 4).
    "imagenet32": dict(channels=128, channel_mults=(1, 2, 2, 2), blocks_per_level=3,
                       attention_levels=(1, 2), dropout=0.0),
}
"""Network settings by preset name (:func:`unet_preset`): channels, channel multipliers, blocks per
level, attention levels, dropout and embedding width of the :class:`UNet` of each image preset."""


def unet_preset(name: str, image_shape: Sequence[int], num_classes: int = 0, **overrides) -> UNet:
    """Build a :class:`UNet` from a named preset; keyword ``overrides`` replace any setting.

    Presets (``sigma_data = 0.5`` for data in ``[−1, 1]``; attention sides for the canonical shape):

    * ``"digits"`` — 8×8 sklearn digits on a CPU: 32 channels, multipliers (1, 1), 1 block per level,
      attention at 4×4, embedding width 64 (about 0.27M parameters). No spec counterpart.
    * ``"mnist"`` — 28×28 MNIST on a CPU: 32 channels, multipliers (1, 2, 2), 2 blocks per level,
      attention at 7×7 (about 1.6M parameters). No spec counterpart.
    * ``"cifar10"`` — spec Table 2, CIFAR-10: 128 channels, multipliers (2, 2, 2), 4 blocks per
      resolution, attention at 16×16, dropout 0.13 (about 54M parameters).
    * ``"imagenet32"`` — spec Table 2, CelebA/AFHQ-64 setting (EDM2 ImageNet-S at 128 channels) adapted
      to 32×32: 128 channels, multipliers (1, 2, 2, 2), 3 blocks per resolution, attention at 16×16 and
      8×8, dropout 0 (about 49M parameters).

    The preset attends at the sides of its attention levels for ``image_shape`` (e.g. ``"cifar10"`` at
    the second level, 16×16 for 32×32 inputs); ``attention_resolutions=...`` overrides that.
    """
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    settings = dict(UNET_PRESETS[name])
    levels = settings.pop("attention_levels")
    settings.update(overrides)
    if "attention_resolutions" not in settings:
        shape = tuple(int(n) for n in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive entries, got {shape}")
        sides = [shape[1]]
        for _ in range(len(settings["channel_mults"]) - 1):
            sides.append((sides[-1] + 1) // 2)
        settings["attention_resolutions"] = tuple(sorted({sides[i] for i in levels if i < len(sides)},
                                                         reverse=True))
    return UNet(image_shape, num_classes=num_classes, **settings)
