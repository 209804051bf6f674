"""flowmaps: flow map generative models — train or distil the two-time flow map ``X_{s,t}`` of a
probability-flow ODE, then sample in any number of steps chosen after training.

Time convention everywhere: ``t = 0`` is the Gaussian base, ``t = 1`` is the data.

Layers, each importing only downward: ``interpolants`` → ``solvers`` → ``flowmap`` → ``networks`` →
``exact`` → ``objectives`` → ``training``.
"""

from . import exact, objectives
from ._version import __version__
from .flowmap import FlowMap
from .interpolants import Custom, Interpolant, Linear, Trigonometric
from .nets import MLP, UNet
from .solvers import ODESolution, solve_ode
from .train import Trainer, fit

__all__ = ["FlowMap", "MLP", "UNet", "fit", "Trainer", "Interpolant", "Linear", "Trigonometric", "Custom",
           "solve_ode", "ODESolution", "exact", "objectives", "__version__"]
