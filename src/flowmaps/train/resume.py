"""Resumable training checkpoints of a run: rotation (last N + best), discovery, graceful stop.

A run directory's ``checkpoints/`` holds

* ``step-00001000.{safetensors,json}`` … — the newest ``keep`` training checkpoints, each complete (model,
  EMA, optimiser, every rank's RNG state, the objective's state, counters; see
  :meth:`flowmaps.train.trainer.Trainer.state_dict`);
* ``best.*`` — the training checkpoint with the lowest validation loss so far;
* ``final.*`` — written when the run completes (also resumable: raise ``train.steps`` to extend a run).

Every file is written atomically (temporary file, fsync, rename; the JSON last, so a ``.json`` marks a
complete pair), older step files are deleted only after the new one is complete, so there is never a
half-written newest checkpoint. :func:`latest_checkpoint` finds where to resume.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, load_checkpoint

__all__ = ["CheckpointRotation", "latest_checkpoint", "StopOnSignal"]

STEP_PATTERN = re.compile(r"^step-(\d+)\.json$")


def _step_files(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_PATTERN.match(path.name)
        if match and path.with_suffix(".safetensors").is_file():
            found.append((int(match.group(1)), path.with_suffix("")))
    return sorted(found)


def latest_checkpoint(folder: str | Path, skipped: list[str] | None = None, check=None
                      ) -> tuple[Path, dict, dict] | None:
    """The newest resumable checkpoint in ``folder`` as ``(stem, tensors, metadata)``, or ``None``.

    Candidates are ``final`` and every ``step-K``, newest step first; one that fails to load (corrupted
    by something outside this library) is reported on stderr (or appended to ``skipped``, when given,
    for the caller to report) and the next older one is used. ``check`` is the schema check passed to
    :func:`~flowmaps.checkpoint.load_checkpoint`.
    """

    def skip(reason: str) -> None:
        if skipped is None:
            print(f"flowmaps: warning: {reason}", file=sys.stderr)
        else:
            skipped.append(reason)

    folder = Path(folder)
    candidates = [(step, stem) for step, stem in _step_files(folder)]
    final = folder / "final"
    if final.with_suffix(".json").is_file():
        candidates.append((float("inf"), final))
    for _, stem in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            tensors, meta = load_checkpoint(stem, check=check)
        except CheckpointError as err:
            skip(f"skipping unusable checkpoint ({err})")
            continue
        if "trainer" not in meta:
            skip(f"{stem} holds no training state; skipping it")
            continue
        return stem, tensors, meta
    return None


class CheckpointRotation:
    """Writes ``step-K`` checkpoints, keeps the newest ``keep`` of them and a ``best`` copy.

    ``write(stem, ...)`` is the function that writes one checkpoint pair (the caller's; it knows the
    run's metadata). ``best_loss`` is restored from the resumed checkpoint's metadata.
    """

    def __init__(self, folder: str | Path, keep: int = 3, best_loss: float | None = None):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.folder, self.keep = Path(folder), int(keep)
        self.best_loss = best_loss

    def save(self, step: int, write, validation_loss: float | None = None) -> Path:
        """Write ``step-K`` (and ``best`` when ``validation_loss`` improves), then prune old steps."""
        stem = self.folder / f"step-{step:08d}"
        improved = validation_loss is not None and validation_loss == validation_loss and (
            self.best_loss is None or validation_loss < self.best_loss)
        if improved:
            self.best_loss = validation_loss
        write(stem, self.best_loss)
        if improved:
            write(self.folder / "best", self.best_loss)
        for _, old in _step_files(self.folder)[:-self.keep]:
            # JSON first: a pair without its JSON is never offered for resume.
            old.with_suffix(".json").unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        return stem


class StopOnSignal:
    """Context manager: the first SIGTERM or SIGINT sets :attr:`signal_name` instead of killing the
    process, so the training loop can finish its step and write a checkpoint; a second SIGINT raises
    ``KeyboardInterrupt`` at once. Previous handlers are restored on exit."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = name
        print(f"\nflowmaps: {name} received; finishing the current step and writing a checkpoint "
              "(SIGINT again to abort)", file=sys.stderr)

    def __enter__(self) -> "StopOnSignal":
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
