"""Quality versus cost: flow maps at k jumps against their teacher's ODE solvers at the same NFE, for
vector and image data.

For each flow map and each step count ``k`` (NFE = k) and for the teacher's Euler / Heun / RK4 at the same
NFE (``k``, ``k/2`` and ``k/4`` steps, where whole) plus adaptive dopri5, one :class:`Row` records:
NFE, wall time per 10k samples, exact W2 to held-out data (POT, subsampled), energy distance, a
histogram KL against the exact density (checkerboard, gmm), and, where the target is an exact
reference, the mean error ``|X̂_{0,1}(x) − X_{0,1}(x)|`` against the exact map. All samplers start from
the *same* base points, so differences are the samplers', not the noise's.

Images are scored instead by an :class:`ImageReference`: the Fréchet distance (and k-NN
precision/recall) of generated images against the dataset, on the features of a small classifier
trained on the dataset (offline, the CPU default) or of Inception-v3 (standard FID; local weights,
optional ``fid`` extra). A *reference folder* (``flowmaps fid-stats``, or made on the fly inside an
evaluation folder) holds

* ``classifier.{safetensors,json}`` — the feature classifier (``eval.features: classifier``), trained on
  the training split and checked on the held-out split (its accuracy is recorded);
* ``reference_<features>.npz`` — mean and covariance of the features of every image of the dataset
  (training + held-out), the reference of the Fréchet distance (as FID uses a dataset's statistics);
* ``reference_<features>_sample.npy`` — features of up to 2000 of those images, for precision/recall;
* ``reference.json`` — dataset, feature extractor and fingerprint, accuracy, image count.

Statistics are only compared when the feature extractor's fingerprint matches.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..flowmap import FlowMap
from ..metrics.points import energy_distance, mean_map_error, wasserstein2
from ..solvers import solve_ode
from ..teachers import samplers as fast
from ..train import distributed
from .config import Config, ConfigError

__all__ = ["Row", "Evaluation", "evaluate", "markdown_table", "ImageReference", "build_reference",
           "load_reference", "reference_files"]


@dataclass
class Row:
    """One sampler at one step count. Vector data fill ``w2``/``energy`` (and ``kl``, ``map_error``
    where known); images fill ``fd`` (Fréchet distance on the evaluation features) and
    ``precision``/``recall`` (k-NN manifold estimates)."""

    method: str
    sampler: str
    steps: int | None
    nfe: int
    ms_per_10k: float
    w2: float | None = None
    energy: float | None = None
    kl: float | None = None
    map_error: float | None = None
    fd: float | None = None
    precision: float | None = None
    recall: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Evaluation:
    rows: list[Row]
    samples: dict[tuple[str, str, int | None], Tensor]  # (method, sampler, steps) -> data units
    paths: dict[str, Tensor]


def _sharded(sampler: Callable, x0: Tensor, cond: Tensor | None, chunk: int, device,
             repeats: int = 2, rows: bool = False) -> tuple[Tensor, float, int]:
    """``sampler(x0_chunk, cond_chunk) -> (x, nfe)`` over the chunks of this rank, gathered:
    ``(samples on the CPU, best wall time of `repeats`, mean NFE per sample)``. With ``rows`` the
    sampler also gets the chunk's row indices (``sampler(x, cond, rows)``)."""
    best, out = math.inf, None
    index = torch.arange(x0.shape[0])
    for _ in range(repeats):
        work = torch.zeros(2, dtype=torch.float64)  # sum of NFE x rows, rows

        def one(xc: Tensor, cc: Tensor | None, rc: Tensor) -> Tensor:
            args = (xc.to(device), None if cc is None else cc.to(device)) + ((rc,) if rows else ())
            x, nfe = sampler(*args)
            work.add_(torch.tensor([float(nfe) * xc.shape[0], float(xc.shape[0])],
                                   dtype=torch.float64))
            return x

        start = time.perf_counter()
        out = distributed.map_sharded(one, x0, cond, index, chunk=chunk)
        best = min(best, time.perf_counter() - start)
    total, rows = distributed.all_reduce_sum(work).tolist()
    return out, best, round(total / max(rows, 1.0))


