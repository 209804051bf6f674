"""The two-time flow map ``X_{s,t}(x) = x + (t − s) v_{s,t}(x)`` of the probability-flow ODE.

Time convention: ``t = 0`` is the base (noise), ``t = 1`` the data. ``X_{s,t}`` carries a point at time
``s`` to time ``t`` along ``ẋ = b_t(x)``; both directions are allowed (``s > t`` maps back towards the
base). The parametrisation builds in ``X_{s,s} = id``, and the velocity is the diagonal,
``b_t(x) = v_{t,t}(x)`` (spec §2.2, [P2] eq. 6–7).

Time derivatives are forward-mode JVPs of the network ``v``; the map's derivatives follow from the
product rule, e.g. ``∂_t X_{s,t} = v_{s,t} + (t − s) ∂_t v_{s,t}``.

Fused forward mode (optional network protocol). If ``net`` has a method
``forward_and_jvp(x, s, t, dx, ds, dt, cond) -> (value, tangent)`` (``None`` tangents are zero, times and
time tangents per-sample ``(B,)``) built from ordinary differentiable torch ops, :meth:`FlowMap.v_jvp`
calls it instead of ``torch.func.jvp``: one pass computes the primal and the tangent, and reverse mode
through both is plain autograd, which is much cheaper than reverse-over-``torch.func`` (see
``benchmarks/training_cost.py``). A network may also provide
``forward_and_jvps(x, s, t, tangents, cond, detach) -> (value, [tangent_k])`` to carry several tangents
``(dx, ds, dt)`` on one primal pass, ``detach[k]`` marking tangents computed under stop-gradient
(:meth:`FlowMap.v_jvps`). :class:`~flowmaps.nets.mlp.MLP` implements both. Any other network goes through
``torch.func.jvp``, as does every network when ``fused_jvp=False``; the two paths give the same values
and parameter gradients.

Saving and loading (:meth:`FlowMap.save_pretrained`, :meth:`FlowMap.from_pretrained`). A trained map is
a folder with ``model.safetensors`` and ``config.json`` (:mod:`flowmaps.checkpoint`): the network is
rebuilt from its class name and the constructor arguments it was made with, which a network class
records by being registered with :func:`register_network` (the built-in MLP and U-Net are). With the map
come what sampling it needs: the interpolant (its base ``N(0, σ0²)``), the sample shape, the number of
classes and the standardiser back to data units.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._tensor import batch_times, expand_as_data, jvp_of_inputs
from .checkpoint import (CheckpointError, check_scales, check_standardizer, load_model_folder,
                         save_model_folder)
from .interpolants import Interpolant, make_interpolant
from .precision import full_fp32, reduced_precision
from .solvers import uniform_grid
from .standardizer import Standardizer

__all__ = ["FlowMap", "register_network", "NETWORKS", "renoise"]

NETWORKS: dict[str, type[nn.Module]] = {}
DOMAINS = (None, "triangle", "square", "diagonal", "data")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def register_network(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: a network :meth:`FlowMap.save_pretrained` can write and
    :meth:`FlowMap.from_pretrained` rebuild. Each instance records the arguments it was constructed
    with (``network_options``, defaults filled in; tensors as lists), and the class is found again by
    its name, so the options must be JSON values (numbers, strings, lists)."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        options = dict(bound.arguments)
        options.pop(next(iter(signature.parameters)))  # self
        self.network_options = _jsonable(options)

    cls.__init__ = recording_init
    NETWORKS[cls.__name__] = cls
    return cls


def renoise(x: Tensor, u: float | Tensor, t: float | Tensor, interpolant,
            generator: torch.Generator | None = None) -> Tensor:
    """Carry a sample of ``I_u`` back to ``I_t`` (``t ≤ u``) along the interpolant with fresh noise:
    ``(β_t/β_u) x + √(α_t² − (β_t α_u/β_u)²) σ0 ξ``, ``ξ ~ N(0, I)`` from ``generator``. For
    ``I_u = α_u x0 + β_u x1`` the result has exactly the law of ``I_t``: its ``x1`` part is ``β_t x1``
    and its Gaussian part has variance ``α_t² σ0²`` (spec §4, γ-sampling)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    if not 0.0 < float(t) <= float(u) <= 1.0:
        raise ValueError(f"re-noising goes back in time from u to t with 0 < t <= u <= 1, got "
                         f"u={float(u)}, t={float(t)}")
    a_u, b_u = interpolant.alpha(u), interpolant.beta(u)
    a_t, b_t = interpolant.alpha(t), interpolant.beta(t)
    scale = b_t / b_u
    noise_std = (a_t**2 - (scale * a_u) ** 2).clamp_min(0.0).sqrt()
    noise = interpolant.sample_base(x, generator)
    return float(scale) * x + float(noise_std) * noise


