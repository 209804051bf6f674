"""Distil a flow map from an analytic teacher, then sample it with 1, 2 and 4 steps.

Run: ``python examples/quickstart.py`` (about 15 CPU seconds; ``--smoke``: 30 steps, for the tests).

The teacher is the exact velocity of a 2-D Gaussian mixture (spec §6), so the error of every
sample against the exact flow map X_{0,1} can be measured, and compared with Euler steps of the
exact velocity at the same number of function evaluations (NFE).
"""

import sys

import torch

import flowmaps as fm
from flowmaps.exact import GaussianMixture
from flowmaps.objectives import LMD

SMOKE = "--smoke" in sys.argv          # the tests run every example with --smoke: a few steps
STEPS, N = (30, 500) if SMOKE else (1500, 4000)

torch.manual_seed(0)
interpolant = fm.Linear()                       # I_t = (1 - t) x0 + t x1; t=0 noise, t=1 data
teacher = GaussianMixture(means=[[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], stds=[0.4, 0.3, 0.3],
                          weights=[0.5, 0.3, 0.2], interpolant=interpolant)

model = fm.FlowMap(fm.MLP(dim=2, width=128, depth=3))   # X_{s,t}(x) = x + (t - s) v_{s,t}(x)
objective = LMD(interpolant, teacher)                    # any callable b(x, t) works as a teacher
result = fm.fit(model, objective, teacher.sample, steps=STEPS, batch_size=256, lr=2e-3,
                lr_decay_start=400, grad_clip=1.0, progress=True)
flow_map = result.ema                                    # the EMA of the weights: the better sampler

x0 = interpolant.sample_base(torch.empty(N, 2))       # base samples, N(0, I)
exact = teacher.flow(x0.double(), 0.0, 1.0)               # exact map by RK4
print(f"final loss {result[-1]:.4f}")
print("steps | flow-map error | Euler error (exact velocity)")
with torch.no_grad():
    for k in (1, 2, 4):
        x1 = flow_map.sample(x0, steps=k)
        euler = fm.solve_ode(teacher.velocity, x0.double(), "euler", steps=k).x
        err = (x1.double() - exact).norm(dim=1).mean()
        err_euler = (euler - exact).norm(dim=1).mean()
        print(f"{k:5d} | {err:14.3f} | {err_euler:.3f}")
