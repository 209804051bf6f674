"""``flowmaps encode``: the images of an image config's data section (a preset, ``--config`` and
``key=value`` overrides) encoded with a local diffusers AutoencoderKL into a new latents folder
(:func:`flowmaps.runs.latents.encode_dataset`), which ``data.name=latents data.path=DIR`` trains on."""

from __future__ import annotations

from ..runs.config import ConfigError, load_config
from ..runs.devices import open_device
from ..runs.latents import encode_dataset
from ..train.distributed import launched_by_torchrun


def cmd_encode(args) -> int:
    if launched_by_torchrun():
        raise ConfigError("encode runs in one process (once per dataset); run it without torchrun, on "
                          "a GPU with --device cuda")
    cfg = load_config(args.preset if args.preset or args.config else "digits", args.config,
                      args.overrides)
    device, _ = open_device(args.device)
    encode_dataset(cfg, args.vae, args.out, device=device, batch_size=args.batch_size, dtype=args.dtype,
                   posterior=args.posterior, seed=args.seed, shard_size=args.shard_size,
                   precision=args.precision or cfg.train.precision, progress=not args.quiet)
    return 0
