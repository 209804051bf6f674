"""Counting host synchronisations: the operations of a block of code that make the host wait for a device.

On a GPU the host queues kernels and runs ahead; an operation whose result the host needs at once (a
value read back with ``.item()``, ``bool()``, ``float()`` or an ``if`` on a tensor, an output whose size
depends on the values such as ``nonzero`` or boolean-mask indexing, a blocking copy between host and
device) stops it until the device has finished everything queued before. A training step should make
none. :class:`HostSyncs` counts them with a ``TorchDispatchMode``, so it sees every ATen operation
whatever Python or C++ code issued it (an optimiser kernel's argument parsing included), on any device::

    with HostSyncs("cuda") as syncs:
        trainer.step()
    syncs.count, syncs.sites  # 0, Counter()

Which operations count (:data:`SYNC_READS`, :data:`MASK_INDEXED`, :data:`COPIES`): a read of a tensor
on the counted device; a copy that moves data between that device and the host without
``non_blocking`` (also a tensor made from Python numbers directly on the device: ``torch.tensor(x,
device="cuda")`` copies from host memory and waits). Counting the CPU (``HostSyncs("cpu")``) is a
rehearsal: a CPU read waits for nothing, but it is the same read that waits when the tensor lives on
a GPU, so the CPU count of a step is what the GPU would count, except for the copies between host and
device, which a CPU run cannot see (it has one memory). A few reads bypass the dispatcher when the
tensor is already in host memory (``tolist``, ``numpy``, ``cpu``); for the CPU they are counted at
the Python level while the counter is active. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` is
an independent cross-check (``benchmarks/gpu_check.py`` reports both).
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs", "SYNC_READS", "MASK_INDEXED", "COPIES"]

SYNC_READS: dict[str, str] = {
    "_local_scalar_dense": "a value read on the host (.item(), bool(), float(), int(), a tensor in an if)",
    "item": "a value read on the host",
    "is_nonzero": "bool() of a one-element tensor",
    "equal": "torch.equal returns a Python bool",
    "allclose": "torch.allclose returns a Python bool",
    "nonzero": "output size depends on the values",
    "argwhere": "output size depends on the values",
    "masked_select": "output size depends on the values",
    "_unique": "output size depends on the values",
    "_unique2": "output size depends on the values",
    "unique_dim": "output size depends on the values",
    "unique_consecutive": "output size depends on the values",
    "unique_dim_consecutive": "output size depends on the values",
    "repeat_interleave": "output size depends on the repeats (unless output_size is given)",
    "bincount": "output size depends on the largest value",
}
"""ATen operations (by name, any overload) that read a tensor's values on the host, and why."""

MASK_INDEXED = ("index", "index_put", "index_put_", "_index_put_impl_")
"""Indexing operations that synchronise when an index is a boolean mask (``x[mask]``,
``x[mask] = y``): the mask becomes positions through ``nonzero``."""

COPIES = ("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "lift_fresh")
"""Copies, counted when they move data between the counted device and the host and block."""

_PYTHON_READS = ("tolist", "numpy", "cpu")  # host-memory reads that never reach the dispatcher
_FILE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_MACHINERY = tuple(os.path.join(_TORCH, *p.split("/")) for p in (  # dispatch and tracing frames
    "_dynamo/", "utils/_python_dispatch.py", "_ops.py", "overrides.py", "_compile.py",
    "utils/_contextlib.py", "_tensor.py"))


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _short(path: str) -> str:
    parts = path.replace(os.sep, "/").split("/")
    for root in ("flowmaps", "torch"):
        if root in parts[:-1]:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
    return "/".join(parts[-2:])


def _site() -> str:
    """``file:line`` of the innermost caller outside torch and this module, where the sync is written;
    when torch's own Python code issued it (an optimiser), that torch line too."""
    frame, inner_torch = sys._getframe(2), None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_TORCH + os.sep):
            if inner_torch is None and not path.startswith(_MACHINERY):
                inner_torch = frame
        elif path != _FILE:
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
    if inner_torch is not None:
        where += f" (in {_short(inner_torch.f_code.co_filename)}:{inner_torch.f_lineno})"
    return where


class HostSyncs(TorchDispatchMode):
    """Count, while active, the operations that make the host wait for ``device`` (module docstring).

    Args:
        device: the device whose tensors count (``"cuda"``, ``"cuda:1"``, ``"cpu"``, a
            :class:`torch.device`); its type is what matters.

    After the block: :attr:`count` (int), :attr:`ops` (``Counter`` of ATen operation names or
    ``Tensor.<method>``) and :attr:`sites` (``Counter`` of ``"op at file:line"``, where each was issued).
    Counting the CPU, :attr:`host_made` lists the tensors made from Python numbers
    (``torch.tensor(x)``, ``torch.as_tensor(x)``, ``new_tensor``): not a sync on the CPU, but a
    blocking copy where such a tensor is made on a GPU, so the places a GPU run should look at when its
    count of copies is not 0.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.count = 0
        self.ops: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self.host_made: collections.Counter[str] = collections.Counter()
        self._saved: dict = {}

    def _record(self, op: str) -> None:
        self.count += 1
        self.ops[op] += 1
        self.sites[f"{op} at {_site()}"] += 1

    def _on_device(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self.device_type

    def _moves(self, source: torch.device, target: torch.device) -> bool:
        """A copy between the counted (non-CPU) device and the host."""
        if source.type == target.type or self.device_type == "cpu":
            return False
        return self.device_type in (source.type, target.type) and "cpu" in (source.type, target.type)

    def _is_sync(self, func, args, kwargs, out) -> bool:
        name = func._schema.name.split("::")[-1]
        if name in SYNC_READS:
            if name == "repeat_interleave" and kwargs.get("output_size") is not None:
                return False
            return any(self._on_device(t) for t in _tensors(list(args) + list(kwargs.values())))
        if name in MASK_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            masks = [i for i in _tensors(indices) if i.dtype in (torch.bool, torch.uint8)]
            return bool(masks) and any(self._on_device(t) for t in _tensors([args[0], *masks]))
        if name in COPIES:
            if name == "lift_fresh":  # made from Python numbers: blocking when made on the device
                if self.device_type == "cpu" and isinstance(out, torch.Tensor) and self._on_device(out):
                    self.host_made[f"{name} at {_site()}"] += 1
                return isinstance(out, torch.Tensor) and self._moves(torch.device("cpu"), out.device)
            if name == "_to_copy":
                target = kwargs.get("device") or args[0].device
                blocking = not kwargs.get("non_blocking", False)
                return blocking and self._moves(args[0].device, torch.device(target))
            if name in ("copy_", "_copy_from", "_copy_from_and_resize"):
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
                dst, src = (args[0], args[1]) if name == "copy_" else (args[1], args[0])
                return not non_blocking and self._moves(src.device, dst.device)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._is_sync(func, args, kwargs, out):
            self._record(str(func.overloadpacket))
        return out

    def __enter__(self):
        if self.device_type == "cpu":  # these read host memory without reaching the dispatcher
            self._saved = {name: getattr(torch.Tensor, name) for name in _PYTHON_READS}
            for name, real in self._saved.items():
                def counted(tensor, *args, _real=real, _name=name, **kwargs):
                    if tensor.device.type == "cpu":
                        self._record(f"Tensor.{_name}")
                    return _real(tensor, *args, **kwargs)
                setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved = {}
        return super().__exit__(*exc)
