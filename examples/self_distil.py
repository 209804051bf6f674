"""Self-distillation: a flow map from data alone, with no teacher (LSD, [P2] arXiv 2505.18825).

One network learns the velocity on its diagonal by flow matching on a fraction eta of each batch and
the map off the diagonal against its own diagonal. Here on the 2-D checkerboard; the 1-step samples
are compared with the data by the exact W2 distance on 1000 points.

Run: ``python examples/self_distil.py`` (a few CPU minutes; ``--smoke``: 20 steps, for the tests).
The command-line equivalent, with the checkerboard preset's LSD settings:
``flowmaps train --preset checkerboard --objective lsd``.
"""

import sys

import torch

import flowmaps as fm
from flowmaps import objectives
from flowmaps.data import checkerboard
from flowmaps.metrics import wasserstein2

SMOKE = "--smoke" in sys.argv          # the tests run every example with --smoke: a few steps
STEPS = 20 if SMOKE else 8000

torch.manual_seed(0)
samples = checkerboard(100_000)                          # (N, 2) training data
interpolant = fm.Linear()                                # t=0 noise, t=1 data
model = fm.FlowMap(fm.MLP(dim=2, n_frequencies=8))       # Fourier time features: better for LSD
result = fm.fit(model, objectives.LSD(interpolant), samples, steps=STEPS, batch_size=512,
                progress=not SMOKE)
flow_map = result.ema

x0 = interpolant.sample_base(torch.empty(1000, 2))
held_out = checkerboard(1000)
with torch.no_grad():
    for k in (1, 2, 4):                                  # any step count, chosen after training
        x1 = flow_map.sample(x0, steps=k)
        print(f"{k} step(s): W2 to held-out data {wasserstein2(x1, held_out):.4f}")
