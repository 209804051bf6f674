"""Images: a two-time U-Net velocity on scikit-learn's 8×8 digits (bundled: nothing downloads), an
LMD flow map distilled from it, and a PNG grid of its samples at 1, 2 and 4 steps.

The command line does the same with the ``digits`` preset (``flowmaps train --preset digits``, then
``flowmaps distill --preset digits --teacher RUN``) and adds the Fréchet distance on a small digits
classifier's features (``flowmaps evaluate``); see the images page of the docs.

Run: ``python examples/images.py [OUT_DIR]`` (tens of CPU minutes; ``--smoke``: 3 steps each, for the tests).
"""

import sys
from pathlib import Path

import torch

import flowmaps as fm
from flowmaps.data import load_digits, save_image_grid
from flowmaps.objectives import LMD, Velocity

SMOKE = "--smoke" in sys.argv          # the tests run every example with --smoke: a few steps
TEACHER_STEPS, MAP_STEPS = (3, 3) if SMOKE else (6000, 2500)
args = [a for a in sys.argv[1:] if a != "--smoke"]
out = Path(args[0]) if args else Path("runs/example-images")

torch.manual_seed(0)
digits = load_digits()                                   # 1797 images (1, 8, 8) in [-1, 1]
images = digits.images
interpolant = fm.Linear()
unet = dict(image_shape=(1, 8, 8), channels=32, channel_mults=(1, 1), blocks_per_level=1,
            attention_resolutions=(4,), sigma_data=0.5)  # the digits preset's network

teacher = fm.FlowMap(fm.UNet(**unet))                    # the velocity is its diagonal v_{t,t}
velocity = fm.fit(teacher, Velocity(interpolant), images, steps=TEACHER_STEPS, batch_size=128,
                  lr=2e-3, progress=not SMOKE).ema

student = fm.FlowMap(fm.UNet(**unet))
flow_map = fm.fit(student, LMD(interpolant, velocity.velocity), images, steps=MAP_STEPS,
                  batch_size=128, lr=2e-3, progress=not SMOKE).ema

x0 = interpolant.sample_base(torch.empty(64, 1, 8, 8))
with torch.no_grad():
    for k in (1, 2, 4):
        path = save_image_grid(flow_map.sample(x0, steps=k).clamp(-1, 1), out / f"samples_{k}step.png")
        print(f"{k} step(s): {path}")
