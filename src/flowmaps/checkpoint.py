"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is ever unpickled.

A checkpoint named ``STEM`` is the pair ``STEM.safetensors`` (weights, prefixed ``model.`` and ``ema.``)
and ``STEM.json`` (format version, library version, config, step, objective, interpolant, resolved data
scales, standardiser, SHA-256 of the weights file). Both files are written atomically: to a temporary
file in the same folder, flushed and fsynced, then renamed over the target, so a reader never sees a
half-written checkpoint; the JSON is written last, so its presence marks a complete checkpoint.

Compatibility rule. The contract is the JSON's ``format`` (``"flowmaps-checkpoint"``) and its integer
``format_version``; this library reads exactly :data:`FORMAT_VERSION` (older formats would be migrated
here, should there ever be any; a newer one is refused with a message naming the library that wrote it,
so the user knows to upgrade). ``library_version`` is informational only: any library version that
writes format 1 is read, whatever its major number. Format 1 requires ``groups`` (the weight groups,
e.g. ``["ema", "model"]``), ``config`` (a valid resolved config), ``scales`` (``dim``, ``sigma0``,
``sigma_data``) and ``standardizer`` (``null`` or per-dimension ``mean``/``std``); ``weights_sha256``
is checked when present (checkpoints written before it was added have none). This module knows the
file format only: whether ``config`` is a valid resolved config is checked by the caller that knows the
config schema (:func:`flowmaps.runs.models.check_model_checkpoint` passes that check to
:func:`check_model_metadata`), so the format depends on no layer above it.

Exported models. ``flowmaps export`` writes a folder with ``model.safetensors`` (one set of weights: the
EMA, or the raw weights; no optimiser, RNG or training state) and ``config.json`` (format
``"flowmaps-model"``, integer ``format_version``, library version, SHA-256 of the weights, and what
:meth:`flowmaps.FlowMap.from_pretrained` needs to rebuild the map: network class and constructor
options, interpolant, scales, standardiser, training domain). It follows the same compatibility rule
and the same safety checks (:func:`save_model_folder`, :func:`load_model_folder`).

Safety. Loading never executes code from a file: weights are parsed by safetensors (a JSON header plus
raw tensor bytes) and metadata by :func:`json.loads`; ``pickle``/``torch.load`` are never used. A pickle
or a ``torch.save`` zip offered as a checkpoint (``.pt``, ``.pth``, ``.ckpt``, or renamed
``.safetensors``) is recognised by its first bytes and refused with a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from ._version import __version__

FORMAT = "flowmaps-checkpoint"
FORMAT_VERSION = 1

__all__ = ["save_checkpoint", "load_checkpoint", "check_model_metadata", "check_scales",
           "check_standardizer", "read_safetensors", "CheckpointError", "checkpoint_stem",
           "checkpoint_files", "FORMAT", "FORMAT_VERSION", "save_model_folder", "load_model_folder",
           "model_folder", "MODEL_FORMAT", "MODEL_FORMAT_VERSION"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def checkpoint_files(stem: str | Path) -> tuple[Path, Path]:
    """``(STEM.json, STEM.safetensors)``; the suffixes are appended, so a stem may contain dots."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _sniff(head: bytes, tail: bytes = b"") -> str | None:
    """What a file that is not a flowmaps checkpoint file looks like, from its first (and last) bytes."""
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return "a Python pickle"
    if head[:1] and head[:1] in b"(c])}ILSVNFiXUKJMG" and tail.rstrip()[-1:] == b".":  # opcode ... STOP
        return "a Python pickle (protocol 0/1)"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "a zip archive (e.g. torch.save, which holds a pickle)"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy .npy array"
    return None


def _safetensors_layout(raw: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON header that fits in the file."""
    if len(raw) < 10:
        return False
    n = int.from_bytes(raw[:8], "little")
    return 2 <= n <= len(raw) - 8 and raw[8:9] == b"{"


def _head_tail(path: Path, n: int = 16) -> tuple[bytes, bytes]:
    with open(path, "rb") as handle:
        head = handle.read(n)
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - n))
        return head, handle.read(n)


