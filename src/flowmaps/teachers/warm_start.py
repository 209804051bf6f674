"""Warm start: a two-time student ``v_{s,t}(x)`` made from the teacher's own network (issue 17, part 1).

Time convention: ``t = 0`` base (noise), ``t = 1`` data; the flow map is
``X_{s,t}(x) = x + (t − s) v_{s,t}(x)`` (:class:`~flowmaps.FlowMap`).

**Exactness at initialisation.** :func:`two_time` returns a network with

    v_{s,t}(x) = b_s(x)      for every (s, t),

``b`` the teacher's velocity *in our convention* (an ε-, v-, x1- or velocity-prediction model is converted
by the adapter's own code, :class:`~flowmaps.teachers.TeacherVelocity`). So ``X_{s,t}(x) = x + (t − s)
b_s(x)`` is one Euler step of the teacher from ``s``, and the diagonal ``v_{t,t} = b_t`` is the teacher.
The student is a deep copy of the teacher's network (all of its parameters trainable); the teacher is
left frozen and separate.

**The second time** enters through the jump ``t − s``, by an embedding that starts at exactly zero:

* flowmaps' own :class:`~flowmaps.nets.MLP` and :class:`~flowmaps.nets.UNet` already take ``(s, t − s)``;
  a velocity teacher was only ever evaluated at ``t − s = 0``. The student is the same class: the
  weights that read ``t − s`` (the MLP's first-layer columns of ``φ(t − s)``; the U-Net's ``emb_gap``
  linear layer) are zeroed, and their constant value at ``t − s = 0`` is folded into the bias beside them
  (first-layer bias; ``emb_s.bias``), so the output is the teacher's at ``(s, s)`` for every ``t``
  (equal up to the rounding of one addition) and the zeroed weights receive gradient whenever
  ``t ≠ s``. It saves, loads and exports as any flowmaps network.
* any other network whose time embedding is found (:data:`EMBEDDINGS`: diffusers ``UNet2DModel`` and
  ``UNet2DConditionModel`` ``time_embedding``, ``DiTTransformer2DModel``'s per-block
  ``CombinedTimestepLabelEmbeddings``, ``SD3Transformer2DModel`` / Flux ``time_text_embed``, torchcfm's
  ``UNetModelWrapper`` ``time_embed`` and its ``MLP``'s first layer, inside a flow_matching
  ``ModelWrapper`` or not): :class:`HookedStudent`. A forward hook adds ``E(t − s)`` to the output of
  that module, ``E = Linear∘SiLU∘Linear`` of Fourier features of ``t − s`` whose last layer is zero.
  The model itself is called at ``s`` through the adapter, so ``v_{s,t} = b_s + 0``.
* any other module or callable: :class:`CorrectedStudent`,
  ``v_{s,t}(x) = b_s(x) + c(x, s, t)`` with ``c`` a small :class:`~flowmaps.nets.MLP` on the flattened
  sample, ``[x, s, t − s]``, whose output layer is zero. ``c`` is not multiplied by ``t − s``: the
  diagonal is trained too (LSD trains it; LMD's diagonal term keeps it at the teacher).

Forward mode: LMD and LSD take JVPs of the student in ``t`` (``torch.func.jvp``). PyTorch's fused CPU
``scaled_dot_product_attention`` kernels have no forward-mode rule, so under a ``torch.func`` transform
the hooked and corrected students run the teacher's network with the math attention backend
(:func:`math_attention`).
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..flowmap import register_network
from ..nets.mlp import MLP, TimeFeatures
from ..nets.unet import UNet
from .adapters import TeacherVelocity
from .factory import from_factory

__all__ = ["two_time", "FactoryStudent", "HookedStudent", "CorrectedStudent", "GapEmbedding", "EMBEDDINGS", "WarmStartError",
           "find_time_embeddings", "math_attention"]


class WarmStartError(ValueError):
    """A teacher that cannot seed a student as asked (one line)."""


def math_attention():
    """A context that forces the math backend of ``F.scaled_dot_product_attention`` when running under
    a ``torch.func`` transform (``jvp``), whose fused CPU kernels have no forward-mode rule; a no-op
    otherwise."""
    try:
        inside = torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # pragma: no cover - other torch versions
        inside = True
    if not inside:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _contiguous_input(module, args):
    """Forward pre-hook: a contiguous first input. ``F.group_norm``'s forward-mode rule views its input
    and fails on the non-contiguous activations diffusers' attention blocks return (``AttnDownBlock2D``
    then a ResNet block), so the students' ``GroupNorm`` layers get contiguous inputs (same values)."""
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def _forward_mode_ready(module) -> None:
    if isinstance(module, nn.Module):
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.register_forward_pre_hook(_contiguous_input)


