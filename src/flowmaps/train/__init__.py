"""Training: :mod:`~flowmaps.train.trainer` (:class:`Trainer`, the step every objective shares),
:mod:`~flowmaps.train.fitting` (:func:`fit`, training in one call), :mod:`~flowmaps.train.state` (the
trainer's resumable state), :mod:`~flowmaps.train.schedules` (learning-rate schedules),
:mod:`~flowmaps.train.batches` (the data source behind each batch),
:mod:`~flowmaps.train.distributed` (torchrun, per-rank seeds, the DDP-with-JVP pitfall),
:mod:`~flowmaps.train.resume` (checkpoint rotation, newest-checkpoint discovery, graceful stop) and
:mod:`~flowmaps.train.host_syncs` (counting the operations of a step that make the host wait for the
device)."""

from .fitting import FitResult, fit
from .resume import CheckpointRotation, StopOnSignal, latest_checkpoint
from .schedules import inverse_sqrt_schedule
from .trainer import Trainer

__all__ = ["Trainer", "fit", "FitResult", "inverse_sqrt_schedule", "CheckpointRotation", "latest_checkpoint",
           "StopOnSignal"]