def _fp32(*values):
    """Cast bf16/fp16 tensors to float32 (float32, float64 and other values unchanged): inputs of a JVP in
    full fp32 (:func:`~flowmaps.precision.full_fp32`)."""
    return tuple(v.float() if isinstance(v, Tensor) and v.dtype in (torch.bfloat16, torch.float16) else v
                 for v in values)


class FlowMap(nn.Module):
    """Wrap any network ``net(x, s, t[, cond])`` into ``X_{s,t}(x) = x + (t − s) · net(x, s, t)``.

    ``net`` receives per-sample times of shape ``(B,)``; ``cond`` (optional conditioning tensor) is passed
    through as a keyword when given.

    Args:
        net: the network ``v_θ(x, s, t[, cond])``.
        fused_jvp: use the network's own fused forward-mode pass (``net.forward_and_jvp``, see the
            module docstring) when it has one (default); ``False`` always uses ``torch.func.jvp``.
        jvp_fp32: under a reduced precision (a bf16 autocast; TF32 on CUDA), compute forward-mode JVPs,
            and the value computed with them, in full fp32 (default): autocast off, inputs cast to fp32,
            TF32 off (:func:`flowmaps.precision.full_fp32`). A bf16 tangent of a map loses the few
            significant digits the Lagrangian/Eulerian residuals live in; plain forward passes still use
            the autocast (spec E.12, :mod:`flowmaps.precision`).
    """

    def __init__(self, net: nn.Module, fused_jvp: bool = True, jvp_fp32: bool = True):
        super().__init__()
        self.net = net
        self.fused_jvp = bool(fused_jvp)
        self.jvp_fp32 = bool(jvp_fp32)
        # Where (s, t) was trained: None (unknown), "triangle" (forward jumps s ≤ t only), "square"
        # (both directions), "diagonal" (a velocity) or "data" (jumps to the data X_{s,1} only: sCT;
        # sample() refuses jumps that end before t = 1). Set by the trainer, saved in checkpoints.
        self.domain: str | None = None
        # What sampling a loaded map needs (set by the loaders, saved by save_pretrained): the
        # interpolant (base N(0, σ0²) of x0 = interpolant.sample_base(...)), the shape of one sample,
        # the number of classes (labels 0..K-1, K = unconditional) and the standardiser of the data.
        self.interpolant: Interpolant | None = None
        self.sample_shape: tuple[int, ...] | None = None
        self.num_classes: int = 0
        self.standardizer: Standardizer | None = None

    # --- evaluation -----------------------------------------------------------------------------
    def v(self, x: Tensor, s: float | Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """The mean velocity ``v_{s,t}(x)``: slope of the chord from ``x_s`` to ``x_t``."""
        return self._net(x, batch_times(s, x), batch_times(t, x), cond)

    def forward(self, x: Tensor, s: float | Tensor, t: float | Tensor,
                cond: Tensor | None = None) -> Tensor:
        """``X_{s,t}(x) = x + (t − s) v_{s,t}(x)``."""
        s, t = batch_times(s, x), batch_times(t, x)
        return x + expand_as_data(t - s, x) * self._net(x, s, t, cond)

    def velocity(self, x: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """The probability-flow velocity on the diagonal, ``b_t(x) = v_{t,t}(x)``."""
        t = batch_times(t, x)
        return self._net(x, t, t, cond)

    def _net(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.net(x, s, t) if cond is None else self.net(x, s, t, cond=cond)

    # --- forward-mode derivatives ---------------------------------------------------------------
    def jvps_apart(self, x: Tensor) -> bool:
        """Whether a JVP at ``x`` now runs apart from the plain passes, in full fp32 (``jvp_fp32`` under
        a reduced precision): a pass carrying a tangent then cannot also serve a plain value."""
        return self.jvp_fp32 and reduced_precision(x.device.type)

    def _fused(self, method: str = "forward_and_jvp") -> bool:
        return self.fused_jvp and callable(getattr(self.net, method, None))

    def v_jvp(self, x: Tensor, s: float | Tensor, t: float | Tensor, dx: Tensor | None = None,
              ds: Tensor | float | None = None, dt: Tensor | float | None = None,
              cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v_{s,t}(x), ∂v·(dx, ds, dt))``: one forward-mode JVP of the network.

        Tangents left as ``None`` are zero and are not traced. Times and tangents are per-sample, so
        ``ds = 1`` gives the per-sample partial ``∂_s v_{s,t}(x)``. Gradients with respect to the
        parameters flow through both outputs (reverse-over-forward). Uses the network's fused
        ``forward_and_jvp`` when it has one (and ``fused_jvp`` is on), else ``torch.func.jvp``.
        """
        if self.jvps_apart(x):
            with full_fp32(x.device.type):
                return self.v_jvp(*_fp32(x, s, t, dx, ds, dt, cond))
        s, t = batch_times(s, x), batch_times(t, x)
        ds = None if ds is None else batch_times(ds, x)
        dt = None if dt is None else batch_times(dt, x)
        if dx is None and ds is None and dt is None:
            value = self._net(x, s, t, cond)
            return value, torch.zeros_like(value)
        if self._fused():
            return self.net.forward_and_jvp(x, s, t, dx, ds, dt, cond)
        return jvp_of_inputs(lambda x_, s_, t_: self._net(x_, s_, t_, cond), x, s, t, dx, ds, dt)

    def v_jvps(self, x: Tensor, s: float | Tensor, t: float | Tensor,
               tangents: Sequence[tuple[Any, Any, Any]], cond: Tensor | None = None,
               detach: Sequence[bool] | None = None, offset: int = 0) -> tuple[Tensor, list[Tensor]]:
        """``(v_{s,t}(x), [∂v·(dx_k, ds_k, dt_k)]_k)`` for several tangents ``(dx, ds, dt)`` at one point.

        ``detach[k]`` puts tangent ``k`` under stop-gradient (same values as a :meth:`v_jvp` under
        ``torch.no_grad()``). With a network that has ``forward_and_jvps`` this is one primal pass
        carrying every tangent; otherwise one :meth:`v_jvp` per tangent. The returned value carries
        gradients (in grad mode) whatever the flags. ``offset``: the tangents (and the returned
        tangents) concern rows ``offset:`` only, the value the whole batch — one pass for rows that need
        a value beside rows that need a JVP (a network without ``forward_and_jvps`` runs two).
        """
        detach = [False] * len(tangents) if detach is None else [bool(d) for d in detach]
        if len(detach) != len(tangents) or not tangents:
            raise ValueError("give at least one tangent and one detach flag per tangent")
        if self.jvps_apart(x):
            with full_fp32(x.device.type):
                x32, s32, t32, cond32 = _fp32(x, s, t, cond)
                return self.v_jvps(x32, s32, t32, [_fp32(*tangent) for tangent in tangents],
                                   cond=cond32, detach=detach, offset=offset)
        s, t = batch_times(s, x), batch_times(t, x)
        tail = x[offset:]
        norm = [(dx, None if ds is None else batch_times(ds, tail),
                 None if dt is None else batch_times(dt, tail)) for dx, ds, dt in tangents]
        if offset and not self._fused("forward_and_jvps"):
            head = self.net(x[:offset], s[:offset], t[:offset], **({} if cond is None else
                                                                  {"cond": cond[:offset]}))
            value, outs = self.v_jvps(tail, s[offset:], t[offset:], norm,
                                      None if cond is None else cond[offset:], detach)
            return torch.cat([head, value]), outs
        if self._fused("forward_and_jvps"):
            if offset:
                return self.net.forward_and_jvps(x, s, t, norm, cond, detach, offset=offset)
            return self.net.forward_and_jvps(x, s, t, norm, cond, detach)
        # Fallback, one JVP per tangent; the value (with its graph) comes from the first live tangent's
        # pass, or from the first pass when every tangent is detached.
        source = next((k for k, stop in enumerate(detach) if not stop), 0)
        value, outs = None, []
        for k, ((dx, ds, dt), stop) in enumerate(zip(norm, detach)):
            with torch.set_grad_enabled(torch.is_grad_enabled() and (not stop or k == source)):
                v, dv = self.v_jvp(x, s, t, dx=dx, ds=ds, dt=dt, cond=cond)
            if k == source:
                value = v
            outs.append(dv.detach() if stop else dv)
        return value, outs

    def jvp(self, x: Tensor, s: float | Tensor, t: float | Tensor, dx: Tensor | None = None,
            ds: Tensor | float | None = None, dt: Tensor | float | None = None,
            cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(X_{s,t}(x), ∂X·(dx, ds, dt))`` from one JVP of ``v`` and the product rule:

        ``dX = dx + (dt − ds) v_{s,t}(x) + (t − s) dv``.
        """
        s, t = batch_times(s, x), batch_times(t, x)
        value, dv = self.v_jvp(x, s, t, dx=dx, ds=ds, dt=dt, cond=cond)
        return x + expand_as_data(t - s, x) * value, self._map_tangent(x, s, t, value, dv, dx, ds, dt)

    def jvps(self, x: Tensor, s: float | Tensor, t: float | Tensor,
             tangents: Sequence[tuple[Any, Any, Any]], cond: Tensor | None = None,
             detach: Sequence[bool] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``(X_{s,t}(x), [∂X·(dx_k, ds_k, dt_k)]_k)``: :meth:`jvp` for several tangents at one point,
        sharing one primal pass when the network supports it (see :meth:`v_jvps`). A detached tangent
        equals :meth:`jvp` under ``torch.no_grad()``."""
        s, t = batch_times(s, x), batch_times(t, x)
        value, dvs = self.v_jvps(x, s, t, tangents, cond=cond, detach=detach)
        detach = [False] * len(tangents) if detach is None else detach
        d_maps = []
        for (dx, ds, dt), dv, stop in zip(tangents, dvs, detach):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not stop):
                d_maps.append(self._map_tangent(x, s, t, value.detach() if stop else value, dv,
                                                dx, ds, dt))
        return x + expand_as_data(t - s, x) * value, d_maps

    @staticmethod
    def _map_tangent(x: Tensor, s: Tensor, t: Tensor, value: Tensor, dv: Tensor, dx, ds, dt) -> Tensor:
        """Product rule ``dX = dx + (dt − ds) v + (t − s) dv`` of ``X = x + (t − s) v``."""
        gap = expand_as_data(t - s, x)
        dgap = 0.0
        if dt is not None:
            dgap = dgap + batch_times(dt, x)
        if ds is not None:
            dgap = dgap - batch_times(ds, x)
        d_map = gap * dv
        if not isinstance(dgap, float):
            d_map = d_map + expand_as_data(dgap, x) * value
        if dx is not None:
            d_map = d_map + dx
        return d_map

    # --- sampling -------------------------------------------------------------------------------
    def sample(self, x0: Tensor, steps: int | None = None, grid: Tensor | None = None,
               cond: Tensor | None = None, return_path: bool = False, gamma: float = 0.0,
               interpolant=None, generator: torch.Generator | None = None) -> Any:
        """Compose jumps ``x ← X_{t_i, t_{i+1}}(x)`` along a time grid, starting from ``x0``.

        Give either ``steps`` (uniform grid on [0, 1], default 1 step) or an explicit ``grid``; the step
        count is chosen here, after training, and NFE equals the number of jumps. A decreasing grid
        (e.g. ``torch.linspace(1, 0, k + 1)``) runs the backward map, data → base, which is meaningful
        when the model was trained on both directions (``times="square"``). With ``return_path`` the
        result is ``(x, path)`` with ``path`` of shape ``(len(grid), B, ...)``.

        γ-sampling (``gamma > 0``, forward grids; along ``interpolant``, default :attr:`interpolant`;
        noise from ``generator``): every jump but the last goes further, to ``u = t_{i+1} + γ (1 − t_{i+1})``, and
        the point is re-noised back to ``t_{i+1}`` along the interpolant,
        ``x ← (β_{t_{i+1}}/β_u) x + √(α_{t_{i+1}}² − (β_{t_{i+1}} α_u/β_u)²) σ0 ξ`` with fresh
        ``ξ ~ N(0, I)``: if ``x`` has the law of ``I_u``, the result has the law of ``I_{t_{i+1}}``.
        ``γ = 0`` is the deterministic composition, ``γ = 1`` the multistep sampler of consistency
        models (jump to the data, re-noise). NFE stays the number of jumps. A map trained on jumps to
        the data only (:attr:`domain` ``"data"``, sCT) samples with one jump or with ``γ = 1``; other
        grids would use its untrained ``X_{s,t<1}`` and are refused.

        Runs in the caller's grad mode; wrap in ``torch.no_grad()`` for inference.
        """
        if grid is None:
            grid = uniform_grid(1 if steps is None else steps, device=x0.device)
        elif steps is not None:
            raise ValueError("give either steps or grid, not both")
        grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError("grid must be a 1-D tensor with at least two times")
        if not torch.isfinite(grid).all() or grid.min() < 0 or grid.max() > 1:
            raise ValueError("grid times must lie in [0, 1] (t=0 base, t=1 data)")
        backward = bool((grid[1:] < grid[:-1]).any())
        if backward:
            self._check_backward()
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        interpolant = interpolant if interpolant is not None else self.interpolant
        if gamma > 0.0 and (interpolant is None or backward):
            raise ValueError("γ-sampling needs the interpolant (interpolant=...) and a forward grid")
        if self.domain == "data" and (grid[-1] != 1 or (gamma != 1.0 and grid.numel() > 2)):
            raise ValueError("this flow map was trained on jumps to the data X_(s,1) only, so jumps that "
                             "end before t=1 are untrained: sample it with one jump to t=1, or with "
                             "gamma=1 (jump to the data, re-noise: --gamma 1)")
        x, path = x0, [x0]
        last = grid.numel() - 2
        for i in range(grid.numel() - 1):
            if gamma > 0.0 and i < last:
                target = grid[i + 1]
                u = target + gamma * (1.0 - target)
                x = renoise(self(x, grid[i], u, cond), u, target, interpolant, generator)
            else:
                x = self(x, grid[i], grid[i + 1], cond)
            if return_path:
                path.append(x)
        return (x, torch.stack(path)) if return_path else x

    def _check_backward(self) -> None:
        if self.domain in ("triangle", "diagonal", "data"):
            trained = {"triangle": "forward jumps s <= t", "diagonal": "the diagonal",
                       "data": "jumps to the data X_(s,1)"}[self.domain]
            raise ValueError(f"this flow map was trained on {trained} only, so its backward map "
                             "X_(t,s) is untrained; train it on both directions (times='square') to "
                             "run it backward")

    def to_data_units(self, x: Tensor) -> Tensor:
        """Samples in data units: the inverse of the standardiser the map was trained with (identity
        when it has none)."""
        return self.standardizer.inverse(x) if self.standardizer is not None else x

    # --- saving and loading ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, interpolant: Interpolant | None = None,
                        overwrite: bool = False, extra: dict | None = None) -> Path:
        """Write this map to ``directory``: ``model.safetensors`` (its weights) and ``config.json``
        (network class and options, interpolant, scales, standardiser, training domain; ``extra``
        adds provenance). ``interpolant`` defaults to :attr:`interpolant`. A folder holding files is
        refused unless ``overwrite``. Reload with :meth:`from_pretrained` or :func:`flowmaps.load`."""
        interpolant = interpolant if interpolant is not None else self.interpolant
        name = type(self.net).__name__
        if NETWORKS.get(name) is not type(self.net) or not hasattr(self.net, "network_options"):
            raise ValueError(f"save_pretrained: {name} is not a registered network class (decorate "
                             "it with flowmaps.flowmap.register_network)")
        if interpolant is None or interpolant.name not in ("linear", "trigonometric"):
            raise ValueError("save_pretrained: give the interpolant the map was trained with (linear "
                             f"or trigonometric), got {interpolant!r}")
        sigma0 = interpolant.config()["sigma0"]
        shape = list(self.sample_shape) if self.sample_shape else None
        if shape is None:
            dim = getattr(self.net, "dim", None)
            if dim is None:
                raise ValueError("save_pretrained: set sample_shape (the shape of one sample)")
            shape = [int(dim)]
        options = self.net.network_options
        config = {"network": {"class": name, "options": options},
                  "flowmap": {"fused_jvp": self.fused_jvp, "jvp_fp32": self.jvp_fp32},
                  "domain": self.domain,
                  "interpolant": {"name": interpolant.name, "sigma0": sigma0},
                  "scales": {"dim": math.prod(shape), "shape": shape, "sigma0": sigma0,
                             "sigma_data": options.get("sigma_data", 1.0),
                             "num_classes": int(self.num_classes or getattr(self.net, "num_classes", 0))},
                  "standardizer": self.standardizer.to_dict() if self.standardizer else None}
        config.update(extra or {})
        try:
            json.dumps(config)
        except TypeError as err:
            raise ValueError(f"save_pretrained: the network options are not JSON ({err})") from None
        return save_model_folder(directory, self.state_dict(), config, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "FlowMap":
        """A map saved by :meth:`save_pretrained` (or ``flowmaps export``), in eval mode on ``device``,
        with its interpolant, sample shape, number of classes and standardiser. Bad or corrupted files
        raise :class:`~flowmaps.checkpoint.CheckpointError` (one line); nothing is unpickled."""
        tensors, config = load_model_folder(directory)
        where = Path(directory) / "config.json"
        network = config.get("network")
        if not isinstance(network, dict) or not isinstance(network.get("options"), dict):
            raise CheckpointError(f"{where}: 'network' must hold a class name and its options")
        net_cls = NETWORKS.get(network.get("class"))
        if net_cls is None:
            raise CheckpointError(f"{where}: unknown network class {network.get('class')!r} (known: "
                                  f"{', '.join(sorted(NETWORKS))}; a custom class must be registered "
                                  "and imported first)")
        dim = check_scales(where, config.get("scales"))
        check_standardizer(where, config.get("standardizer"), dim)
        spec = config.get("interpolant")
        try:
            interpolant = make_interpolant(spec["name"], torch.tensor(spec["sigma0"]))
            if not bool((interpolant.sigma0 > 0).all()):
                raise ValueError("sigma0 must be positive")
            net = net_cls(**network["options"])
            flags = config.get("flowmap") or {}
            model = cls(net, fused_jvp=bool(flags.get("fused_jvp", True)),
                        jvp_fp32=bool(flags.get("jvp_fp32", True)))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{where}: cannot rebuild the map ({str(err).splitlines()[0]})"[:300]) \
                from None
        if config.get("domain") not in DOMAINS:
            raise CheckpointError(f"{where}: 'domain' must be one of {DOMAINS}, got "
                                  f"{config.get('domain')!r}")
        try:
            model.load_state_dict(tensors)
        except RuntimeError:
            raise CheckpointError(f"{Path(directory) / 'model.safetensors'}: weights do not match the "
                                  f"network in {where.name}") from None
        scales = config["scales"]
        model.domain = config.get("domain")
        model.interpolant = interpolant
        model.sample_shape = tuple(scales.get("shape") or [dim])
        model.num_classes = scales.get("num_classes", 0)
        std = config.get("standardizer")
        model.standardizer = Standardizer.from_dict(std) if std else None
        return model.to(device).eval()

    def inverse(self, x1: Tensor, steps: int = 1, cond: Tensor | None = None) -> Tensor:
        """The backward map, data → base, on a uniform decreasing grid of ``steps`` jumps. Refused when
        the map was trained on forward jumps only (:attr:`domain` ``"triangle"``)."""
        grid = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=x1.dtype, device=x1.device)
        return self.sample(x1, grid=grid, cond=cond)
