"""``flowmaps ema RUN --std 0.05,0.10``: power-function EMA averages of any length, reconstructed after
training from the run's snapshots (:mod:`flowmaps.runs.posthoc_ema`)."""

from __future__ import annotations

from ..runs.posthoc_ema import reconstruct


def cmd_ema(args) -> int:
    done = reconstruct(args.run, args.std, step=args.step)
    for d in done:
        print(f"wrote {d['path']}.safetensors and .json: sigma_rel {d['std']:g} (gamma {d['gamma']:.3f}) "
              f"at step {d['step']} from {d['snapshots']} snapshot(s), profile fit residual "
              f"{100 * d['residual']:.2g}%; sample it with flowmaps sample {d['path']}")
    return 0