# --- flowmaps' own networks: zero the weights that read t − s, fold their constant into a bias --------

@torch.no_grad()
def _warm_mlp(net: MLP) -> MLP:
    first = net.body[0]
    features = net.time_features.dim
    start = net.dim + features                       # columns: [x, φ(s), φ(t − s), cond]
    gap = slice(start, start + features)
    at_zero = net.time_features(torch.zeros(1, dtype=first.weight.dtype))[0]   # φ(0)
    first.bias.add_(first.weight[:, gap] @ at_zero)
    first.weight[:, gap] = 0.0
    return net


@torch.no_grad()
def _warm_unet(net: UNet) -> UNet:
    dtype = net.emb_gap.weight.dtype
    at_zero = net.pos_embedding(torch.zeros(1, dtype=torch.promote_types(dtype, torch.float32)))
    net.emb_s.bias.add_(net.emb_gap(at_zero.to(dtype))[0])   # emb_gap(pe(0)): its constant at t − s = 0
    net.emb_gap.weight.zero_()
    net.emb_gap.bias.zero_()
    return net


# --- other networks: a zero-initialised embedding of t − s added to their time embedding ---------------

class GapEmbedding(nn.Module):
    """``E(t − s) = W₂ SiLU(W₁ φ(t − s) + c₁) + c₂`` with ``φ`` Fourier features
    (:class:`~flowmaps.nets.mlp.TimeFeatures`, 8 frequencies up to 8 cycles per unit time) and
    ``W₂ = 0, c₂ = 0`` at initialisation: ``E ≡ 0`` but ``∂E/∂W₂ ≠ 0``."""

    def __init__(self, out_features: int, hidden: int | None = None):
        super().__init__()
        self.features = TimeFeatures(8, max_frequency=8.0)
        hidden = int(hidden or min(max(out_features, 32), 512))
        self.inner = nn.Linear(self.features.dim, hidden)
        self.out = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, gap: Tensor) -> Tensor:
        work = self.inner.weight.dtype
        return self.out(nn.functional.silu(self.inner(self.features(gap.to(work)))))


def _unwrap(model):
    """The network inside a flow_matching ``ModelWrapper`` or torchdyn ``torch_wrapper`` (``.model``)."""
    seen = 0
    while type(model).__name__ in ("ModelWrapper", "torch_wrapper") and isinstance(
            getattr(model, "model", None), nn.Module) and seen < 4:
        model, seen = model.model, seen + 1
    return model


# Where the known architectures keep their time embedding (a module whose output, (B, D), is the time
# conditioning of the whole network): attribute names, then classes every instance of which is hooked.
EMBEDDINGS = {
    "attributes": ("time_embedding", "time_text_embed", "time_embed"),
    "classes": ("CombinedTimestepLabelEmbeddings",),
}


