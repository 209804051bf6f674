"""Numerical precision of training: bf16 autocast of the plain passes, forward-mode JVPs in full fp32, and
TF32 on CUDA (spec addition E.12). Imports nothing but torch (layer 1: :mod:`flowmaps.flowmap` uses it).

The rules, under ``train.precision=bf16`` (:class:`~flowmaps.train.Trainer` ``precision="bf16"``):

1. **Plain forward passes autocast to bf16**: the training step runs under
   ``torch.autocast(device, torch.bfloat16)``, so the matmuls and convolutions of the model's plain passes
   (a flow-matching diagonal, a progressive target), of a teacher network, of an EMA or frozen copy and of
   a VAE (``flowmaps encode``, and decoding in ``sample``/``evaluate``) round their inputs and outputs to
   bf16: 8 significant bits, a relative rounding error of at most ``2^-9`` per rounding.
2. **Forward-mode JVPs run in full fp32** (while the map's ``jvp_fp32`` is on, the default): every JVP of
   :class:`~flowmaps.FlowMap` (``torch.func.jvp``, the MLP's fused passes, the DiT's exact and
   finite-difference paths) runs under :func:`full_fp32` — autocast off, inputs cast to fp32, and on CUDA
   TF32 off — and so does the primal computed beside the tangent. A residual is a difference of ``O(|b|)``
   terms that cancel at the fixed point, so it keeps only the digits its terms have; the DiT's
   finite-difference JVP in bf16 would have a round-off error ``2^-8 / h ≈ 1`` at ``h = 3·10⁻³``.
   A pass that carries a JVP is therefore never shared with a plain pass under bf16 (LSD's fused
   diagonal + Lagrangian pass splits in two: the diagonal autocast, the JVP fp32).
3. **Time and guidance embeddings stay fp32** with autocast off in every network (a bf16 time keeps 8
   bits: ``t = 0.999`` and ``t = 1`` would be one value, and high frequencies would lose the time's low
   digits).
4. **What the loss is made of is combined in fp32**: a bf16 network output meets an fp32 tensor (the
   interpolant, a tangent, a time gap) and torch's type promotion gives fp32; residuals, squared norms,
   weights (the learned weight runs with autocast off) and the mean are fp32. Analytic references
   (:class:`~flowmaps.exact.GaussianMixture`) are not networks and run with autocast off, in their own
   precision: an exact teacher stays exact.
5. **TF32** (``train.tf32``, CUDA only; default off): on an NVIDIA GPU from Ampere on, fp32 matmuls and
   convolutions may round their inputs to TF32's 10-bit mantissa (``2^-11`` relative). ``tf32=True``
   allows it for the training step (cuBLAS and cuDNN), except inside JVPs (rule 2: :func:`full_fp32`
   turns it off there; the backward pass through a JVP may still use it). ``tf32=False`` turns both off
   for the step — cuDNN's TF32 is on in torch by default, so fp32 convolutions would otherwise be TF32.
   On the CPU the flags change nothing (they are read by cuBLAS and cuDNN only) and the trainer leaves
   them alone.

What is not autocast: sampling and evaluation of a flow map (fp32: the weights are fp32 whatever the
training precision), the trainer's validation loss (fp32, so it is comparable across precisions).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["PRECISIONS", "autocast", "reduced_autocast", "tf32_flags", "set_tf32_flags", "tf32_scope",
           "reduced_precision", "full_fp32"]

PRECISIONS = ("fp32", "bf16")
"""The training precisions: ``"fp32"`` and ``"bf16"`` (autocast of the plain passes, module docstring)."""


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")


def autocast(device_type: str, precision: str) -> torch.autocast:
    """``torch.autocast(device_type, torch.bfloat16)``, enabled when ``precision`` is ``"bf16"``; a
    ValueError names the precisions for anything else."""
    _check(precision)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def reduced_autocast(device_type: str) -> bool:
    """Whether an autocast to a dtype below fp32 (bf16, fp16) is active on ``device_type``."""
    return (torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) != torch.float32)


def tf32_flags() -> tuple[bool, bool]:
    """``(cuBLAS matmul, cuDNN)``: whether fp32 matmuls and convolutions may use TF32 on CUDA
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the process used torch's newer fp32_precision API (torch >= 2.9): read that
        return (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32")


def set_tf32_flags(matmul: bool, cudnn: bool) -> None:
    """Set the two flags of :func:`tf32_flags` (global to the process; they affect CUDA only)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(cudnn)


@contextlib.contextmanager
def tf32_scope(enabled: bool, device_type: str) -> Iterator[None]:
    """On CUDA: allow (``enabled``) or forbid TF32 in both cuBLAS matmuls and cuDNN convolutions, and
    restore the previous flags on exit (also on an exception). On any other device: nothing."""
    if device_type != "cuda":
        yield
        return
    before = tf32_flags()
    set_tf32_flags(enabled, enabled)
    try:
        yield
    finally:
        set_tf32_flags(*before)


def reduced_precision(device_type: str) -> bool:
    """Whether an fp32 computation on ``device_type`` would now lose precision: a reduced-precision
    autocast is active there, or (CUDA) TF32 is allowed in matmuls or convolutions."""
    return reduced_autocast(device_type) or (device_type == "cuda" and any(tf32_flags()))


@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """Autocast off on ``device_type`` and, on CUDA, TF32 off (restored on exit): fp32 inputs then
    compute in IEEE fp32. What :class:`~flowmaps.FlowMap` runs its JVPs under (module docstring,
    rule 2); the caller casts the inputs to fp32."""
    with torch.autocast(device_type, enabled=False), tf32_scope(False, device_type):
        yield
