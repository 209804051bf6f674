"""The ``flowmaps`` command: the parser of every command, and :func:`main`, which runs one and turns
its errors into exit statuses. Each command's work is in its own module (:mod:`flowmaps.cli.train`,
:mod:`~flowmaps.cli.sample`, :mod:`~flowmaps.cli.evaluate`, :mod:`~flowmaps.cli.export`,
:mod:`~flowmaps.cli.ema`, :mod:`~flowmaps.cli.demo`, :mod:`~flowmaps.cli.fid_stats`,
:mod:`~flowmaps.cli.presets`).

Every run writes its own directory: ``config.yaml`` (the fully resolved config: rerun it with
``--config``), ``metrics.jsonl``, ``checkpoints/`` (resumable ``step-K``, ``best`` and ``final``
safetensors + JSON pairs, see :mod:`flowmaps.train.resume`) and ``plots/``. ``train`` and ``distill`` run
unchanged under ``torchrun --nproc_per_node=N`` (rank 0 writes), continue with ``--resume``, and stop
cleanly on SIGTERM/SIGINT with a checkpoint (exit 0).

Exit status: 0 success; 2 bad input, reported as one line ``flowmaps: error: ...`` with nothing on disk
changed (nothing is overwritten unless ``--overwrite``); 3 training stopped by non-finite steps (the
last good checkpoint is kept and named).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._version import __version__
from ..checkpoint import CheckpointError
from ..runs.config import ConfigError, list_presets
from ..runs.rundir import RunDirError
from ..runs.validation import SELF_DISTILLATION
from ..runs.training import TrainingInterrupted, TrainingStopped
from ..train.distributed import is_main, launched_by_torchrun, shutdown
from .demo import cmd_demo
from .ema import cmd_ema
from .encode import cmd_encode
from .evaluate import cmd_evaluate
from .export import cmd_export
from .fid_stats import cmd_fid_stats
from .presets import cmd_presets
from .sample import cmd_sample
from .train import cmd_distill, cmd_train
from .tune_grid import cmd_tune_grid

EPILOG_OVERRIDES = """overrides:
  Any config key as section.key=value (YAML values), applied after the preset and --config, e.g.
    train.steps=2000 train.lr=5e-4 model.width=128 objective.emd_form=full data.path=x.npy
  Sections: data, interpolant, model, objective, teacher, train, eval, decode (see `flowmaps presets --show NAME`).
"""


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return values


def _interval(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lo,hi, got {text!r}") from None
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected two times 0 <= lo < hi <= 1, got {text!r}")
    return values[0], values[1]


def _grid(text: str) -> list[float] | str:
    if text.strip() == "tuned":
        return "tuned"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated times, got {text!r}") from None
    if len(values) < 2 or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("a grid needs at least two times in [0, 1]")
    return values


def _checked(convert, ok, what: str):
    """An argparse type: ``convert(text)`` that must satisfy ``ok``, else one line naming ``what``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_gamma = _checked(float, lambda v: 0.0 <= v <= 1.0, "gamma in [0, 1]")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")


# --- parser --------------------------------------------------------------------------------------

