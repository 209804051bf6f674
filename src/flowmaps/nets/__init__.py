"""Two-time networks ``v_θ(x, s, t)`` for :class:`~flowmaps.FlowMap`: :mod:`~flowmaps.nets.mlp` for vectors
(with the fused forward-mode JVP path), :mod:`~flowmaps.nets.unet` and :mod:`~flowmaps.nets.dit` (a two-time
DiT) for images and latents."""

from .mlp import MLP, TimeFeatures
from .guidance import guidance_condition, split_guidance_condition
from .unet import UNET_PRESETS, UNet, unet_preset
from .dit import DIT_SIZES, DiT

__all__ = ["MLP", "TimeFeatures", "UNet", "unet_preset", "UNET_PRESETS", "DiT", "DIT_SIZES",
           "guidance_condition", "split_guidance_condition"]
