"""The device and processes a command runs on: ``--device`` (``sample``, ``evaluate``, ``fid-stats``)
and ``train.device`` name one; under ``torchrun`` the process group is joined and each rank takes
``cuda:LOCAL_RANK`` when the device is CUDA."""

from __future__ import annotations

import torch

from ..train import distributed
from .config import ConfigError
from .validation import _DEVICE

__all__ = ["open_device"]


def open_device(name: str, what: str = "--device") -> tuple[torch.device, distributed.DistInfo]:
    """``(device, distributed info)`` for ``name`` (cpu, cuda, cuda:N, mps); ``what`` names the option
    in the one-line error when it is not a device or not available here."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigError(f"{what}: {name!r} is not a device; use cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: cuda requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what}: {name} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what}: mps requested but the MPS backend is not available")
    dist = distributed.init(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist
