"""``flowmaps demo`` (``make demo``): the main job end to end on one preset: a teacher velocity, LMD and
EMD distillations from it, an FMM map trained directly, then all evaluated at 1, 2, 4, 8 steps against
the teacher's ODE solvers."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..runs import extras
from ..runs.config import load_config
from ..runs.rundir import RunDirError
from ..runs.training import run_training

DEMO_BUDGET = {  # steps per model; sized so `make demo` ends within 10 minutes on 2 CPU cores
    "teacher": 10000, "lmd": 6000, "emd": 6000, "fmm": 8000,
}


def cmd_demo(args) -> int:
    extras.require("flowmaps demo", extras.EVAL_MODULES, extras.EVAL_EXTRA)  # it ends by evaluating
    root = Path(args.out)
    if root.exists() and any(root.iterdir()) and not args.overwrite:
        raise RunDirError(f"--out {root}: already holds files; choose a new directory or pass "
                          "--overwrite")
    scale = args.scale
    common = ["model.width=128", "model.depth=4", "train.batch_size=512", "train.log_every=100",
              "train.checkpoint_every=100000"] + args.overrides

    def steps(key):
        return f"train.steps={max(10, int(DEMO_BUDGET[key] * scale))}"

    def decay(key):
        return f"train.lr_decay_start={max(1, int(DEMO_BUDGET[key] * scale) // 4)}"

    start = time.perf_counter()
    teacher_dir = run_training(load_config(args.preset, None, common + [
        "objective.name=velocity", steps("teacher"), decay("teacher"), "train.lr=2e-3"]),
        root / "teacher", args.overwrite, distill=False, label="1/4 teacher velocity")
    teacher_ckpt = str(teacher_dir / "checkpoints" / "final")
    runs = {}
    for i, (name, extra) in enumerate([("lmd", ["train.lr=1e-3"]),
                                       ("emd", ["objective.emd_form=full", "train.lr=1e-3"])]):
        runs[{"lmd": "LMD", "emd": "EMD-full"}[name]] = run_training(load_config(args.preset, None, common + extra + [
            f"objective.name={name}", f"teacher.checkpoint={teacher_ckpt}", steps(name), decay(name)]),
            root / name, args.overwrite, distill=True, label=f"{i + 2}/4 {name.upper()} distillation")
    runs["FMM"] = run_training(load_config(args.preset, None, common + [
        "objective.name=fmm", steps("fmm"), decay("fmm"), "train.lr=1e-3"]),
        root / "fmm", args.overwrite, distill=False, label="4/4 FMM direct training")
    print("evaluating at 1, 2, 4, 8 steps against the teacher's ODE solvers ...", file=sys.stderr)
    checkpoints = [str(p / "checkpoints" / "final") for p in runs.values()]
    from ..runs.evaluate import evaluate_runs

    evaluate_runs(checkpoints, teacher_ckpt, root / "eval", args.overwrite, [1, 2, 4, 8], None, True,
                  names=list(runs))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; runs in {root}, plots in "
          f"{root / 'eval' / 'plots'}")
    return 0
