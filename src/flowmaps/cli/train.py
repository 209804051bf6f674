"""``flowmaps train`` and ``flowmaps distill``: the config from the preset, ``--config`` and overrides
(or, with ``--resume``, the run's saved config), then :func:`flowmaps.runs.training.run_training`."""

from __future__ import annotations

from pathlib import Path

from ..runs.config import ConfigError, load_config
from ..runs.rundir import RunDirError
from ..runs.validation import SELF_DISTILLATION
from ..runs.training import run_training


def cmd_train(args, distill: bool = False) -> int:
    overrides = []
    if args.objective:
        overrides.append(f"objective.name={args.objective}")
        if distill and args.objective in SELF_DISTILLATION:  # self-distillation against the teacher
            overrides.append("objective.source=teacher")
    elif distill and not args.resume:
        overrides.append("objective.name=lmd")
    if distill and args.teacher:
        overrides += (["teacher.exact=true"] if args.teacher == "exact"
                      else [f"teacher.checkpoint={args.teacher}"])
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume continues the run in --out with its saved config.yaml; "
                              "drop --preset/--config (overrides such as train.steps=N are allowed)")
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise RunDirError(f"--resume: {args.out} is not a run directory (no config.yaml)")
        cfg = load_config(None, saved, overrides + args.overrides)
    else:
        cfg = load_config(args.preset if args.preset or args.config else "checkerboard", args.config,
                          overrides + args.overrides)
    run_training(cfg, args.out, args.overwrite, distill, progress=not args.quiet, resume=args.resume)
    return 0


def cmd_distill(args) -> int:
    return cmd_train(args, distill=True)
