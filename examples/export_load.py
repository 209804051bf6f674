"""Save a trained map, hand it over, load it back: ``save_pretrained`` / ``flowmaps export`` and
``flowmaps.load``.

A run trained by the command line (``flowmaps train``) is loaded from its run directory, exported to a
folder of its own (``model.safetensors`` + ``config.json``: no optimiser, no training state, never a
pickle) and loaded from there; the two give the same samples. A map trained in Python is saved the
same way with ``save_pretrained``.

Run: ``python examples/export_load.py [WORKDIR]`` (about a minute; ``--smoke``: 20 steps, for the tests).
"""

import sys
import tempfile
from pathlib import Path

import torch

import flowmaps as fm
from flowmaps.cli import main as flowmaps_cli
from flowmaps.objectives import Velocity

SMOKE = "--smoke" in sys.argv          # the tests run every example with --smoke: a few steps
STEPS = 20 if SMOKE else 2000
args = [a for a in sys.argv[1:] if a != "--smoke"]
work = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="flowmaps-example-"))

# A run of the command line: `flowmaps train --preset gmm --objective fmm --out WORK/fmm train.steps=...`.
run = work / "fmm"
assert flowmaps_cli(["train", "--preset", "gmm", "--objective", "fmm", "--out", str(run), "--quiet",
                     f"train.steps={STEPS}", "train.checkpoint_every=1000000"]) == 0
# `flowmaps export RUN DIR`: the EMA weights and what sampling needs, nothing else.
assert flowmaps_cli(["export", str(run), str(work / "exported")]) == 0

from_run = fm.load(run)                           # a run directory (its checkpoints/final), EMA weights
exported = fm.load(work / "exported")             # the exported folder: no run, data or config needed
x0 = exported.interpolant.sample_base(torch.empty(1000, *exported.sample_shape))
with torch.no_grad():
    a = from_run.to_data_units(from_run.sample(x0, steps=2))     # data units, if trained standardised
    b = exported.to_data_units(exported.sample(x0, steps=2))
print(f"run and export agree: max |difference| = {(a - b).abs().max():.2e}")
assert torch.equal(a, b)

# A map trained in Python: save_pretrained writes the same two files; from_pretrained reads them.
interpolant = fm.Linear()
velocity = fm.FlowMap(fm.MLP(dim=2, width=64, depth=2))
result = fm.fit(velocity, Velocity(interpolant), torch.randn(4096, 2) * 0.5 + 1.0, steps=STEPS)
result.ema.save_pretrained(work / "mine", interpolant=interpolant)
again = fm.FlowMap.from_pretrained(work / "mine")
x = torch.randn(8, 2)
with torch.no_grad():
    assert torch.equal(again.velocity(x, torch.full((8,), 0.5)), result.ema.velocity(x, torch.full((8,), 0.5)))
print(f"saved and reloaded: {sorted(p.name for p in (work / 'mine').iterdir())}")
