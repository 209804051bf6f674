"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is ever unpickled.

A checkpoint named ``STEM`` is the pair ``STEM.safetensors`` (weights, prefixed ``model.`` and ``ema.``)
and ``STEM.json`` (format version, library version, config, step, objective, interpolant, resolved data
scales, standardiser). Both files are written atomically: to a temporary file in the same folder,
flushed and fsynced, then renamed over the target, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

FORMAT = "flowmaps-checkpoint"
FORMAT_VERSION = 1

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "checkpoint_stem"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def checkpoint_stem(path: str | Path) -> Path:
    """Accept ``STEM``, ``STEM.json``, ``STEM.safetensors`` or a run directory (its ``checkpoints/final``)."""
    path = Path(path)
    if path.is_dir():
        final = path / "checkpoints" / "final"
        if final.with_suffix(".json").exists():
            return final
        raise CheckpointError(f"{path}: a directory without checkpoints/final.json")
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix("")
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

    from . import __version__

    stem = Path(stem)
    flat = {f"{group}.{name}": t.detach().contiguous().cpu()
            for group, state in tensors.items() for name, t in state.items()}
    blob = save(flat)
    meta = dict(metadata, format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                groups=sorted(tensors))
    text = json.dumps(meta, indent=2, default=_json_default).encode()
    _atomic_write(stem.with_suffix(".safetensors"), lambda h: h.write(blob))
    _atomic_write(stem.with_suffix(".json"), lambda h: h.write(text))
    return stem


def _json_default(obj: Any):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Read a checkpoint; returns ``({group: state_dict}, metadata)``. Raises :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    stem = checkpoint_stem(path)
    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path}: not valid JSON (truncated or corrupted)") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a flowmaps checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {metadata.get('format_version')} is not "
                              f"supported by this library (format {FORMAT_VERSION})")
    raw = weights_path.read_bytes()
    if raw[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or raw[:2] == b"PK":
        raise CheckpointError(f"{weights_path}: a pickle/zip file, not safetensors; refusing to load it")
    try:
        flat = load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError):
        raise CheckpointError(f"{weights_path}: not a valid safetensors file (truncated or "
                              "corrupted)") from None
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = tensor
    missing = set(metadata.get("groups", [])) - set(groups)
    if missing:
        raise CheckpointError(f"{weights_path}: missing weight groups {sorted(missing)}")
    return groups, metadata

