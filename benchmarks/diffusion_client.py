"""A 2-D DDPM trained the diffusers way, as a user of diffusers would bring it to flowmaps
(``teacher.factory=diffusion_client:make`` with ``benchmarks/`` on ``PYTHONPATH``).

The network ``EpsMLP(x, timestep)`` is a small MLP on the state and a sinusoidal embedding of the
diffusers timestep (0…999); it is trained with ``DDPMScheduler.add_noise`` on random integer timesteps
to predict ε (``prediction_type="epsilon"``) or v (``"v_prediction"``). :func:`make` returns
``(model, scheduler)`` for ``teacher.adapter=diffusers_vp``; the weights come from ``teacher.weights``.
The scheduler has ``clip_sample=False``: the mixture's data leave [−1, 1], and a user whose data do
turns diffusers' default clipping off.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EpsMLP(nn.Module):
    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, frequencies: int = 16):
        super().__init__()
        self.frequencies = frequencies
        layers, d = [], dim + 2 * frequencies
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0]) / 1000.0
        k = torch.arange(self.frequencies, dtype=sample.dtype, device=sample.device)
        angles = t[:, None] * math.pi * (2.0 ** k[None, :].clamp(max=10)) / 2
        return self.net(torch.cat([sample, angles.sin(), angles.cos()], dim=1))


def scheduler(beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False)


def make(beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon", width: int = 128,
         depth: int = 3):
    return EpsMLP(width=width, depth=depth), scheduler(beta_schedule, prediction_type)


def train(data: torch.Tensor, beta_schedule: str, prediction_type: str, steps: int = 6000,
          batch_size: int = 512, lr: float = 2e-3, seed: int = 0, width: int = 128, depth: int = 3):
    """Train as the diffusers examples do: ``noisy = add_noise(x1, ε, n)`` at uniform integer ``n``,
    MSE to ε (or to ``get_velocity`` for v-prediction), Adam with a cosine decay."""
    torch.manual_seed(seed)
    model, sched = make(beta_schedule, prediction_type, width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    n_train = sched.config.num_train_timesteps
    for _ in range(steps):
        x1 = data[torch.randint(len(data), (batch_size,), generator=g)]
        eps = torch.randn(x1.shape, generator=g)
        n = torch.randint(0, n_train, (batch_size,), generator=g)
        noisy = sched.add_noise(x1, eps, n)
        target = eps if prediction_type == "epsilon" else sched.get_velocity(x1, eps, n)
        loss = (model(noisy, n) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return model.eval().requires_grad_(False), sched
