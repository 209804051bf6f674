"""``flowmaps evaluate``: checkpoints (and ``eval.*`` overrides given among them) to
:func:`flowmaps.runs.evaluate.evaluate_runs`."""

from __future__ import annotations

import time
from pathlib import Path

from ..runs import extras
from ..runs.config import ConfigError


def cmd_evaluate(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    # key=value arguments among the checkpoints are eval.* overrides (argparse's nargs="+" takes both)
    overrides = [c for c in args.checkpoints if "=" in c and not Path(c).exists()] + args.overrides
    checkpoints = [c for c in args.checkpoints if c not in overrides]
    if not checkpoints:
        raise ConfigError("evaluate: give at least one checkpoint")
    extras.require("flowmaps evaluate", extras.EVAL_MODULES, extras.EVAL_EXTRA)
    device = args.device
    for item in [o for o in overrides if o.startswith("train.device=")]:  # the config key, as --device
        device = device or item.split("=", 1)[1]
        overrides.remove(item)
    from ..runs.evaluate import evaluate_runs  # loads matplotlib, which not every command needs

    evaluate_runs(checkpoints, args.teacher, out, args.overwrite, args.steps, args.n,
                  False if args.no_dopri5 else None, overrides=overrides, device=device or "cpu",
                  grid=args.grid, gammas=args.gamma)
    return 0
