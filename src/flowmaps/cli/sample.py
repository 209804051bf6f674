"""``flowmaps sample``: draw samples from a checkpoint at one or more step counts (flow maps) or with an
ODE solver (velocities), write each set as ``samples_<label>.npy`` in data units and a ``samples.png``.
Everything is checked before the first file is written.

On ``--device``, ``--batch-size`` base points at a time. The base points come from ``--seed`` on the CPU,
so they are the same on any device; under ``torchrun`` each rank draws its share of the batches and
rank 0 gathers and writes them: the sample of a given index is the one-process run's, bit for bit
(:func:`~flowmaps.train.distributed.map_sharded`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.grids import save_labeled_grids
from ..data.points import load_array
from ..nets.guidance import guidance_condition
from ..objectives import GuidedVelocity
from ..runs.config import ConfigError
from ..runs.models import Loaded, class_labels, load_model, sample_shape
from ..runs import extras
from ..runs.devices import open_device
from ..runs.grid_tuning import load_tuned_grids, run_directory
from ..runs.rundir import RunDirError, check_parents
from ..solvers import solve_ode
from ..train import distributed


def weights_choice(args) -> bool | str:
    """``use_ema`` of :func:`~flowmaps.runs.models.load_model` from ``--raw-weights`` / ``--ema``."""
    if args.raw_weights and args.ema:
        raise ConfigError("--raw-weights and --ema: choose one (raw weights, or averaged weights by name)")
    return False if args.raw_weights else (args.ema or True)


def cmd_sample(args) -> int:
    device, dist = open_device(args.device)
    loaded = load_model(args.checkpoint, use_ema=weights_choice(args), device=device)
    if loaded.scales.get("latents"):  # samples are decoded to images, batch by batch on the device
        from ..runs.latents import latent_codec

        loaded.decoder = latent_codec(loaded.config, loaded.scales, device, vae=args.vae)
    elif getattr(args, "vae", None):
        raise ConfigError("--vae: applies to models trained on latents (data.name=latents)")
    # a run's samples go in the run, an exported model's in its folder
    out = Path(args.out) if args.out else run_directory(args.checkpoint) / "samples"
    jobs = _jobs(args, loaded)
    image = len(sample_shape(loaded.scales)) == 3
    data = _data_to_plot(args, loaded, image)
    files = _output_files(out, [label for label, _ in jobs], args.overwrite)  # every rank checks
    distributed.barrier()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    shown = _draw(args, loaded, jobs, files, device, write=dist.is_main)
    if not dist.is_main:
        return 0
    if image:
        png = save_labeled_grids({k: v[:64].clamp(-1, 1) for k, v in shown.items()},
                                 out / "samples.png")
    elif not extras.plots_available():  # a plain install: the samples are written, the figure not
        extras.warn_no_plots(str(out / "samples.png"))
        return 0
    else:
        from ..runs.plotting import plot_samples

        png = plot_samples(shown, shown[next(iter(shown))] if data is None else data,
                           out / "samples.png", title=str(args.checkpoint))
    print(f"wrote {png}")
    return 0


def _jobs(args, loaded: Loaded) -> list[tuple[str, object]]:
    """``[(label, sampler of (x0, cond))]``: the grid and each step count asked for, after checking the
    class label and guidance options against the checkpoint."""
    is_velocity = loaded.config.objective.name == "velocity"
    num_classes = loaded.scales.get("num_classes", 0)
    if args.label is not None and not 0 <= args.label < num_classes:
        raise ConfigError(f"--label {args.label}: the checkpoint has "
                          + (f"classes 0..{num_classes - 1}" if num_classes else "no classes"))
    conditioned = getattr(loaded.model.net, "emb_guidance", None) is not None
    if args.guidance != 1.0 and not (num_classes and (is_velocity or conditioned)):
        raise ConfigError("--guidance: applies to class-conditional velocity checkpoints and to maps "
                          "trained with guidance as a condition (imf with objective.guidance_max); "
                          "another distilled map learned its guidance from its teacher")
    if args.guidance != 1.0 and args.guidance < 1.0 and conditioned:
        raise ConfigError(f"--guidance {args.guidance}: a guidance-conditioned map takes scales >= 1")
    if args.guidance_interval is not None and not conditioned:
        raise ConfigError("--guidance-interval: applies to maps trained with guidance as a condition")
    velocity = loaded.model.velocity
    if args.guidance != 1.0 and is_velocity:
        velocity = GuidedVelocity(loaded.model, args.guidance, null_label=num_classes)
    if (args.grid or args.gamma) and is_velocity:
        raise ConfigError(f"--{'grid' if args.grid else 'gamma'}: a velocity checkpoint is sampled with "
                          "an ODE solver; use --steps")
    gamma = dict(gamma=args.gamma, interpolant=loaded.interpolant) if args.gamma else {}
    tag = f"_gamma{args.gamma:g}" if args.gamma else ""

    def flow(**grid):
        if conditioned:  # [label, ω, lo, hi]: the scale chosen now, one evaluation per step
            lo, hi = args.guidance_interval or (0.0, 1.0)
            return lambda x0, c, g: loaded.model.sample(
                x0, cond=guidance_condition(c, args.guidance, lo, hi, dtype=x0.dtype), generator=g,
                **grid, **gamma)
        return lambda x0, c, g: loaded.model.sample(x0, cond=c, generator=g, **grid, **gamma)

    jobs = []
    if args.grid == "tuned":
        steps = args.steps or [2, 4, 8]
        for k, grid in load_tuned_grids(args.checkpoint, steps).items():
            jobs.append((f"tuned{k}{tag}", flow(grid=grid)))
        return jobs
    if args.grid:
        jobs.append((f"grid{tag}", flow(grid=torch.tensor(args.grid))))
    for k in args.steps or ([] if args.grid else [1, 2, 4]):
        if is_velocity:
            jobs.append((f"{args.solver}{k}", lambda x0, c, g, k=k: solve_ode(
                lambda x, t: velocity(x, t, c), x0, args.solver, steps=k).x))
        else:
            jobs.append((f"steps{k}{tag}", flow(steps=k)))
    return jobs


def _data_to_plot(args, loaded: Loaded, image: bool):
    """``--data``, read and checked before any sample is written (vector checkpoints only)."""
    if image and args.data is not None:
        raise ConfigError("--data: plotting data beside samples is for vector data; image samples are "
                          "written as a grid")
    if args.data is None:
        return None
    data = load_array(args.data)
    dim = loaded.scales["dim"]
    if data.shape[1] != dim:
        raise ConfigError(f"--data {args.data}: has dimension {data.shape[1]}, the checkpoint has "
                          f"dimension {dim}")
    return data


def _output_files(out: Path, labels: list[str], overwrite: bool) -> list[Path]:
    """``out/samples_<label>.npy`` for each label, refusing to replace one unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a directory")
    check_parents(out)
    files = [out / f"samples_{label}.npy" for label in labels]
    clash = [str(f) for f in files if f.exists()]
    if clash and not overwrite:
        raise RunDirError(f"{clash[0]} already exists; choose another --out or pass --overwrite")
    return files