def checkpoint_stem(path: str | Path) -> Path:
    """Accept ``STEM``, ``STEM.json``, ``STEM.safetensors`` or a run directory (its ``checkpoints/final``).

    Any other existing file (``model.pt``, ``weights.ckpt``, ...) is refused: flowmaps checkpoints are
    never pickles, and such a file is not opened beyond its first and last bytes.
    """
    path = Path(path)
    if path.is_dir():
        final = path / "checkpoints" / "final"
        if checkpoint_files(final)[0].exists():
            return final
        raise CheckpointError(f"{path}: neither a run directory (no checkpoints/final.json) nor an "
                              f"exported model (no {MODEL_CONFIG}, see `flowmaps export`)")
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix("")
    if path.is_file() and not checkpoint_files(path)[0].exists():
        kind = _sniff(*_head_tail(path)) or "not a flowmaps checkpoint"
        raise CheckpointError(f"{path}: {kind}; refusing to load it (a flowmaps checkpoint is "
                              "STEM.safetensors + STEM.json, never a pickle)")
    return path


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(stem: str | Path, tensors: dict[str, dict[str, Tensor]], metadata: dict) -> Path:
    """Write ``{group: state_dict}`` (e.g. ``{"model": ..., "ema": ...}``) and ``metadata`` atomically.

    The JSON is written last, so its presence marks a complete checkpoint.
    """
    from safetensors.torch import save

    stem = Path(stem)
    flat = {f"{group}.{name}": t.detach().contiguous().cpu()
            for group, state in tensors.items() for name, t in state.items()}
    blob = save(flat)
    meta = dict(metadata, format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                groups=sorted(tensors), weights_sha256=hashlib.sha256(blob).hexdigest())
    text = json.dumps(meta, indent=2, default=_json_default).encode()
    meta_path, weights_path = checkpoint_files(stem)
    _atomic_write(weights_path, lambda h: h.write(blob))
    _atomic_write(meta_path, lambda h: h.write(text))
    return stem


def _json_default(obj: Any):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_scale(where: Path, key: str, value: Any, dim: int) -> None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) and v > 0 for v in values) or len(values) not in (1, dim):
        raise CheckpointError(f"{where}: scales.{key} must be a positive number or {dim} of them, "
                              f"got {value!r}"[:300])


def check_model_metadata(where: Path, meta: dict, check_config=None) -> None:
    """The format-1 schema of a model checkpoint (see the module docstring); every message names the
    file and the field. ``check_config(where, config)`` validates the ``config`` mapping (raising
    :class:`CheckpointError`); without it only its presence is checked."""
    groups = meta.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise CheckpointError(f"{where}: 'groups' must be a non-empty list of names, got {groups!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{where}: 'config' is missing or not a mapping")
    if check_config is not None:
        check_config(where, meta["config"])
    dim = check_scales(where, meta.get("scales"))
    check_standardizer(where, meta.get("standardizer"), dim)
    step = meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be a non-negative integer, got {step!r}")


def check_scales(where: Path, scales) -> int:
    """The ``scales`` mapping of a model (``dim``, ``sigma0``, ``sigma_data``, optional ``shape`` and
    ``num_classes``); returns ``dim``."""
    if not isinstance(scales, dict):
        raise CheckpointError(f"{where}: 'scales' is missing or not a mapping")
    dim = scales.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise CheckpointError(f"{where}: scales.dim must be a positive integer, got {dim!r}")
    for key in ("sigma0", "sigma_data"):
        _check_scale(where, key, scales.get(key), dim)
    shape = scales.get("shape")
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            or math.prod(shape) != dim):
        raise CheckpointError(f"{where}: scales.shape must be positive integers whose product is "
                              f"scales.dim ({dim}), got {shape!r}"[:300])
    classes = scales.get("num_classes", 0)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise CheckpointError(f"{where}: scales.num_classes must be a non-negative integer, "
                              f"got {classes!r}")
    return dim


def check_standardizer(where: Path, std, dim: int) -> None:
    """``null`` or ``{"mean": [dim numbers], "std": [dim positive numbers]}``."""
    if std is not None:
        ok = isinstance(std, dict) and all(
            isinstance(std.get(k), list) and len(std[k]) == dim and all(_is_number(v) for v in std[k])
            for k in ("mean", "std"))
        if not ok or not all(v > 0 for v in std["std"]):
            raise CheckpointError(f"{where}: 'standardizer' must be null or hold {dim} finite means and "
                                  "positive stds")


