"""A teacher from the user's own code: ``package.module:function`` is imported and called, and what it
returns becomes a velocity ``b(x, t)`` (``teacher.factory``, ``teacher.weights``, ``teacher.kwargs``,
``teacher.adapter`` in a run's config).

The function is called with ``kwargs`` as keyword arguments and returns

* a velocity ``b(x, t)`` in this library's convention (any callable; used as it is), or
* an ``nn.Module``: with ``adapter`` it is converted by that adapter (:data:`ADAPTERS`), without one it
  must already be ``b(x, t)`` in our convention; or
* a pair ``(module, scheduler)`` for the adapters that read a schedule (``flow_matching``'s
  ``Scheduler``, a diffusers scheduler; ``diffusers_vp`` needs one).

``weights`` (a ``.safetensors`` file, e.g. from ``safetensors.torch.save_file(model.state_dict(), …)``)
is read with safetensors and **loaded into the returned module** with ``load_state_dict(strict=True)``;
the function itself never sees it. The module is put in eval mode with gradients off. Nothing is
unpickled: the user's code is imported, the weights are parsed by safetensors only.

Every failure raises :class:`TeacherError` with one line naming the part at fault (``key``: ``factory``,
``kwargs``, ``weights``, ``adapter``), which the config layer reports as ``teacher.<key>: …``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, read_safetensors
from .adapters import ADAPTERS

__all__ = ["TeacherError", "from_factory", "check_teacher", "FACTORY_PATTERN"]

FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*\Z")


class TeacherError(ValueError):
    """A teacher that cannot be built or used; ``key`` names the setting at fault."""

    def __init__(self, message: str, key: str = "factory"):
        super().__init__(" ".join(str(message).split()))
        self.key = key


def _brief(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _import(spec: str):
    """The object ``module:attr`` names (``attr`` may be dotted)."""
    if not FACTORY_PATTERN.match(spec or ""):
        raise TeacherError(f"{spec!r} is not of the form package.module:function")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise TeacherError(f"cannot import {module_name!r} ({_brief(err)}); is its folder on "
                               "PYTHONPATH?") from None
        raise TeacherError(f"importing {module_name!r} failed: {_brief(err)}") from None
    except Exception as err:  # the user's module raised while being imported
        raise TeacherError(f"importing {module_name!r} failed: {_brief(err)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TeacherError(f"{spec} is a {type(obj).__name__}, not a function")
    return obj


def _load_weights(module, weights: str | Path, spec: str) -> None:
    path = Path(weights)
    if path.suffix != ".safetensors":
        raise TeacherError(f"{path}: expected a .safetensors file (weights are never unpickled)", "weights")
    try:
        state = read_safetensors(path)
    except CheckpointError as err:
        raise TeacherError(str(err), "weights") from None
    if not isinstance(module, nn.Module):
        raise TeacherError(f"{spec} returned a {type(module).__name__}, not an nn.Module to load {path.name} "
                           "into", "weights")
    expected = module.state_dict()
    problems = [(what, keys) for what, keys in (
        ("missing", sorted(set(expected) - set(state))),
        ("unexpected", sorted(set(state) - set(expected))),
        ("shape differs for", sorted(k for k in expected
                                     if k in state and expected[k].shape != state[k].shape)))
        if keys]
    if problems:
        detail = "; ".join(f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                           for what, keys in problems)
        raise TeacherError(f"{path.name} does not fit the module {spec} returned ({detail})", "weights")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TeacherError(f"{path.name}: loading into the module {spec} returned failed: {_brief(err)}",
                           "weights") from None

def from_factory(spec: str, kwargs: dict | None = None, weights: str | Path | None = None,
                 adapter: str | None = None, sigma0: float = 1.0, options: dict | None = None):
    """Build a teacher velocity from ``spec = "package.module:function"`` (module docstring).

    Args:
        spec: the function to import and call.
        kwargs: keyword arguments of the call.
        weights: a ``.safetensors`` state dict loaded into the returned module (strict).
        adapter: ``torchcfm``, ``flow_matching``, ``diffusers_flow`` or ``diffusers_vp`` (``None``: the
            function returns our velocity).
        sigma0: our base scale, passed to the adapter.
        options: further keyword arguments of the adapter (``diffusers_vp``: ``noise_end``, ``tau_start``).

    Returns a callable ``b(x, t)`` (an ``nn.Module`` when the function returned one). Raises
    :class:`TeacherError`.
    """
    function = _import(spec)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TeacherError(f"expected a mapping of keyword arguments, got {type(kwargs).__name__}", "kwargs")
    if adapter is not None and adapter not in ADAPTERS:
        raise TeacherError(f"{adapter!r} is not one of {', '.join(ADAPTERS)}", "adapter")
    try:
        made = function(**(kwargs or {}))
    except Exception as err:  # the user's function refused its arguments or failed
        raise TeacherError(f"calling {spec}(**teacher.kwargs) failed: {_brief(err)}") from None
    scheduler = None
    if isinstance(made, tuple):
        if len(made) != 2 or adapter is None:
            raise TeacherError(f"{spec} returned a tuple; only (model, scheduler) with teacher.adapter "
                               "is understood")
        made, scheduler = made
    if not callable(made):
        raise TeacherError(f"{spec} returned a value of type {type(made).__name__}, not a velocity b(x, t) "
                           "or an nn.Module")
    if weights is not None:
        _load_weights(made, weights, spec)
    if isinstance(made, nn.Module):
        made.eval().requires_grad_(False)
    if adapter is None:
        return made
    options = {"sigma0": sigma0, **(options or {})}
    try:
        if adapter == "torchcfm":
            if scheduler is not None:
                raise ValueError("torchcfm models have no scheduler; return the model alone")
            return ADAPTERS[adapter](made, **options)
        if adapter == "diffusers_vp" and scheduler is None:
            raise ValueError("diffusers_vp needs the scheduler: return (model, scheduler) from "
                             f"{spec}")
        return ADAPTERS[adapter](made, scheduler, **options)
    except (ValueError, TypeError) as err:
        raise TeacherError(" ".join(str(err).split()), "adapter") from None


def check_teacher(velocity, batch: Tensor, where: str = "the teacher") -> None:
    """One forward pass on ``batch`` (a few samples of the data, on the device) at ``t = 0.5``: the
    output must be a finite tensor of the batch's shape. Raises :class:`TeacherError` otherwise."""
    t = torch.full((batch.shape[0],), 0.5, dtype=batch.dtype, device=batch.device)
    try:
        with torch.no_grad():
            out = (velocity.velocity if hasattr(velocity, "velocity") else velocity)(batch, t)
    except Exception as err:  # a shape mismatch inside the user's network, most often
        raise TeacherError(f"{where} failed on a batch of the data of shape {tuple(batch.shape)}: "
                           f"{_brief(err)}") from None
    if not isinstance(out, Tensor):
        raise TeacherError(f"{where} returned a {type(out).__name__}, not a tensor")
    if out.shape != batch.shape:
        raise TeacherError(f"{where} returned shape {tuple(out.shape)} for data of shape "
                           f"{tuple(batch.shape)} (dimension mismatch with the data)")
    if not bool(torch.isfinite(out).all()):
        raise TeacherError(f"{where} returned NaN or infinite values on a batch of the data")
