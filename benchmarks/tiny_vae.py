"""A small diffusers ``AutoencoderKL`` trained on scikit-learn's digits, for the CPU-scale latent pipeline
(the ``latents`` preset): digits → this VAE → ``flowmaps encode`` → ``flowmaps train --preset latents``
→ ``sample``/``evaluate`` (decoded, FD on the digits classifier's features).

The VAE: RGB in and out (the grey digits are repeated to 3 channels, as ``flowmaps encode`` does for a
3-channel VAE), ``block_out_channels`` (32, 64) (downsampling 2: 8×8 images → 4×4×4 latents), one
layer per block. Trained on the 1500 digits the ``digits`` preset trains on (its hold-out of 297 kept
out), loss ``MSE(x̂, x) + beta · KL`` on the posterior sample, Adam, ``--steps`` steps of
``--batch-size``. Then, as Stable Diffusion 3 sets its factors, ``shift_factor`` is the mean and
``scaling_factor`` 1/std of the posterior means of the training images, so latents have mean 0 and
std 1; both are written into the saved config. Reports the held-out reconstruction MSE (of the
posterior mean, in [−1, 1] units) beside the MSE of predicting every pixel by the mean image.

Run: ``.venv/bin/python benchmarks/tiny_vae.py --out vae-digits`` (a few minutes on 2 cores); nothing is
downloaded. Writes ``--out`` (``save_pretrained``) and ``benchmarks/results/tiny_vae.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the VAE (must not exist)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-4, help="weight of the KL term")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(HERE / "results" / "tiny_vae.json"))
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        print(f"tiny_vae: {out} exists; choose a new folder", file=sys.stderr)
        return 2
    from flowmaps.runs import experiment as ex
    from flowmaps.runs.config import load_config

    torch.manual_seed(args.seed)
    bundle = ex.build_data(load_config("digits"))  # the digits preset's split: 1500 train, 297 held out
    train = bundle.train[:].repeat(1, 3, 1, 1)
    held = bundle.held_out[:].repeat(1, 3, 1, 1)
    vae = build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    start, log = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        x = train[torch.randint(len(train), (args.batch_size,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(recon, x) + args.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps:
            log.append({"step": step, "loss": loss.item(), "kl": kl.item()})
            print(f"step {step}: loss {loss.item():.4f} (kl {kl.item():.3f})", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(c).latent_dist.mean for c in train.split(500)])
        shift, std = float(means.mean()), float(means.std())
        held_mean = torch.cat([vae.encode(c).latent_dist.mean for c in held.split(500)])
        recon = vae.decode(held_mean).sample.mean(1, keepdim=True)
    target = held[:, :1]
    mse = float(torch.nn.functional.mse_loss(recon, target))
    baseline = float(torch.nn.functional.mse_loss(bundle.train[:].mean(0, keepdim=True).expand_as(target),
                                                  target))
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    vae.save_pretrained(out)
    result = {"out": str(out.resolve()), "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "beta": args.beta, "seed": args.seed,
              "seconds": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in vae.parameters()),
              "held_out_mse": mse, "mean_image_mse": baseline, "shift_factor": shift,
              "scaling_factor": 1.0 / std, "log": log, "torch_threads": torch.get_num_threads(),
              "load_average": os.getloadavg()}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out reconstruction MSE {mse:.4f} (mean image {baseline:.4f}); scaling_factor "
          f"{1 / std:.4f}, shift_factor {shift:.4f}; wrote {out} and {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