@torch.no_grad()
def evaluate(flow_maps: dict[str, FlowMap], teacher: Callable | None, x0: Tensor, held_out: Tensor,
             to_data_units: Callable[[Tensor], Tensor] = lambda x: x, steps=(1, 2, 4, 8, 16),
             solvers=("euler", "heun", "rk4"), dopri5: bool = True, rtol: float = 1e-5,
             exact_map: Tensor | None = None, kl: Callable[[Tensor], float] | None = None,
             w2_samples: int = 2000, energy_samples: int = 4000, seed: int = 0,
             teacher_name: str = "teacher", progress: Callable[[str], None] | None = None,
             n_paths: int = 64, quality: Callable[[Tensor], dict] | None = None,
             cond: Tensor | None = None, device="cpu", chunk: int | None = None,
             tuned_grids: dict[str, dict[int, Tensor]] | None = None, gammas=(),
             interpolant=None, samplers=(), spacings=("auto",), schedulers=()) -> Evaluation:
    """Evaluate every flow map at every step count, and the teacher's solvers at the same NFE.

    ``x0``: base samples in model space (shared by all samplers); ``held_out``: data units;
    ``exact_map``: ``X_{0,1}(x0)`` in model space, when known. ``quality(x) -> {field: value}``
    replaces the vector metrics (W2, energy, KL) — images use it for the Fréchet distance and
    precision/recall. ``cond``: class labels of the base points (class-conditional models and
    teachers get them). Samples are drawn on ``device``, ``chunk`` base points at a time (default:
    all at once), sharded under torchrun (module docstring); rank 0 alone scores them (the other
    ranks return no rows). ``progress``, when given, receives one line per row scored (``evaluated
    METHOD SAMPLER steps=K nfe=N``) and per note (``skipped …``: rows that cannot be drawn).

    ``samplers`` (``ddim``, ``dpmpp_2m``; :mod:`flowmaps.teachers.samplers`) add rows of the teacher's
    fast samplers at ``k`` steps (NFE ``k``) on each of ``spacings`` (``auto``: diffusers' default of the
    sampler for a VP teacher, ``leading`` for DDIM and ``linspace`` for DPM-Solver, else ``uniform_t``
    for DDIM and ``uniform_lambda`` for DPM-Solver); they need the linear interpolant. ``schedulers``
    (``own`` or a compatible diffusers scheduler class name) add rows of a diffusers teacher's own
    scheduler, ``set_timesteps(k)`` + ``step``, on its network; other teachers have none and get none.
    """
    rows: list[Row] = []
    samples: dict = {}
    paths: dict = {}
    scale = 10_000 / x0.shape[0]
    chunk = chunk or x0.shape[0]
    main = distributed.is_main()

    def score(method, sampler, k, nfe, x, seconds):
        if not main:
            return
        xd = to_data_units(x)
        samples[(method, sampler, k)] = xd
        if quality is not None:
            metrics = quality(xd)
        else:
            g = torch.Generator().manual_seed(seed)
            metrics = dict(w2=wasserstein2(xd, held_out, max_samples=w2_samples, generator=g),
                           energy=energy_distance(xd, held_out, max_samples=energy_samples,
                                                  generator=torch.Generator().manual_seed(seed)),
                           kl=kl(xd) if kl is not None else None)
        rows.append(Row(method=method, sampler=sampler, steps=k, nfe=nfe,
                        ms_per_10k=1e3 * seconds * scale,
                        map_error=mean_map_error(x, exact_map) if exact_map is not None else None,
                        **metrics))
        if progress:
            progress(f"evaluated {method} {sampler} steps={k} nfe={nfe}")

    def sub(c, n):
        return None if c is None else c[:n].to(device)

    def field(c):  # the teacher velocity for labels c (a chunk's)
        return teacher if c is None else (lambda x, t: teacher(x, t, c))

    def solved(solver, **options):
        def run(xc, cc):
            sol = solve_ode(field(cc), xc, solver, **options)
            return sol.x, sol.nfe
        return run

    paths_x0 = x0[:n_paths].to(device)
    for name, model in flow_maps.items():
        model.eval()
        # A map trained on jumps to the data only (domain "data", sCT) samples k > 1 steps with γ = 1
        # alone: its rows "flow map" at one step, "gamma=1" beyond.
        to_data = getattr(model, "domain", None) == "data"
        for k in [k for k in steps if k == 1 or not to_data]:
            x, seconds, nfe = _sharded(lambda xc, cc: (model.sample(xc, steps=k, cond=cc), k), x0,
                                       cond, chunk, device)
            score(name, "flow map", k, nfe, x, seconds)
        for k, grid in sorted((tuned_grids or {}).get(name, {}).items()):
            x, seconds, nfe = _sharded(lambda xc, cc: (model.sample(xc, grid=grid, cond=cc), k), x0,
                                       cond, chunk, device)
            score(name, "tuned grid", k, nfe, x, seconds)
        for gamma in [1.0] if to_data else gammas:
            for k in [k for k in steps if k > 1]:  # one jump has no interior time to re-noise at
                # fresh noise per chunk, seeded by the evaluation seed and the chunk's first row
                x, seconds, nfe = _sharded(lambda xc, cc, rows: (model.sample(
                    xc, steps=k, cond=cc, gamma=gamma, interpolant=interpolant,
                    generator=torch.Generator(device=xc.device).manual_seed(
                        (seed + 1) * 1_000_003 + int(rows[0]))), k), x0, cond, chunk, device,
                    rows=True)
                score(name, f"gamma={gamma:g}", k, nfe, x, seconds)
        if main:
            paths[name] = model.sample(paths_x0, steps=1 if to_data else max(steps),
                                       cond=sub(cond, n_paths), return_path=True)[1].cpu()
    if teacher is not None:
        for k in steps:
            for solver in solvers:
                per = {"euler": 1, "heun": 2, "rk4": 4}[solver]
                if k % per:
                    continue
                x, seconds, nfe = _sharded(solved(solver, steps=k // per), x0, cond, chunk, device)
                score(teacher_name, solver, k // per, nfe, x, seconds)
        if dopri5:
            x, seconds, nfe = _sharded(solved("dopri5", rtol=rtol, atol=rtol), x0, cond, chunk,
                                       device, repeats=1)
            score(teacher_name, "dopri5", None, nfe, x, seconds)
        _fast_rows(teacher, x0, cond, chunk, device, steps, samplers, spacings, schedulers, interpolant,
                   seed, teacher_name, score, progress)
        if main:
            paths[teacher_name] = solve_ode(field(sub(cond, n_paths)), paths_x0, "rk4", steps=16,
                                            return_path=True).path.cpu()
    return Evaluation(rows, samples, paths)


def resolve_spacing(spacing: str, sampler: str, teacher) -> str:
    """The spacing ``auto`` stands for (:func:`evaluate`), or ``spacing`` itself."""
    if spacing != "auto":
        return spacing
    if getattr(teacher, "schedule", None) is not None:  # a VP teacher with a discrete schedule
        return "leading" if sampler == "ddim" else "linspace"
    return "uniform_t" if sampler == "ddim" else "uniform_lambda"


def _fast_rows(teacher, x0, cond, chunk, device, steps, samplers, spacings, schedulers, interpolant,
               seed, teacher_name, score, progress):
    """Rows of the teacher's DDIM / DPM-Solver++(2M) and of its own diffusers scheduler(s)."""
    sigma0 = getattr(interpolant, "sigma0", None) if interpolant is not None else 1.0
    linear = interpolant is None or (type(interpolant).__name__ == "Linear"
                                     and torch.as_tensor(sigma0).numel() == 1)
    if samplers and not linear:
        if progress:
            progress("skipped the DDIM / DPM-Solver rows of eval.samplers: they need the linear interpolant "
                     "with one sigma0")
        samplers = ()
    for name in samplers:
        for spacing in dict.fromkeys(resolve_spacing(s, name, teacher) for s in spacings):
            try:
                fast.grid(spacing, 1, teacher)
            except ValueError as err:
                raise ConfigError(f"eval.spacings: {err}") from None
            for k in steps:
                def run(xc, cc, k=k, spacing=spacing):
                    return fast.sample(teacher, xc, name, k, spacing, cond=cc), k
                x, seconds, nfe = _sharded(run, x0, cond, chunk, device)
                score(teacher_name, f"{name} ({spacing})", k, nfe, x, seconds)
    if getattr(teacher, "scheduler", None) is None:
        return
    for scheduler in schedulers:
        try:
            runner = fast.SchedulerRun(teacher, scheduler)
        except ValueError as err:
            raise ConfigError(f"eval.schedulers: {err}") from None
        for k in steps:
            def run(xc, cc, rows, k=k):
                g = torch.Generator(device=xc.device).manual_seed((seed + 7) * 1_000_003 + int(rows[0]))
                return runner(xc, k, cc, generator=g)
            x, seconds, nfe = _sharded(run, x0, cond, chunk, device, rows=True)
            score(teacher_name, runner.name, k, nfe, x, seconds)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


METRIC_COLUMNS = (("w2", "W2"), ("energy", "energy"), ("kl", "KL"), ("map_error", "map error"),
                  ("fd", "FD"), ("precision", "precision"), ("recall", "recall"))


def markdown_table(rows: list[Row]) -> str:
    """The quality-versus-cost table, one row per (method, sampler, steps); metric columns appear when
    some row has them."""
    shown = [(key, title) for key, title in METRIC_COLUMNS
             if any(getattr(r, key) is not None for r in rows)]
    head = ["method", "sampler", "steps", "NFE", "ms / 10k"] + [title for _, title in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, r.sampler, _fmt(r.steps), str(r.nfe), f"{r.ms_per_10k:.1f}"]
        cells += [_fmt(getattr(r, key)) for key, _ in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- images: reference statistics of a dataset ---------------------------------------------------

PR_SAMPLES = 2000


@dataclass
class ImageReference:
    """A feature extractor with the dataset's statistics; :meth:`quality` scores a batch of samples."""

    extractor: Callable[[Tensor], Tensor]
    stats: object  # FeatureStats
    sample_features: Tensor
    info: dict
    seed: int = 0

    def quality(self, images: Tensor) -> dict:
        """``{"fd", "precision", "recall"}`` of images ``(N, C, H, W)`` in data units (clamped to
        [−1, 1], as an image file would be)."""
        from ..metrics.images import FeatureStats, precision_recall

        feats = self.extractor(images.clamp(-1.0, 1.0))
        stats = FeatureStats.from_features(feats, self.stats.extractor, self.stats.fingerprint)
        pr = precision_recall(self.sample_features, feats, max_samples=PR_SAMPLES,
                              generator=torch.Generator().manual_seed(self.seed))
        return {"fd": self.stats.frechet_to(stats), "precision": pr.precision, "recall": pr.recall}


def reference_files(folder: Path, features: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"stats": folder / f"reference_{features}.npz",
            "sample": folder / f"reference_{features}_sample.npy",
            "info": folder / "reference.json", "classifier": folder / "classifier"}


def _extractor(cfg: Config, folder: Path, bundle=None, progress: bool = True, device="cpu"):
    """The configured feature extractor; trains (and saves) the classifier when ``bundle`` is given."""
    from ..metrics.classifier import (load_feature_classifier, save_feature_classifier,
                                      train_feature_classifier)
    from ..metrics.features import ClassifierFeatures, InceptionFeatures

    e = cfg.eval
    if e.features == "inception":
        if not e.inception_weights:
            raise ConfigError("eval.inception_weights: the path of the Inception-v3 weights file is "
                              "needed for eval.features=inception (nothing is downloaded)")
        return InceptionFeatures(e.inception_weights, device=device), {}
    files = reference_files(folder, "classifier")
    if bundle is None:
        return ClassifierFeatures(load_feature_classifier(files["classifier"]).to(device)), {}
    if bundle.labels is None:
        raise ConfigError(f"eval.features: {cfg.data.name} has no labels to train the feature "
                          "classifier; use eval.features=inception")
    if progress:
        print(f"training the feature classifier on {cfg.data.name} ({e.classifier_steps} steps) ...",
              flush=True)
    model, accuracy = train_feature_classifier(
        bundle.train, bundle.labels, bundle.num_classes, steps=e.classifier_steps, seed=e.seed,
        validation=(bundle.held_out, bundle.held_out_labels), progress=progress, device=device)
    save_feature_classifier(model, files["classifier"], {"data": cfg.data.name, "accuracy": accuracy,
                                                         "steps": e.classifier_steps})
    return ClassifierFeatures(model), {"classifier_accuracy": accuracy}


def _joined_batches(parts, batch_size: int):
    """The images of ``parts`` (tensors or :class:`~flowmaps.data.images.ByteImages`) one after another,
    in float batches of ``batch_size`` cut as from their concatenation, without concatenating them:
    only one batch is decoded at a time."""
    bounds, start = [], 0
    for part in parts:
        bounds.append((start, start + len(part), part))
        start += len(part)
    for lo in range(0, start, batch_size):
        hi = min(lo + batch_size, start)
        pieces = [part[max(lo, a) - a:min(hi, b) - a] for a, b, part in bounds if a < hi and lo < b]
        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def build_reference(cfg: Config, bundle, folder: Path, progress: bool = True,
                    device="cpu") -> ImageReference:
    """Train/load the extractor (on ``device``) and write the dataset's reference statistics into
    ``folder``."""
    from ..metrics.features import compute_features
    from ..metrics.images import FeatureStats

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extractor, info = _extractor(cfg, folder, bundle, progress, device)
    parts = (bundle.train, bundle.held_out)
    count = sum(len(part) for part in parts)
    feats = compute_features(extractor, _joined_batches(parts, cfg.eval.batch_size), n=count,
                             batch_size=cfg.eval.batch_size)
    stats = FeatureStats.from_features(feats, extractor.name, extractor.fingerprint)
    g = torch.Generator().manual_seed(cfg.eval.seed)
    sample = feats[torch.randperm(feats.shape[0], generator=g)[:PR_SAMPLES]]
    files = reference_files(folder, cfg.eval.features)
    stats.save(files["stats"])
    np.save(files["sample"], sample.numpy())
    info = dict(info, data=cfg.data.name, features=cfg.eval.features, extractor=extractor.name,
                fingerprint=extractor.fingerprint, images=count, shape=list(bundle.train.shape[1:]))
    files["info"].write_text(json.dumps(info, indent=2))
    if progress:
        print(f"wrote reference statistics of {count} {cfg.data.name} images "
              f"({extractor.name}) to {folder}", flush=True)
    return ImageReference(extractor, stats, sample, info, cfg.eval.seed)


def load_reference(cfg: Config, folder: Path, device="cpu") -> ImageReference:
    """Read a reference folder made by :func:`build_reference` (``flowmaps fid-stats``); its feature
    extractor runs on ``device``."""
    from ..metrics.images import FeatureStats

    files = reference_files(folder, cfg.eval.features)
    for key in ("stats", "sample", "info"):
        if not files[key].is_file():
            raise ConfigError(f"eval.fid_stats: {files[key]} not found (make it with `flowmaps fid-stats "
                              f"--preset {cfg.preset} --out {folder}`)")
    info = json.loads(files["info"].read_text())
    # a run distilled without data (data.name=none) is compared with the statistics it is given: those
    # of the data its teacher learned
    if info.get("data") != cfg.data.name and cfg.data.name != "none":
        raise ConfigError(f"eval.fid_stats: {folder} holds statistics of {info.get('data')!r}, not "
                          f"{cfg.data.name!r}")
    extractor, _ = _extractor(cfg, folder, device=device)
    stats = FeatureStats.load(files["stats"])
    if stats.fingerprint and stats.fingerprint != extractor.fingerprint:
        raise ConfigError(f"eval.fid_stats: {files['stats']} was computed with other feature weights")
    sample = torch.from_numpy(np.load(files["sample"], allow_pickle=False))
    return ImageReference(extractor, stats, sample, info, cfg.eval.seed)