def load_checkpoint(path: str | Path, check=None) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Read a checkpoint; returns ``({group: state_dict}, metadata)``. Raises :class:`CheckpointError`.

    Everything is checked before any tensor is returned: the compatibility rule and schema of the JSON
    (module docstring), that the weights file is safetensors (pickles and zips are refused unread), its
    checksum, the weight groups, and that every floating-point weight is finite. ``check(meta_path,
    metadata)`` is the schema check of the file's kind: by default :func:`check_model_metadata` without
    the config check (model checkpoints of runs are loaded with
    :func:`flowmaps.runs.models.check_model_checkpoint`, which adds it); other kinds of file kept in
    the same format pass their own (e.g. the feature classifier of :mod:`flowmaps.metrics.classifier`).
    """
    stem = checkpoint_stem(path)
    meta_path, weights_path = checkpoint_files(stem)
    if not meta_path.is_file() and not weights_path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (expected {meta_path.name} and "
                              f"{weights_path.name}, a run directory or an exported model folder)")
    if not meta_path.is_file():
        kind = _sniff(*_head_tail(weights_path))
        if kind is not None:
            raise CheckpointError(f"{weights_path}: {kind}, not safetensors; refusing to load it")
        raise CheckpointError(f"checkpoint file not found: {meta_path}")
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {weights_path}")
    metadata = _read_metadata(meta_path, FORMAT, FORMAT_VERSION, "checkpoint")
    (check or check_model_metadata)(meta_path, metadata)
    flat = _read_weights(weights_path, metadata.get("weights_sha256"), meta_path.name)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = tensor
    missing = set(metadata["groups"]) - set(groups)
    if missing:
        raise CheckpointError(f"{weights_path}: missing weight groups {sorted(missing)}")
    return groups, metadata


def _read_metadata(meta_path: Path, fmt: str, version_read: int, what: str) -> dict:
    """The JSON of a ``fmt`` file, after the compatibility rule of the module docstring: parsed with
    :func:`json.loads` only (a pickle is named, never opened), ``format`` and an integer
    ``format_version`` this library reads."""
    raw_meta = meta_path.read_bytes()
    try:
        metadata = json.loads(raw_meta.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        kind = _sniff(raw_meta[:16], raw_meta[-16:])
        text = f"{kind}, not JSON" if kind else "not valid JSON (truncated or corrupted)"
        raise CheckpointError(f"{meta_path}: {text}; refusing to load it") from None
    if not isinstance(metadata, dict) or metadata.get("format") != fmt:
        raise CheckpointError(f"{meta_path}: not a flowmaps {what} (no \"format\": \"{fmt}\")")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{meta_path}: format_version must be an integer, got {version!r}")
    if version != version_read:
        writer = metadata.get("library_version")
        hint = "; upgrade flowmaps to read it" if version > version_read else ""
        raise CheckpointError(f"{meta_path}: {what} format {version} (written by flowmaps "
                              f"{writer}) is not supported by this library (reads format "
                              f"{version_read}){hint}")
    return metadata


def _read_weights(weights_path: Path, digest: str | None, meta_name: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file: its layout checked first (pickles and zips are named and
    refused unread), then the SHA-256 recorded beside it (when given), then every floating-point
    tensor's finiteness."""
    raw = weights_path.read_bytes()
    _check_safetensors_layout(raw, weights_path)
    if digest is not None and digest != hashlib.sha256(raw).hexdigest():
        raise CheckpointError(f"{weights_path}: checksum does not match {meta_name} (corrupted, "
                              "or the two files come from different checkpoints)")
    return _parse_safetensors(raw, weights_path)


def _check_safetensors_layout(raw: bytes, path: Path) -> None:
    """Refuse bytes that are not a safetensors file: a pickle, a zip or an array by name, else as
    truncated or corrupted. Checked before anything parses them (a valid header length may begin
    ``b"\\x80\\x02"``, so the layout is tested first)."""
    if not _safetensors_layout(raw):
        kind = _sniff(raw[:16], raw[-16:])
        if kind is not None:
            raise CheckpointError(f"{path}: {kind}, not safetensors; refusing to load it")
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupted)")


