"""Bring your own diffusers model: a DDPM (ε-prediction) ``UNet2DModel`` as a teacher, distilled into a
flow map with LMD.

``fm.teachers.diffusers_vp`` converts the model exactly into a velocity in our convention (t=0 noise,
t=1 data). To keep this example offline and fast the model is built from a config with random
weights; with your trained model, load it from its local folder instead::

    unet = UNet2DModel.from_pretrained("path/to/model")
    scheduler = DDPMScheduler.from_pretrained("path/to/model", subfolder="scheduler")

Run: ``python examples/diffusers_teacher.py`` (``--smoke``: 3 steps, for the tests). Needs diffusers
(``pip install diffusers``; ``make setup`` installs it for the tests).
"""

import sys

import torch
from diffusers import DDPMScheduler, UNet2DModel

import flowmaps as fm
from flowmaps.data import load_digits
from flowmaps.objectives import LMD

SMOKE = "--smoke" in sys.argv          # the tests run every example with --smoke: a few steps
STEPS = 3 if SMOKE else 2000

torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                   block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)  # yours: from_pretrained
scheduler = DDPMScheduler(num_train_timesteps=1000)      # ε-prediction, linear betas
teacher = fm.teachers.diffusers_vp(unet.eval(), scheduler)   # b(x, t), exactly converted

x = torch.randn(4, 1, 8, 8)
with torch.no_grad():
    print("teacher velocity at t=0.5:", tuple(teacher(x, torch.full((4,), 0.5)).shape))

images = load_digits().images                            # the data the teacher was trained on
student = fm.FlowMap(fm.UNet(image_shape=(1, 8, 8), channels=32, channel_mults=(1, 1),
                             blocks_per_level=1, attention_resolutions=(4,)))
flow_map = fm.fit(student, LMD(fm.Linear(), teacher), images, steps=STEPS, batch_size=64,
                  lr=2e-3, progress=not SMOKE).ema
with torch.no_grad():
    one_step = flow_map.sample(torch.randn(16, 1, 8, 8), steps=1)    # one network evaluation
print("1-step samples:", tuple(one_step.shape))
