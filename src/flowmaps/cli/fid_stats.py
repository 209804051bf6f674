"""``flowmaps fid-stats``: the reference statistics of an image dataset, computed once and reused by
every evaluation (``eval.fid_stats=DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs import experiment as ex
from ..runs.config import ConfigError, dump_config, load_config
from ..runs.devices import open_device
from ..runs.evaluation import build_reference
from ..runs.latents import reference_bundle
from ..runs.rundir import RunDir
from ..train.distributed import launched_by_torchrun


def cmd_fid_stats(args) -> int:
    cfg = load_config(args.preset if args.preset or args.config else "digits", args.config,
                      args.overrides)
    if launched_by_torchrun():
        raise ConfigError("fid-stats runs in one process (it is computed once per dataset); run it "
                          "without torchrun, on a GPU with --device cuda")
    device, _ = open_device(args.device or cfg.train.device, "--device" if args.device else
                            "train.device")
    bundle = ex.build_data(cfg)
    if not bundle.image:
        raise ConfigError(f"data.name: fid-stats is for image datasets; {cfg.data.name} is vector data")
    images = reference_bundle(cfg, bundle)  # latents: the source images they were encoded from
    out = Path(args.out) if args.out else Path("fid-stats") / cfg.data.name
    run = RunDir(out, args.overwrite, create=False)
    run.create()
    (run.path / "config.yaml").write_text(dump_config(cfg))
    reference = build_reference(cfg, images, run.path, progress=not args.quiet, device=device)
    print(json.dumps(reference.info, indent=2))
    print(f"use it with: eval.fid_stats={run.path}")
    return 0
