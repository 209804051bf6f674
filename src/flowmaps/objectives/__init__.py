"""Training objectives for flow maps. Each is a small callable; see :mod:`flowmaps.objectives.base`.

* :class:`Velocity` — flow matching on the diagonal (trains teachers).
* :class:`FMM` — direct flow map matching from samples (Lagrangian + invertibility).
* :class:`LMD` — Lagrangian map distillation from a teacher velocity.
* :class:`EMD` — Eulerian map distillation from a teacher velocity.
* :class:`PFMM` — progressive flow map matching (range doubling, refreshed teacher).
"""

from .base import GuidedVelocity, LossOutput, Objective, TimeSampler
from .emd import EMD
from .fmm import FMM
from .lmd import LMD
from .pfmm import PFMM
from .velocity import Velocity

__all__ = ["Objective", "LossOutput", "TimeSampler", "GuidedVelocity", "Velocity", "FMM", "LMD", "EMD", "PFMM"]