def _add_run_options(p: argparse.ArgumentParser, resume: bool = True) -> None:
    p.add_argument("--preset", choices=list_presets(), help="named preset (default: checkerboard)")
    p.add_argument("--config", metavar="FILE", help="YAML config (e.g. a run's config.yaml), applied "
                   "after the preset")
    p.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: "
                   "runs/<preset>-<objective>-<time>); must be new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out, replacing its "
                   "run files")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest "
                       "checkpoint (exactly as if uninterrupted); overrides may change train.steps and "
                       "logging/checkpoint options only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def is_main_process() -> bool:
    return is_main()


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``flowmaps: error: ...`` with status 2 (sub-commands
    inherit the class), like every other input error, instead of the usage text."""

    def error(self, message):
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="flowmaps", formatter_class=fmt,
        description="Flow map generative models: train or distil the two-time flow map X_{s,t}, then "
                    "sample in 1, 2, 4... steps chosen after training (t=0 noise, t=1 data).")
    parser.add_argument("--version", action="version", version=f"flowmaps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, fmt)
    _add_distill(sub, fmt)
    _add_sample(sub, fmt)
    _add_evaluate(sub, fmt)
    _add_tune_grid(sub, fmt)
    _add_export(sub, fmt)
    _add_ema(sub, fmt)
    _add_demo(sub, fmt)
    _add_fid_stats(sub, fmt)
    _add_encode(sub, fmt)
    _add_presets(sub)
    return parser


TRAIN_OBJECTIVES = """objectives:
  velocity   flow matching |v(t,t,I_t) - dI_t|^2 (a teacher velocity; sampled with ODE solvers)
  fmm        direct flow map matching from samples (Lagrangian + invertibility, (s,t) on the square)
  lsd        Lagrangian self-distillation [P2]: flow matching on a fraction eta of the batch, and
             |d_t X(s,t,I_s) - sg(v(t,t,X(s,t,I_s)))|^2 off the diagonal (its own diagonal as teacher)
  esd        Eulerian self-distillation [P2]: |d_s X + sg(grad X . v(s,s,I_s))|^2 off the diagonal
  psd        progressive self-distillation [P2]: one jump against two of its own (objective.psd_gamma=
             uniform: PSD-U, midpoint: PSD-M)
  meanflow   MeanFlow: the Eulerian residual in v-form with the conditional velocity dI as its source
  imf        improved MeanFlow: MeanFlow's residual with the JVP along the network's own velocity
             (objective.guidance_max: the guidance scale as a condition, chosen at `sample --guidance`)
  alphaflow  alpha-Flow: a curriculum over alpha (objective.alpha_start..alpha_end, default the whole
             run) from flow matching on dI (alpha=1) through discrete consistency to MeanFlow (alpha=0)
  shortcut   shortcut models: the midpoint semigroup on a dyadic grid against an EMA of the network
  ct         continuous consistency training, [P2] eq. 41: |d_s X + sg(grad X . dI_s)|^2
  sct        sCT (Lu & Song): the map to the data X(s,1), v-form Eulerian residual with dI, tangent
             normalisation, warm-up and a learned weight (objective.target=any: all s <= t, not sCT);
             multi-step samples need --gamma 1
Switches of the self-distillation step (objective.*): eta, residual, form, source, stopgrad,
weighting, distribution, psd_gamma, guidance, guidance_kappa, guidance_interval, diagonal_times,
offdiag_dropout, fm_steps, anneal_steps (see docs/objectives.md).
"""


def _add_train(sub, fmt) -> None:
    p = sub.add_parser("train", help="train a velocity (teacher) or a flow map from data alone (FMM, "
                       "self-distillation)", formatter_class=fmt,
                       epilog=TRAIN_OBJECTIVES + "\n" + EPILOG_OVERRIDES,
                       description="Train a velocity model with flow matching (--objective velocity, "
                                   "the default), or a flow map from samples alone: directly (fmm) or "
                                   "by self-distillation (lsd, esd, psd, meanflow, imf, alphaflow, "
                                   "shortcut, ct, sct). A preset's settings for the chosen objective "
                                   "apply (`flowmaps presets --show NAME --objective OBJ`).")
    p.add_argument("--objective", choices=["velocity", "fmm", *SELF_DISTILLATION],
                   help="what to train (default: the config's objective.name, velocity)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)


DISTILL_TEACHERS = """teachers from elsewhere (your own code, imported; nothing is unpickled):
  teacher.factory=package.module:function   called with teacher.kwargs, returns b(x, t), a module,
                                            or (module, scheduler); its folder must be on PYTHONPATH
  teacher.weights=FILE.safetensors          a state dict loaded into the returned module (strict)
  teacher.kwargs={width: 64}                keyword arguments of the call (or teacher.kwargs.width=64)
  teacher.adapter=torchcfm|flow_matching|diffusers_flow|diffusers_vp
                                            convert the module's output to our velocity (t=0 noise)
  teacher.noise_end=auto|clamp|gaussian|exact  (diffusers_vp) below teacher.tau_start (default 0.05)
                                            an epsilon model is held at tau_start (clamp) or replaced by
                                            the velocity of N(0, I) data (gaussian); auto = clamp for
                                            epsilon, exact (the whole schedule) for v/sample models
  e.g. flowmaps distill --preset gmm teacher.factory=my_cfm:make teacher.weights=cfm.safetensors \\
           teacher.adapter=torchcfm --out runs/lmd-cfm
