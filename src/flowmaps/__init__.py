"""flowmaps: flow map generative models — train or distil the two-time flow map ``X_{s,t}`` of a
probability-flow ODE, then sample in any number of steps chosen after training.

Time convention everywhere: ``t = 0`` is the Gaussian base, ``t = 1`` is the data.

Layers, each module importing only from its own layer and those before it, without cycles:

1. the mathematics and the file format: ``_tensor``, ``precision`` (bf16 autocast, fp32 JVPs, TF32),
   ``interpolants``, ``solvers``, ``standardizer``, ``flowmap``, ``tuning`` (time grids tuned after
   training), ``exact``, ``checkpoint`` (safetensors + JSON), ``_version``;
2. ``nets`` — two-time networks (MLP, U-Net);
   ``teachers`` — models of torchcfm, flow_matching and diffusers (and the user's own ``module:function``)
   as teacher velocities in our convention;
3. ``objectives`` — Velocity, FMM, LMD, EMD, PFMM on one shared step;
4. ``data`` — 2-D generators, user arrays, image datasets, PNG grids;
5. ``metrics`` — sample quality of vectors and images, feature extractors;
6. ``train`` — Trainer and fit, multi-process training, resumable checkpoints;
7. ``runs`` — configs and presets, run assembly, training and evaluation of runs, plots;
8. ``cli`` — the ``flowmaps`` command.
"""

from . import exact, objectives, precision, teachers
from ._version import __version__
from .flowmap import FlowMap
from .interpolants import Custom, Interpolant, Linear, Trigonometric
from .nets import MLP, DiT, UNet
from .objectives import GuidedVelocity
from .runs.models import load_model
from .runs.export import load
from .solvers import ODESolution, solve_ode
from .teachers.warm_start import two_time
from .train import Trainer, fit
from .tuning import tune_grid

__all__ = ["FlowMap", "MLP", "UNet", "DiT", "fit", "Trainer", "Interpolant", "Linear", "Trigonometric",
           "Custom", "solve_ode", "ODESolution", "tune_grid", "GuidedVelocity", "load", "load_model", "two_time",
           "exact",
           "objectives",
           "precision",
           "teachers", "__version__"]
