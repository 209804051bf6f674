"""Training objectives for flow maps. Each is a small callable behind one shared step; see
:mod:`flowmaps.objectives.base` (the step) and :mod:`flowmaps.objectives.self_distillation` (its
diagonal + off-diagonal form, whose switches span every self-distillation method).

Teachers and direct training:

* :class:`Velocity` — flow matching on the diagonal (trains teachers).
* :class:`FMM` — direct flow map matching from samples (Lagrangian + invertibility).
* :class:`LMD` — Lagrangian map distillation from a teacher velocity.
* :class:`EMD` — Eulerian map distillation from a teacher velocity.
* :class:`PFMM` — progressive flow map matching (range doubling, refreshed teacher).

Self-distillation, one network from data alone (its own diagonal is the teacher):

* :class:`LSD`, :class:`ESD`, :class:`PSD` — [P2]'s Lagrangian, Eulerian and progressive forms.
* :class:`MeanFlow`, :class:`CT` — Eulerian residuals with the conditional velocity ``İ``.
* :class:`ImprovedMeanFlow` — MeanFlow's residual transported along the network's own velocity, with
  guidance as a condition of the network.
* :class:`SCT` — sCT (Lu & Song): the map to the data ``X_{s,1}`` from the v-form Eulerian residual with
  the paper's tangent normalisation, warm-up and learned per-time weight.
* :class:`AlphaFlow` — α-Flow: a curriculum from trajectory flow matching through discrete
  consistency to MeanFlow.
* :class:`Shortcut` — the midpoint semigroup on a dyadic grid against an EMA teacher.
* :class:`SelfDistillation` — the configurable step behind all of them (and LMD, EMD).
"""

from .alphaflow import AlphaFlow
from .base import GuidedVelocity, LossOutput, Objective, dropout_disabled
from .ct import CT
from .emd import EMD
from .esd import ESD
from .fmm import FMM
from .imf import ImprovedMeanFlow
from .lmd import LMD
from .meanflow import MeanFlow
from .pfmm import PFMM
from .psd import PSD
from .sct import SCT
from .self_distillation import SelfDistillation
from .shortcut import Shortcut
from .lsd import LSD
from .times import DyadicPairs, SelfDistillationTimes, TimeSampler
from .velocity import Velocity
from .weighting import AdaptiveWeight, LearnedWeight, TangentNormalization

__all__ = ["Objective", "LossOutput", "TimeSampler", "SelfDistillationTimes", "DyadicPairs",
           "GuidedVelocity", "dropout_disabled", "Velocity", "FMM", "LMD", "EMD", "PFMM",
           "SelfDistillation", "LSD", "ESD", "PSD", "MeanFlow", "ImprovedMeanFlow", "AlphaFlow",
           "Shortcut", "CT", "SCT", "LearnedWeight", "AdaptiveWeight", "TangentNormalization"]
