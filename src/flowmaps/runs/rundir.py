"""Run directories: each run writes its own folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``plots/``; ``ema_snapshots/`` and ``ema/`` with the power-function EMA), never one that holds another
run's files unless asked to overwrite or resume it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..checkpoint import _atomic_write
from .config import Config

__all__ = ["RunDir", "RunDirError", "check_parents", "default_out"]


class RunDirError(ValueError):
    """An output directory that cannot be used; the message is one line naming it."""


class RunDir:
    """A run's folder. Refuses a folder that already holds files unless ``overwrite`` (or ``resume``,
    which continues the run in it). Nothing is created before :meth:`create` (rank 0 only)."""

    ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "plots", "samples", "results.json",
                 "table.md", "tensorboard", "ema_snapshots", "ema")

    def __init__(self, path: str | Path, overwrite: bool = False, create: bool = True,
                 resume: bool = False):
        self.path = Path(path)
        self.overwrite, self.resume = overwrite, resume
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path}: exists and is not a directory")
        check_parents(self.path)
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise RunDirError(f"--resume: {self.path} is not a run directory (no config.yaml)")
        elif self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            hint = " or --resume to continue it" if (self.path / "config.yaml").is_file() else ""
            raise RunDirError(f"--out {self.path}: already holds files (another run?); choose a new "
                              f"directory or pass --overwrite{hint}")
        if create:
            self.create()

    def create(self) -> None:
        if self.overwrite and not self.resume and self.path.is_dir():
            for name in self.ARTIFACTS:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        (self.path / "plots").mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _records(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a resume starts from)."""
        kept = [r for r in self._records() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        _atomic_write(self.path / "metrics.jsonl", lambda h: h.write(text))

    def losses(self) -> list[float]:
        """Logged training losses, in step order (for the loss plot of a resumed run too)."""
        return [r["loss"] for r in self._records() if "event" not in r and "loss" in r]


def check_parents(path: Path) -> None:
    """Refuse a path whose nearest existing ancestor is not a directory (mkdir would fail midway)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RunDirError(f"--out {path}: {parent} is not a directory")


def default_out(cfg: Config, what: str) -> Path:
    """``runs/<preset>-<what>-<time>``, the run directory when no ``--out`` is given."""
    return Path("runs") / f"{cfg.preset}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"