"""


def _add_distill(sub, fmt) -> None:
    p = sub.add_parser("distill", help="distil a flow map (LMD, EMD, PFMM) from a teacher velocity",
                       formatter_class=fmt, epilog=DISTILL_TEACHERS + "\n" + EPILOG_OVERRIDES,
                       description="Distil a flow map from a teacher velocity: a checkpoint made by "
                                   "`flowmaps train`, the exact velocity of the gmm dataset, or a model "
                                   "of your own (torchcfm, flow_matching, diffusers...) through "
                                   "teacher.factory. A self-distillation objective (lsd, esd, ...) given "
                                   "here uses the teacher as its velocity source "
                                   "(objective.source=teacher).")
    p.add_argument("--objective", choices=["lmd", "emd", "pfmm", *SELF_DISTILLATION],
                   help="distillation objective (default: lmd)")
    p.add_argument("--teacher", metavar="CKPT|exact", help="teacher checkpoint (run directory or "
                   "checkpoint path), or 'exact' for the gmm dataset's closed-form velocity")
    _add_run_options(p)
    p.set_defaults(func=cmd_distill)


def _add_sample(sub, fmt) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint at one or more step counts",
                       formatter_class=fmt,
                       description="Draw --n samples at each step count; writes samples_<label>.npy "
                                   "(data units) and samples.png. Flow maps jump along a uniform grid "
                                   "(or --grid); velocity checkpoints use an ODE solver (--solver).")
    p.add_argument("checkpoint", help="checkpoint path (STEM, STEM.json), a run directory or an "
                   "exported model folder (`flowmaps export`); samples go in the run or the folder")
    p.add_argument("--n", "--num-samples", dest="n", type=_positive_int, default=10000,
                   help="number of samples (default 10000; under torchrun write --num-samples: "
                   "torchrun reads --n as an abbreviation of its own options)")
    p.add_argument("--steps", type=_steps_list, help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--grid", type=_grid, help="explicit time grid, e.g. 0,0.4,1 (flow maps), or "
                   "'tuned': the run's grids made by `flowmaps tune-grid` for each of --steps")
    p.add_argument("--gamma", type=_gamma, default=0.0, help="γ-sampling: jump past each grid time "
                   "to t + γ(1 − t) and re-noise back along the interpolant (0: deterministic, the "
                   "default; 1: consistency-model multistep); noise from --seed")
    p.add_argument("--solver", default="rk4", choices=["euler", "heun", "rk4"],
                   help="ODE solver for velocity checkpoints (default rk4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base samples (default 0)")
    p.add_argument("--label", type=int, help="class label for a class-conditional checkpoint "
                   "(default: cycle through the classes)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w for "
                   "a class-conditional velocity checkpoint, or for a map trained with guidance as a "
                   "condition (imf, objective.guidance_max) (default 1: none)")
    p.add_argument("--guidance-interval", type=_interval, help="lo,hi: the times (ours, 0 base, 1 "
                   "data) where a guidance-conditioned map applies --guidance (default 0,1)")
    p.add_argument("--data", metavar="FILE", help="optional .npy/.csv of data to plot beside samples")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--ema", metavar="NAME", help="which averaged weights: ema (the classic EMA) or a "
                   "power-function EMA profile (train.ema_std), e.g. std0.100 (default: the "
                   "checkpoint's default, the first profile when it has any)")
    p.add_argument("--vae", metavar="DIR", help="a model trained on latents: the VAE folder that "
                   "decodes them (default: the run's decode.vae)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/samples)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample files")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu); under "
                   "torchrun each rank samples its share (cuda: cuda:LOCAL_RANK), rank 0 writes")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="base points per network "
                   "pass (default 1000), the unit shared out under torchrun")
    p.set_defaults(func=cmd_sample)


EVALUATE_SAMPLERS = """the teacher's fast samplers (eval.* overrides):
  eval.samplers=[ddim,dpmpp_2m]   DDIM (eta=0) and DPM-Solver++(2M) at each step count ([] for none)
  eval.spacings=[auto]            their grids: auto, uniform_t, uniform_lambda, and for diffusers_vp
                                  teachers leading, trailing, linspace (diffusers' DDIM timesteps);
                                  auto = leading (DDIM) / linspace (DPM) for diffusers_vp teachers,
                                  uniform_t (DDIM) / uniform_lambda (DPM) for the others
  eval.schedulers=[own]           a diffusers teacher's own scheduler, set_timesteps(k) + step on its
                                  network; or compatible classes by name, e.g. [own,DDIMScheduler]
  e.g. flowmaps evaluate runs/lmd-ddpm "eval.schedulers=[own,DDIMScheduler]" eval.spacings=[auto,trailing]
"""


def _add_evaluate(sub, fmt) -> None:
    p = sub.add_parser("evaluate", help="quality-versus-cost table of flow maps and their teacher",
                       formatter_class=fmt,
                       description="For each flow map and step count: NFE, wall time per 10k "
                                   "samples, W2 and energy distance to held-out data, histogram KL "
                                   "(checkerboard, gmm) and the exact-map error (gmm); the teacher's "
                                   "Euler/Heun/RK4 at the same NFE and dopri5, its DDIM and "
                                   "DPM-Solver++(2M) at the same NFE, and a diffusers teacher's own "
                                   "scheduler. Writes table.md, results.json and plots.",
                       epilog=EVALUATE_SAMPLERS)
    p.add_argument("checkpoints", nargs="+", help="flow-map checkpoints, run directories or exported "
                   "model folders (and optionally a velocity one, used as the teacher), and eval.* "
                   "overrides as key=value (e.g. eval.fid_stats=DIR made by `flowmaps fid-stats`, "
                   "eval.n_samples=5000); an export also takes data.* and teacher.* (its data and "
                   "teacher when it records none, or when they are elsewhere here)")
    p.add_argument("--teacher", metavar="CKPT|exact", help="teacher velocity (default: the one the "
                   "first checkpoint was distilled from)")
    p.add_argument("--steps", type=_steps_list, help="step counts (default: the config's eval.steps)")
    p.add_argument("--n", "--num-samples", dest="n", type=_positive_int,
                   help="number of samples (default: eval.n_samples; under torchrun write "
                   "--num-samples)")
    p.add_argument("--no-dopri5", action="store_true", help="skip the adaptive dopri5 reference")
    p.add_argument("--grid", choices=["uniform", "tuned"], default="uniform", help="tuned: also "
                   "evaluate each flow map on its run's tuned grids (`flowmaps tune-grid`), rows "
                   "'tuned grid'")
    p.add_argument("--gamma", type=_gamma, action="append", help="also evaluate γ-sampling at this γ "
                   "(repeatable), rows 'gamma=G'")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/eval-<time>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu, or train.device=... given "
                   "among the overrides); under torchrun the ranks share the sampling (eval.batch_size "
                   "base points at a time) and rank 0 scores and writes")
    p.set_defaults(func=cmd_evaluate, overrides=[])


def _add_tune_grid(sub, fmt) -> None:
    p = sub.add_parser("tune-grid", help="tune the interior times of k-step grids of a trained flow "
                       "map, stored in the run for --grid tuned", formatter_class=fmt,
                       description="For each k of --steps, optimise the interior times of the k-step "
                                   "grid (endpoints 0 and 1 fixed, order kept) so that the k-step "
                                   "composition matches a reference on --n base points of --seed: the "
                                   "teacher's dopri5 endpoint (the exact map for gmm) where the run has "
                                   "a teacher, else the map's own 64-step composition. Writes "
                                   "RUN/tuned_grids.json (grids of other k kept); `flowmaps sample RUN "
                                   "--grid tuned --steps 2,4` and `flowmaps evaluate RUN --grid tuned` "
                                   "use them.")
    p.add_argument("run", help="run directory, checkpoint or exported model folder of a flow map (the "
                   "grids are stored in the run or the folder)")
    p.add_argument("--steps", type=_steps_list, default=[2, 4, 8], help="step counts (default 2,4,8)")
    p.add_argument("--n", type=_positive_int, default=2048, help="base points to tune on (default 2048)")
    p.add_argument("--seed", type=int, default=7, help="seed of the base points (default 7)")
    p.add_argument("--iters", type=_positive_int, default=150, help="Adam iterations per grid (default 150)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_tune_grid)


def _add_export(sub, fmt) -> None:
    p = sub.add_parser("export", help="write a run's trained map to a folder of its own (for "
                       "flowmaps.load)", formatter_class=fmt,
                       description="Write DIR/model.safetensors (the EMA weights, or the raw weights "
                                   "with --raw-weights; no optimiser, RNG or training state) and "
                                   "DIR/config.json (network, interpolant, scales, standardiser, "
                                   "training domain, versions, SHA-256 of the weights). Load it with "
                                   "flowmaps.load(DIR) or flowmaps.FlowMap.from_pretrained(DIR).")
    p.add_argument("run", help="run directory or checkpoint (STEM, STEM.json)")
    p.add_argument("dir", help="output folder; must be new or empty unless --overwrite")
    p.add_argument("--raw-weights", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--ema", metavar="NAME", help="which averaged weights: ema (the classic EMA) or a "
                   "power-function EMA profile (train.ema_std), e.g. std0.100 (default: the "
                   "checkpoint's default)")
    p.add_argument("--overwrite", action="store_true", help="replace model.safetensors and "
                   "config.json in a folder that holds files (other files are kept)")
    p.set_defaults(func=cmd_export)


def _std_list(text: str) -> list[float]:
    from ..train.power_ema import STD_MAX

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= STD_MAX for v in values):
        raise argparse.ArgumentTypeError(f"relative standard deviations must be in (0, {STD_MAX:.4f}], "
                                         f"got {text!r}")
    return values


def _add_ema(sub, fmt) -> None:
    p = sub.add_parser("ema", help="power-function EMA of any length after training, from the run's "
                       "snapshots (EDM2's post-hoc EMA)", formatter_class=fmt,
                       description="Reconstruct the power-function EMA of each relative standard "
                                   "deviation in --std (EDM2, arXiv 2312.02696) at --step (default: the "
                                   "last snapshot) from the snapshots a run trained with train.ema_std "
                                   "and train.ema_snapshot_every wrote in RUN/ema_snapshots: the least-"
                                   "squares combination of the stored profiles. Writes each as a new "
                                   "checkpoint RUN/ema/stdS-stepK (sample, evaluate or export it like "
                                   "any checkpoint); existing files are never replaced.")
    p.add_argument("run", help="run directory")
    p.add_argument("--std", type=_std_list, required=True, metavar="S[,S...]",
                   help="relative standard deviations sigma_rel in (0, 0.2887], e.g. 0.05,0.10")
    p.add_argument("--step", type=_positive_int, help="reconstruct at this snapshot's step (default: "
                   "the last)")
    p.set_defaults(func=cmd_ema)


def _add_demo(sub, fmt) -> None:
    p = sub.add_parser("demo", help="the main job: teacher, LMD, EMD, FMM, LSD on the checkerboard, "
                       "evaluated at 1, 2, 4, 8 steps", formatter_class=fmt,
                       description="Train a teacher velocity, distil flow maps with LMD and EMD, train "
                                   "one with FMM directly and one by self-distillation (LSD) from the "
                                   "data alone, then evaluate all at 1, 2, 4, 8 steps against the "
                                   "teacher's ODE solvers; prints the table, writes plots.")
    p.add_argument("--preset", default="checkerboard", choices=list_presets(),
                   help="dataset preset (default checkerboard)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output root (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for all runs")
    p.set_defaults(func=cmd_demo)


def _add_fid_stats(sub, fmt) -> None:
    p = sub.add_parser("fid-stats", help="reference statistics of an image dataset for the Fréchet "
                       "distance (trains the offline feature classifier)", formatter_class=fmt,
                       epilog=EPILOG_OVERRIDES,
                       description="Compute once per dataset what image evaluations compare against: "
                                   "with eval.features=classifier (default) a small classifier trained "
                                   "on the training split (accuracy on the held-out split recorded) and "
                                   "the mean/covariance of its features over the dataset; with "
                                   "eval.features=inception the Inception-v3 statistics (local weights "
                                   "in eval.inception_weights). Evaluate with eval.fid_stats=DIR.")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps for the classifier and the features "
                   "(default: the config's train.device, cpu)")
    _add_run_options(p, resume=False)
    p.set_defaults(func=cmd_fid_stats)


def _add_encode(sub, fmt) -> None:
    p = sub.add_parser("encode", help="encode an image dataset into a VAE's latent space (train on it "
                       "with data.name=latents)", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                       description="Encode the images of a preset's data section (with --config and "
                                   "overrides such as data.image_size=32 data.hflip=true) with a "
                                   "diffusers AutoencoderKL from a local folder: latents (z = (mean - "
                                   "shift_factor) * scaling_factor) in safetensors shards with labels, "
                                   "flipped copies when data.hflip, the held-out split, and index.json. "
                                   "Then: flowmaps train --preset latents data.path=OUT.")
    p.add_argument("--vae", required=True, metavar="DIR", help="local AutoencoderKL folder "
                   "(save_pretrained); never downloaded")
    p.add_argument("--preset", choices=list_presets(), help="preset whose data section is encoded "
                   "(default: digits)")
    p.add_argument("--config", metavar="FILE", help="YAML config applied after the preset")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder of latents (never "
                   "overwritten)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per VAE pass "
                   "(default 64)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="stored dtype (default float16)")
    p.add_argument("--posterior", choices=["mean", "sample"], default="mean", help="store the "
                   "posterior mean (default) or one posterior sample drawn from --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the stored order (and of posterior "
                   "samples); default 0")
    p.add_argument("--shard-size", type=_positive_int, default=10_000, help="latents per shard "
                   "(default 10000; a training process holds about one shard)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: encode under bf16 autocast "
                   "(default: the config's train.precision)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_encode)


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the shipped presets, or print one resolved")
    p.add_argument("--show", metavar="NAME", help="print the fully resolved config of a preset")
    p.add_argument("--objective", metavar="OBJ", help="with --show: resolve it for this objective "
                   "(a preset may hold settings for each objective)")
    p.set_defaults(func=cmd_presets)


def main(argv: list[str] | None = None) -> int:
    """Run one ``flowmaps`` command, ``argv`` as on the command line (default ``sys.argv[1:]``), and
    return its exit status: 0 success, 2 bad input (one line ``flowmaps: error: ...`` on stderr),
    3 training stopped by non-finite steps. ``flowmaps.cli.main(["train", "--preset", "gmm"])`` is
    ``flowmaps train --preset gmm``."""
    parser = build_parser()
    # Overrides may come before or after options (argparse alone collects only the first group).
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except _UsageError as err:
        print(f"flowmaps: error: {' '.join(str(err).split())} (see flowmaps --help)", file=sys.stderr)
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    clean = False
    try:
        status = args.func(args)
        clean = status == 0
        return status
    except (ConfigError, CheckpointError, RunDirError, FileNotFoundError, ValueError) as err:
        if os.environ.get("FLOWMAPS_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"flowmaps: error: {message}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        if is_main_process():
            print(f"flowmaps: {err}", file=sys.stderr)
        clean = True
        return 0
    except TrainingStopped as err:
        print(f"flowmaps: error: training stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("flowmaps: interrupted", file=sys.stderr)
        return 130
    finally:
        # Leave the process group (torchrun): exiting with it alive aborts the process.
        shutdown(sync=clean)


def console() -> None:
    """The ``flowmaps`` program (console script and ``python -m flowmaps``): :func:`main`, then exit.

    Under torchrun the process ends with ``os._exit`` once :func:`main` has left the process group and
    flushed its output. Objects still holding the gloo group (a DDP reducer, its pending work) would
    otherwise be destroyed during interpreter finalisation, where a gloo worker thread that needs the
    GIL aborts the process ("terminate called without an active exception") after the run finished.
    Every file of the run is closed by then, so skipping finalisation loses nothing."""
    status = main()
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console()
