"""``flowmaps tune-grid``: tune the interior times of k-step grids of a trained flow map and store them in
the run (``tuned_grids.json``), for ``flowmaps sample`` / ``flowmaps evaluate`` with ``--grid tuned``."""

from __future__ import annotations

from ..runs.grid_tuning import tune_run_grids


def cmd_tune_grid(args) -> int:
    tune_run_grids(args.run, args.steps, n=args.n, seed=args.seed, iters=args.iters,
                   progress=not args.quiet)
    return 0