def _parse_safetensors(raw: bytes, path: Path) -> dict[str, Tensor]:
    """The tensors of safetensors bytes whose layout was checked; every floating-point one finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        flat = load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError):
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupted)") from None
    for key, tensor in flat.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values "
                                  "(corrupted, or saved from a diverged run)")
    return flat


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a plain ``.safetensors`` file (e.g. a teacher's ``state_dict`` saved with
    ``safetensors.torch.save_file``), checked as checkpoint weights are: a pickle, ``torch.save`` zip or
    ``.npy`` file is refused by its first bytes without being parsed, a truncated file or a NaN weight
    with a one-line :class:`CheckpointError`. Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a directory' if path.is_dir() else 'file not found'}, "
                              "expected a .safetensors file")
    raw = path.read_bytes()
    _check_safetensors_layout(raw, path)
    return _parse_safetensors(raw, path)


# --- exported models: a folder with model.safetensors and config.json ---------------------------

MODEL_FORMAT = "flowmaps-model"
MODEL_FORMAT_VERSION = 1
MODEL_WEIGHTS, MODEL_CONFIG = "model.safetensors", "config.json"


def model_folder(path: str | Path) -> Path | None:
    """The exported-model folder ``path`` names (the folder, or its ``config.json`` or
    ``model.safetensors``), or ``None`` when it is something else (a run directory, a checkpoint)."""
    path = Path(path)
    if path.name in (MODEL_WEIGHTS, MODEL_CONFIG) and path.parent.is_dir():
        return path.parent
    if path.is_dir() and ((path / MODEL_CONFIG).exists() or (path / MODEL_WEIGHTS).exists()):
        return path
    return None


def save_model_folder(directory: str | Path, tensors: dict[str, Tensor], config: dict,
                      overwrite: bool = False) -> Path:
    """Write an exported model: ``model.safetensors`` (``tensors``) then ``config.json`` (``config``
    with the format, its version, the library version and the SHA-256 of the weights), each atomically;
    the JSON last, so it marks a complete export. A folder that holds other files is refused unless
    ``overwrite`` (which replaces these two files and leaves the rest)."""
    from safetensors.torch import save

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    parent = next((p for p in directory.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CheckpointError(f"{directory}: {parent} is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory}: already holds files; choose a new folder or overwrite "
                              "(--overwrite)")
    blob = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    meta = dict(config, format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION,
                library_version=__version__, weights_sha256=hashlib.sha256(blob).hexdigest())
    text = json.dumps(meta, indent=2, default=_json_default).encode()
    _atomic_write(directory / MODEL_WEIGHTS, lambda h: h.write(blob))
    _atomic_write(directory / MODEL_CONFIG, lambda h: h.write(text))
    return directory


def load_model_folder(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read an exported model folder; returns ``(tensors, config)``. The JSON is read under the
    compatibility rule (format ``flowmaps-model``, version :data:`MODEL_FORMAT_VERSION`), the weights as
    checkpoints' are (safetensors only, checksum required, finite); what the config describes is
    checked by :meth:`flowmaps.FlowMap.from_pretrained`. Raises :class:`CheckpointError`."""
    directory = Path(directory)
    config_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
    if not directory.is_dir():
        raise CheckpointError(f"exported model not found: {directory} (a folder with {MODEL_WEIGHTS} "
                              f"and {MODEL_CONFIG}, made by `flowmaps export`)")
    for path in (config_path, weights_path):
        if not path.is_file():
            kind = _sniff(*_head_tail(weights_path)) if weights_path.is_file() else None
            if kind is not None:
                raise CheckpointError(f"{weights_path}: {kind}, not safetensors; refusing to load it")
            raise CheckpointError(f"{directory}: {path.name} not found (an exported model is "
                                  f"{MODEL_WEIGHTS} + {MODEL_CONFIG}, made by `flowmaps export`)")
    config = _read_metadata(config_path, MODEL_FORMAT, MODEL_FORMAT_VERSION, "exported model")
    digest = config.get("weights_sha256")
    if not isinstance(digest, str):
        raise CheckpointError(f"{config_path}: 'weights_sha256' is missing (every export records it)")
    return _read_weights(weights_path, digest, config_path.name), config