def _noise(seed: int, row: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed + 1) * 1_000_003 + row)


def _draw(args, loaded: Loaded, jobs, files: list[Path], device,
          write: bool = True) -> dict[str, torch.Tensor]:
    """Run every job from the same base points (and labels), ``--batch-size`` at a time on ``device``
    (this rank's share under torchrun, gathered), and save its samples in data units (``write``)."""
    g = torch.Generator().manual_seed(args.seed)
    x0 = loaded.interpolant.sample_base(torch.empty(args.n, *sample_shape(loaded.scales)), g)
    cond = None
    if loaded.scales.get("num_classes", 0):
        cond = (torch.full((args.n,), args.label) if args.label is not None
                else class_labels(args.n, loaded.scales))
    shown = {}
    with torch.no_grad():
        for (label, job), path in zip(jobs, files):
            # γ-sampling's fresh noise: a stream per chunk, seeded by --seed and the chunk's first row,
            # so a rerun repeats it however the rows are shared among processes
            x = distributed.map_sharded(
                lambda xc, cc, rows: job(xc.to(device), None if cc is None else cc.to(device),
                                         _noise(args.seed, int(rows[0]), device)),
                x0, cond, torch.arange(args.n), chunk=args.batch_size)
            x = loaded.to_data_units(x)
            shown[label] = x
            if write:
                np.save(path, x.numpy())
                print(f"wrote {path} ({args.n} samples)")
    return shown