def _out_features(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def find_time_embeddings(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The modules whose output is ``model``'s time embedding: ``names`` (dotted paths inside ``model``)
    when given, else by :data:`EMBEDDINGS` (and torchcfm's concat ``MLP``: its first layer, which reads
    ``[x, t]``). Empty when none is known."""
    named = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in named]
        if missing:
            raise WarmStartError(f"two_time: {type(model).__name__} has no module {missing[0]!r} "
                                 "(embedding=... names a module path inside the network)")
        return [(n, named[n]) for n in names]
    # The shallowest module of a known name (a user's wrapper around a diffusers model is searched too).
    by_depth = sorted(named.items(), key=lambda item: item[0].count("."))
    for name, module in by_depth:
        if name and name.rsplit(".", 1)[-1] in EMBEDDINGS["attributes"] and _out_features(module):
            return [(name, module)]
    found = [(n, m) for n, m in named.items() if type(m).__name__ in EMBEDDINGS["classes"]]
    if found:
        return found
    for name, module in by_depth:   # torchcfm's MLP reads [x, t] in its first layer
        if (type(module).__module__.startswith("torchcfm") and type(module).__name__ == "MLP"
                and isinstance(getattr(module, "net", None), nn.Sequential)
                and isinstance(module.net[0], nn.Linear) and getattr(module, "time_varying", False)):
            return [(f"{name}.net.0" if name else "net.0", module.net[0])]
    return []


def _dtype(module) -> torch.dtype:
    """The floating dtype of a module's parameters (float32 when it has none)."""
    for p in (module.parameters() if isinstance(module, nn.Module) else ()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class HookedStudent(nn.Module):
    """``v_{s,t}(x) = b_s(x)`` with ``E(t − s)`` added to the time embedding of the teacher's network.

    ``teacher`` is a :class:`~flowmaps.teachers.TeacherVelocity` (its own copy: the student trains it);
    ``embeddings`` the dotted paths of the modules inside ``teacher.model`` (after unwrapping a
    ``ModelWrapper``) whose output receives ``E(t − s)``, one :class:`GapEmbedding` shared by all of
    them. Called ``student(x, s, t[, cond])`` with per-sample times ``(B,)``.
    """

    def __init__(self, teacher: TeacherVelocity, embeddings: Sequence[str], hidden: int | None = None):
        super().__init__()
        self.teacher = teacher
        inner = _unwrap(teacher.model)
        found = find_time_embeddings(inner, list(embeddings))
        widths = {_out_features(m) for _, m in found}
        if len(widths) != 1 or None in widths:
            raise WarmStartError(f"two_time: the time embeddings {list(embeddings)} of "
                                 f"{type(inner).__name__} have no single output width ({sorted(map(str, widths))})")
        self.embedding_paths = list(embeddings)
        self.gap_embedding = GapEmbedding(widths.pop(), hidden).to(_dtype(found[0][1]))
        self._gap: Tensor | None = None
        self._hits = 0
        _forward_mode_ready(teacher)
        for _, module in found:
            module.register_forward_hook(self._add_gap)

    def _add_gap(self, module, inputs, output):
        if self._gap is None:  # the teacher's network called outside the student (e.g. a test)
            return output
        if not isinstance(output, Tensor) or output.shape[0] != self._gap.shape[0]:
            raise WarmStartError(f"two_time: the time embedding {type(module).__name__} returned "
                                 f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}, not "
                                 f"(B={self._gap.shape[0]}, D)")
        self._hits += 1
        extra = self.gap_embedding(self._gap).to(output.dtype)
        return output + extra.reshape(extra.shape[:1] + (1,) * (output.ndim - 2) + extra.shape[1:])

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        self._gap, self._hits = t - s, 0
        try:
            with math_attention():
                out = self.teacher(x, s, cond)
        finally:
            self._gap = None
        if not self._hits:
            raise WarmStartError(f"two_time: the time embedding {self.embedding_paths} was not called by "
                                 "the teacher's network; name the right one with embedding=...")
        return out


class CorrectedStudent(nn.Module):
    """``v_{s,t}(x) = b_s(x) + c(x, s, t)``: the teacher's velocity (its own copy) plus a correction
    ``c``, a :class:`~flowmaps.nets.MLP` on the flattened sample and ``[s, t − s]`` whose output layer is
    zero (so ``c ≡ 0`` at initialisation and its output layer receives gradient)."""

    def __init__(self, teacher, sample_shape: Sequence[int], width: int = 128, depth: int = 2):
        super().__init__()
        if not callable(teacher):
            raise WarmStartError(f"two_time: the teacher must be callable, got {type(teacher).__name__}")
        self.teacher = teacher
        self.sample_shape = tuple(int(n) for n in sample_shape)
        self.correction = MLP(math.prod(self.sample_shape), width=width, depth=depth).to(_dtype(teacher))
        _forward_mode_ready(teacher)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        with math_attention():
            base = self.teacher(x, s) if cond is None else self.teacher(x, s, cond)
        correction = self.correction(x, s.to(x.dtype), t.to(x.dtype))
        return base + correction.to(base.dtype)


# --- the entry point --------------------------------------------------------------------------------

_FOREIGN = ("diffusers", "torchcfm", "flow_matching", "torchdyn")


def two_time(teacher: nn.Module | Callable, embedding: str | Sequence[str] | None = "auto",
             sample_shape: Sequence[int] | None = None, hidden: int | None = None,
             copy_teacher: bool = True) -> nn.Module:
    """A two-time student ``v_{s,t}(x)`` that is exactly the teacher at initialisation,
    ``v_{s,t}(x) = b_s(x)`` (module docstring); wrap it in :class:`~flowmaps.FlowMap`.

    Args:
        teacher: a flowmaps :class:`~flowmaps.FlowMap` (velocity teacher; its diagonal
            ``b_t = v_{t,t}``) or bare :class:`~flowmaps.nets.MLP` / :class:`~flowmaps.nets.UNet`;
            a :class:`~flowmaps.teachers.TeacherVelocity` (``fm.teachers.torchcfm(...)``,
            ``flow_matching``, ``diffusers_flow``, ``diffusers_vp``); or any velocity ``b(x, t[, cond])``
            in our convention (module or callable).
        embedding: ``"auto"`` finds the time embedding (:data:`EMBEDDINGS`); a dotted module path (or a
            list) names it; ``None`` forces the generic correction (:class:`CorrectedStudent`).
        sample_shape: the shape of one sample; needed by the generic correction.
        hidden: width of the hidden layer of the gap embedding (default: the embedding's width, within
            32–512).
        copy_teacher: deep-copy the teacher (default). ``False`` trains the given object in place.

    Returns an ``nn.Module`` called ``student(x, s, t[, cond])``, all parameters trainable. Raises
    :class:`WarmStartError` (one line) when the teacher cannot seed a student.
    """
    from ..flowmap import FlowMap

    source = teacher
    if isinstance(source, FlowMap):
        source = source.net
    if isinstance(source, (MLP, UNet)):
        net = copy.deepcopy(source) if copy_teacher else source
        net.requires_grad_(True)
        return _warm_mlp(net) if isinstance(net, MLP) else _warm_unet(net)
    if isinstance(teacher, FlowMap):   # a flow map of another network: its diagonal is the velocity
        teacher = _Diagonal(teacher)
    module = type(_unwrap(teacher)).__module__ if isinstance(teacher, nn.Module) else ""
    if not isinstance(teacher, TeacherVelocity) and module.split(".")[0] in _FOREIGN:
        raise WarmStartError(f"two_time: {type(teacher).__name__} from {module.split('.')[0]} predicts in its "
                             "own convention; convert it first, e.g. two_time(fm.teachers.diffusers_vp(model, "
                             "scheduler))")
    made = copy.deepcopy(teacher) if copy_teacher and isinstance(teacher, nn.Module) else teacher
    if isinstance(made, nn.Module):
        made.requires_grad_(True)
    if isinstance(made, TeacherVelocity) and isinstance(made.model, nn.Module) and embedding is not None:
        names = [embedding] if isinstance(embedding, str) and embedding != "auto" else (
            None if embedding == "auto" else list(embedding))
        found = find_time_embeddings(_unwrap(made.model), names)
        if found:
            return HookedStudent(made, [n for n, _ in found], hidden)
        if names is None and sample_shape is None:
            raise WarmStartError(f"two_time: no known time embedding in {type(_unwrap(made.model)).__name__}; "
                                 "name it (embedding='path.to.module') or give sample_shape for the generic "
                                 "correction")
    if sample_shape is None:
        raise WarmStartError("two_time: the generic student (teacher velocity + zero-initialised correction) "
                             "needs sample_shape, the shape of one sample")
    return CorrectedStudent(made, sample_shape, width=hidden or 128)


class _Diagonal(nn.Module):
    """``b_t(x) = v_{t,t}(x)`` of a flow map, as a velocity module."""

    def __init__(self, flowmap):
        super().__init__()
        self.flowmap = flowmap

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.flowmap.velocity(x, t, cond)


@register_network
class FactoryStudent(nn.Module):
    """The warm-started student of a ``teacher.factory`` teacher, rebuilt from JSON: the user's function
    ``factory`` (``package.module:function``, imported, never unpickled) called with ``kwargs``, converted
    by ``adapter`` (with base scale ``sigma0``), made two-time by :func:`two_time`. Its options are what
    ``config.json`` of an export records; the weights (teacher copy and embedding) come from
    ``model.safetensors``, so the factory's own weights file is not needed to load it. Building it
    imports the factory: loading an export needs the user's module on ``PYTHONPATH``.

    Use :meth:`copy_teacher` to take the weights of a built teacher (the run's ``teacher.weights``)."""

    def __init__(self, factory: str, kwargs: dict | None = None, adapter: str | None = None,
                 sigma0: float = 1.0, sample_shape: Sequence[int] | None = None, embedding: str | None = "auto",
                 hidden: int | None = None):
        super().__init__()
        velocity = from_factory(factory, kwargs=kwargs, weights=None, adapter=adapter, sigma0=sigma0)
        self.student = two_time(velocity, embedding=embedding, sample_shape=sample_shape, hidden=hidden,
                                copy_teacher=False)

    @torch.no_grad()
    def copy_teacher(self, teacher) -> "FactoryStudent":
        """Load the weights of ``teacher`` (the same factory's velocity, with its weights) into the copy
        of the teacher inside this student."""
        inner = self.student.teacher
        if isinstance(inner, nn.Module) and isinstance(teacher, nn.Module):
            try:
                inner.load_state_dict(teacher.state_dict())
            except RuntimeError as err:
                raise WarmStartError("two_time: the teacher's weights do not fit the network its factory "
                                     f"builds ({str(err).splitlines()[0][:200]})") from None
        return self

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.student(x, s, t, cond)
