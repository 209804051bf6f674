"""Metric sinks beside ``metrics.jsonl``, which stays the run's record: TensorBoard
(``train.logger=tensorboard``), an optional extra (``pip install 'flowmaps[tensorboard]'``).

A sink receives every record the run writes to ``metrics.jsonl``: step records (loss, terms, statistics,
learning rate, gradient norm), ``checkpoint`` events (validation loss) and ``skipped`` events. Rank 0
alone writes. A resumed run drops what the interrupted one logged after the checkpoint it resumes
from, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

from pathlib import Path

from .extras import require

__all__ = ["check_logger", "open_sink", "TensorBoardSink", "TENSORBOARD_EXTRA"]

TENSORBOARD_EXTRA = "pip install 'flowmaps[tensorboard]'"


def check_logger(name: str) -> None:
    """Refuse (one line naming the extra) a logger whose package is missing, before anything is
    written."""
    if name == "tensorboard":
        require("train.logger: tensorboard", {"tensorboard": "the tensorboard package"},
                TENSORBOARD_EXTRA)


class TensorBoardSink:
    """Scalars for TensorBoard in ``folder``: ``train/<name>`` of every step record, ``validation/loss``
    at checkpoints, ``train/skipped`` (1) at skipped steps. ``resume_step``: events after it, written
    by an interrupted run, are purged."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        step, event = record.get("step"), record.get("event")
        if event == "checkpoint":
            self.writer.add_scalar("validation/loss", record["validation_loss"], step)
        elif event == "skipped":
            self.writer.add_scalar("train/skipped", 1.0, step)
        elif event is None:
            for name, value in record.items():
                if name not in ("step", "seconds") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


def open_sink(name: str, run_path: Path, resume_step: int | None = None) -> TensorBoardSink | None:
    """The sink ``train.logger`` names (``None`` for ``jsonl``: ``metrics.jsonl`` is always written)."""
    if name == "tensorboard":
        return TensorBoardSink(Path(run_path) / "tensorboard", resume_step)
    return None
