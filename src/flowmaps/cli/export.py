"""``flowmaps export RUN DIR``: the trained map of a run alone, for :func:`flowmaps.load` and
:meth:`flowmaps.FlowMap.from_pretrained` (:mod:`flowmaps.runs.export`)."""

from __future__ import annotations

from ..runs.export import export_model
from .sample import weights_choice


def cmd_export(args) -> int:
    done = export_model(args.run, args.dir, use_ema=weights_choice(args), overwrite=args.overwrite)
    what = {"ema": "EMA weights", "model": "raw weights"}.get(done["weights"],
                                                             f"EMA weights {done['weights']}")
    print(f"wrote {done['directory'] / 'model.safetensors'} and config.json ({what} of "
          f"{done['objective']} at step {done['step']}); load it with flowmaps.load"
          f"({str(done['directory'])!r})")
    return 0
