"""Assemble a run from its :class:`~flowmaps.runs.config.Config`: data, teacher and objective (the network,
and the checkpoints that save and rebuild it, are :mod:`flowmaps.runs.models`).

Data live in *model space*: standardised when ``data.standardize`` is set (statistics kept in every
checkpoint), raw otherwise. Scales given as ``"data"`` (``interpolant.sigma0``, ``model.sigma_data``) are
resolved from the training set once and stored in the checkpoint as numbers, so a checkpoint rebuilds its
model without the data. Time convention: ``t = 0`` base, ``t = 1`` data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..data.images import ByteImages
from ..data.points import Standardizer, load_array, make_dataset
from ..exact import ExactReference, GaussianMixture
from ..interpolants import Interpolant, make_interpolant
from ..solvers import solve_ode
from ..objectives import (CT, EMD, ESD, FMM, LMD, LSD, PFMM, PSD, SCT, AlphaFlow, ImprovedMeanFlow,
                          MeanFlow, Objective, Shortcut, TimeSampler, Velocity)
from ..teachers import TeacherError, check_teacher, from_factory
from .config import Config, ConfigError
from .models import class_labels, load_model, sample_shape
from .validation import SELF_DISTILLATION

__all__ = ["DataBundle", "IMAGE_DATASETS", "build_data", "resolve_scales", "attach_reference",
           "build_objective", "build_teacher", "factory_teacher", "needs_teacher"]


IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagenet32", "image_folder")


@dataclass
class DataBundle:
    """Training samples (model space), held-out samples (data units), and what relates the two.

    Vectors are ``(N, d)`` tensors; images ``(N, C, H, W)`` in [−1, 1] with optional class ``labels``,
    kept as the reader stores them: :class:`~flowmaps.data.images.ByteImages` (uint8, decoded to
    float32 per batch when indexed: ``held_out[:n]``, the trainer's draws) or, once resized or made
    grey, float32 tensors."""

    train: Tensor | ByteImages
    held_out: Tensor | ByteImages
    standardizer: Standardizer | None
    reference: ExactReference | None = None  # exact target in model space (gmm data)
    kl: Callable[[Tensor], float] | None = None  # data-units KL oracle (checkerboard / gmm)
    labels: Tensor | None = None  # class labels of train (image datasets that have them)
    held_out_labels: Tensor | None = None
    num_classes: int = 0
    image: bool = False
    latents: dict | None = None  # the index of a latents folder (data.name: latents)
    decoder: Callable[[Tensor], Tensor] | None = None  # latents -> images (set where images are shown)
    data_free: bool = False  # data.name=none: train and held_out are the teacher's samples (spec E.8)
    teacher_scales: dict | None = None  # data.name=none with a checkpoint teacher: its scales
    teacher: Callable | None = None  # data.name=none with teacher.factory: the teacher already built

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return int(torch.tensor(self.sample_shape).prod())

    def to_data_units(self, x: Tensor) -> Tensor:
        """Model space to data units: un-standardised, and decoded to images when a decoder is set."""
        x = self.standardizer.inverse(x) if self.standardizer is not None else x
        return self.decoder(x) if self.decoder is not None else x


def _gmm_reference(cfg: Config, interpolant: Interpolant | None = None) -> GaussianMixture:
    spec = cfg.data.gmm
    try:
        return GaussianMixture(spec.means, covs=spec.covs, stds=spec.stds if spec.covs is None else None,
                               weights=spec.weights, interpolant=interpolant)
    except ValueError as err:
        raise ConfigError(f"data.gmm: {err}") from None


def build_data(cfg: Config) -> DataBundle:
    """Generate or load the dataset; split off ``n_eval`` held-out samples."""
    g = torch.Generator().manual_seed(cfg.data.seed)
    d = cfg.data
    if d.name == "none":
        return _build_data_free(cfg)
    if d.name in IMAGE_DATASETS:
        return _build_images(cfg)
    if d.name == "latents":
        return _build_latents(cfg)
    if d.name == "file":
        data = load_array(d.path)
        if data.shape[0] < 2:
            raise ConfigError(f"data.path: {d.path} has {data.shape[0]} row(s); need at least 2")
        perm = torch.randperm(data.shape[0], generator=g)
        n_eval = min(d.n_eval, max(1, data.shape[0] // 5))
        held_out, train = data[perm[:n_eval]], data[perm[n_eval:]]
    elif d.name == "gmm":
        ref = _gmm_reference(cfg)
        train, held_out = ref.sample(d.n_train, generator=g), ref.sample(d.n_eval, generator=g)
    else:
        train, held_out = make_dataset(d.name, d.n_train, g), make_dataset(d.name, d.n_eval, g)
    standardizer = None
    if d.standardize:
        standardizer = Standardizer.fit(train)
        train = standardizer.transform(train)
    kl = None
    if d.name == "checkerboard":
        from ..metrics.points import checkerboard_kl
        kl = checkerboard_kl
    return DataBundle(train=train, held_out=held_out, standardizer=standardizer, kl=kl)


def _build_data_free(cfg: Config) -> DataBundle:
    """``data.name=none`` (spec E.8): no dataset. What a run still needs from data comes from the
    teacher's samples: the scales (``"data"`` scales resolved on them), the validation batch and the
    held-out set of the plots and of ``evaluate``. With ``teacher.exact`` those are samples of the
    mixture ``data.gmm`` (the exact flow's law at ``t = 1``); with ``teacher.checkpoint`` or
    ``teacher.factory`` (of shape ``teacher.shape``) the teacher's RK4 samples (``data.teacher_steps``
    intervals) from ``min(n_eval, 2048)`` base points of ``data.seed``, in the teacher's model space (a
    checkpoint's standardiser kept), labelled ``0, 1, …, K−1, 0, …`` for a class-conditional teacher
    (those labels, uniform over the classes, are what training draws). Training never reads the samples:
    its points lie on the teacher's paths (:class:`~flowmaps.objectives.trajectories.TeacherPaths`)."""
    d, t = cfg.data, cfg.teacher
    g = torch.Generator().manual_seed(d.seed)
    if t.exact:
        ref = _gmm_reference(cfg)
        train, held_out = ref.sample(min(d.n_eval, 2048), generator=g), ref.sample(d.n_eval, generator=g)
        return DataBundle(train=train, held_out=held_out, standardizer=None, data_free=True)
    if not (t.checkpoint or t.factory):
        raise ConfigError("data.name: none needs teacher.checkpoint, teacher.exact or teacher.factory")
    n = min(d.n_eval, 2048)
    if t.factory:
        shape, num_classes = tuple(t.shape), t.num_classes
        scales = {"sigma0": float(cfg.interpolant.sigma0), "num_classes": num_classes}
        interpolant, standardizer, to_data_units = make_interpolant(cfg.interpolant.name, torch.tensor(
            scales["sigma0"])), None, None
        x0 = interpolant.sample_base(torch.empty(n, *shape), g)
        velocity = factory_teacher(cfg, DataBundle(train=x0, held_out=x0, standardizer=None),
                                   scales, "cpu")
    else:
        teacher = load_model(t.checkpoint)
        scales, shape = teacher.scales, sample_shape(teacher.scales)
        num_classes, standardizer = scales.get("num_classes", 0), teacher.standardizer
        velocity, to_data_units = teacher.model.velocity, teacher.to_data_units
        if t.guidance != 1.0 and num_classes:  # the guided flow the student will learn (build_teacher)
            from ..objectives import GuidedVelocity
            velocity = GuidedVelocity(teacher.model, t.guidance, null_label=num_classes)
        x0 = teacher.interpolant.sample_base(torch.empty(n, *shape), g)
    if cfg.model.class_conditional and not num_classes:
        raise ConfigError(f"model.class_conditional: the teacher {t.checkpoint or t.factory} takes no "
                          "class labels")
    labels = class_labels(n, scales) if cfg.model.class_conditional else None
    with torch.no_grad():
        b = velocity if labels is None else (lambda x, tau: velocity(x, tau, labels))
        x1 = solve_ode(b, x0, "rk4", steps=d.teacher_steps).x
    return DataBundle(train=x1, held_out=x1 if to_data_units is None else to_data_units(x1),
                      standardizer=standardizer, labels=labels, held_out_labels=labels,
                      num_classes=num_classes if labels is not None else 0, image=len(shape) == 3,
                      data_free=True, teacher_scales=scales, teacher=velocity if t.factory else None)


def _build_images(cfg: Config) -> DataBundle:
    from ..data.image_readers import load_image_dataset

    d = cfg.data
    options = {}
    if d.limit:
        options["limit"] = d.limit
    if d.image_size:
        options["size"] = d.image_size
    dataset = load_image_dataset(d.name, d.path, **options)
    n = len(dataset)
    if n < 2:
        raise ConfigError(f"data: {d.name} has {n} image(s); need at least 2")
    train, held_out = dataset.split(min(d.n_eval, max(1, n // 5)), seed=d.seed)
    return DataBundle(train=train.data, held_out=held_out.data, standardizer=None,
                      labels=train.labels, held_out_labels=held_out.labels,
                      num_classes=dataset.num_classes, image=True)


HELD_OUT_LATENTS = 2048  # held-out latents kept as float32 (validation and sheets use fewer)


def _build_latents(cfg: Config) -> DataBundle:
    """A latents folder (``flowmaps encode``): the training shards as a lazy
    :class:`~flowmaps.data.latents.LatentShards` (labels drawn with the rows when the model is
    class-conditional; shard order seeded by ``train.seed``, shared out among torchrun ranks), and the
    first :data:`HELD_OUT_LATENTS` held-out latents as float32."""
    from ..data.latents import LatentShards, read_held_out, read_index
    from ..train.distributed import info

    index = read_index(cfg.data.path)
    dist = info()
    labeled = bool(cfg.model.class_conditional and index["num_classes"])
    train = LatentShards(cfg.data.path, labeled=labeled, seed=cfg.train.seed, rank=dist.rank,
                         world=dist.world_size, index=index)
    held, held_labels = read_held_out(index)
    if held is None:
        raise ConfigError(f"data.path: {cfg.data.path} holds no held-out latents")
    held = held[:HELD_OUT_LATENTS].float()
    held_labels = None if held_labels is None else held_labels[:HELD_OUT_LATENTS].clone()
    return DataBundle(train=train, held_out=held, standardizer=None, labels=None,
                      held_out_labels=held_labels, num_classes=int(index["num_classes"]), image=True,
                      latents=index)


def _resolve_scale(value, bundle: DataBundle):
    if value != "data":
        return float(value)
    if bundle.image:  # one scale for all pixels (ByteImages: from a histogram, no float copy)
        return float(bundle.train.std().clamp_min(1e-6))
    return bundle.train.std(dim=0).clamp_min(1e-6).tolist()


def resolve_scales(cfg: Config, bundle: DataBundle) -> dict:
    """Numbers for every ``"data"`` scale, recorded in checkpoints (with the sample shape and, for a
    class-conditional model, the number of classes)."""
    m = cfg.model
    if m.name in ("unet", "dit") and not bundle.image:
        raise ConfigError(f"model.name: {m.name} needs image data; {cfg.data.name} is vector data (use mlp)")
    if m.class_conditional and not bundle.num_classes:
        raise ConfigError(f"model.class_conditional: {cfg.data.name} has no class labels")
    if bundle.teacher_scales is not None:  # without data: the teacher's base scale, σ_data "data" from its samples
        return {"sigma0": bundle.teacher_scales["sigma0"],
                "sigma_data": _resolve_scale(m.sigma_data, bundle), "dim": bundle.dim,
                "shape": list(bundle.sample_shape),
                "num_classes": bundle.num_classes if m.class_conditional else 0}
    scales = {"sigma0": _resolve_scale(cfg.interpolant.sigma0, bundle),
              "sigma_data": _resolve_scale(m.sigma_data, bundle), "dim": bundle.dim,
              "shape": list(bundle.sample_shape),
              "num_classes": bundle.num_classes if m.class_conditional else 0}
    if bundle.latents is not None:  # what decoding needs to check its VAE against the encoder's
        vae = bundle.latents["vae"]
        scales["latents"] = {"config_sha256": vae["config_sha256"],
                             "scaling_factor": vae["scaling_factor"],
                             "shift_factor": vae["shift_factor"],
                             "image_shape": list(bundle.latents["image_shape"])}
    return scales


def attach_reference(cfg: Config, bundle: DataBundle, interpolant: Interpolant) -> None:
    """For gmm data, the exact reference (velocity, flow map, density) under this interpolant."""
    exact_teacher = cfg.data.name == "none" and cfg.teacher.exact  # the mixture defines the teacher
    if (cfg.data.name == "gmm" or exact_teacher) and bundle.standardizer is None:
        bundle.reference = _gmm_reference(cfg, interpolant)
        from ..metrics.points import histogram_kl
        ref = bundle.reference
        bundle.kl = lambda x: histogram_kl(x, ref.log_prob, bins=50, low=-4.0, high=4.0)


def build_teacher(cfg: Config, bundle: DataBundle, scales: dict, device="cpu"):
    """The teacher velocity ``b(x, t)`` for distillation: exact (gmm), a velocity checkpoint, or the
    user's ``teacher.factory`` (:func:`factory_teacher`)."""
    t = cfg.teacher
    if int(t.exact) + bool(t.checkpoint) + bool(t.factory) != 1:
        raise ConfigError("teacher: set exactly one of teacher.checkpoint=PATH, teacher.exact=true or "
                          "teacher.factory=package.module:function")
    if t.factory:
        if bundle.teacher is not None:  # built (on the CPU) to make the held-out samples without data
            return bundle.teacher.to(device) if isinstance(bundle.teacher, torch.nn.Module) else bundle.teacher
        return factory_teacher(cfg, bundle, scales, device)
    if t.exact:
        if bundle.reference is None:
            raise ConfigError("teacher.exact: only the gmm dataset (without standardize) has an exact "
                              "velocity")
        return bundle.reference
    loaded = load_model(t.checkpoint, device=device)
    if loaded.scales["dim"] != scales["dim"]:
        raise ConfigError(f"teacher.checkpoint: teacher has dimension {loaded.scales['dim']}, "
                          f"the data has {scales['dim']}")
    if loaded.standardizer is not None or bundle.standardizer is not None:
        same = (loaded.standardizer is not None and bundle.standardizer is not None
                and torch.allclose(loaded.standardizer.mean, bundle.standardizer.mean, atol=1e-5)
                and torch.allclose(loaded.standardizer.std, bundle.standardizer.std, atol=1e-5))
        if not same:
            raise ConfigError("teacher.checkpoint: the teacher was trained on differently "
                              "standardised data")
    if not torch.allclose(torch.tensor(loaded.scales["sigma0"]), torch.tensor(scales["sigma0"]),
                          atol=1e-5) or loaded.config.interpolant.name != cfg.interpolant.name:
        raise ConfigError("teacher.checkpoint: the teacher used a different interpolant or base scale "
                          f"({loaded.config.interpolant.name}, sigma0={loaded.scales['sigma0']})")
    loaded.model.requires_grad_(False)
    if t.guidance != 1.0:
        null = loaded.scales.get("num_classes", 0)
        if not null:
            raise ConfigError("teacher.guidance: needs a class-conditional teacher "
                              "(model.class_conditional=true)")
        from ..objectives import GuidedVelocity

        return GuidedVelocity(loaded.model, t.guidance, null_label=null)
    return loaded.model


def factory_teacher(cfg: Config, bundle: DataBundle, scales: dict, device="cpu"):
    """``teacher.factory`` (:func:`flowmaps.teachers.from_factory`): the user's function, its weights,
    kwargs and adapter, on ``device``, checked by one forward pass on a few training samples (model space:
    standardised when ``data.standardize``). Every failure is a one-line :class:`ConfigError` naming the
    ``teacher.*`` key at fault."""
    t = cfg.teacher
    if t.guidance != 1.0:
        raise ConfigError("teacher.guidance: applies to class-conditional flowmaps checkpoints; guide a "
                          "teacher.factory model inside your function")
    sigma0 = torch.as_tensor(scales["sigma0"], dtype=torch.float64)
    if t.adapter is not None and (cfg.interpolant.name != "linear" or sigma0.numel() != 1):
        raise ConfigError(f"teacher.adapter: {t.adapter} converts to the linear interpolant with one base "
                          f"scale; this run has interpolant.name={cfg.interpolant.name}, "
                          f"interpolant.sigma0={scales['sigma0']} (set interpolant.name=linear and a "
                          "number for interpolant.sigma0)")
    try:
        options = {"noise_end": t.noise_end, "tau_start": t.tau_start} if t.adapter == "diffusers_vp" else {}
        velocity = from_factory(t.factory, kwargs=t.kwargs, weights=t.weights, adapter=t.adapter,
                                sigma0=float(sigma0.reshape(-1)[0]), options=options)
        if isinstance(velocity, torch.nn.Module):
            velocity = velocity.to(device)
        check_teacher(velocity, bundle.train[:8].to(device), where=f"the teacher of {t.factory}")
    except TeacherError as err:
        raise ConfigError(f"teacher.{err.key}: {err}") from None
    return velocity


SELF_DISTILLATION_CLASSES = {"lsd": LSD, "esd": ESD, "psd": PSD, "meanflow": MeanFlow,
                             "shortcut": Shortcut, "ct": CT, "imf": ImprovedMeanFlow, "sct": SCT,
                             "alphaflow": AlphaFlow}
# Options of the self-distillation step, ObjectiveConfig key -> SelfDistillation keyword.
_SD_SWITCHES = {"residual": "residual", "form": "form", "source": "source", "stopgrad": "stopgrad",
                "weighting": "weighting", "psd_gamma": "gamma", "times": "domain",
                "distribution": "sampler", "diagonal": "diagonal", "diagonal_times": "diagonal_times"}
_SD_VALUES = ("eta", "time_mean", "time_std", "ema_decay", "adaptive_p", "adaptive_eps", "tangent_c",
              "tangent_warmup", "dyadic_levels", "offdiag_dropout")


def needs_teacher(cfg: Config) -> bool:
    """Whether the configured objective distils from a teacher velocity (``flowmaps distill``)."""
    o = cfg.objective
    return o.name in ("lmd", "emd", "pfmm") or (o.name in SELF_DISTILLATION and o.source == "teacher")


def self_distillation_options(cfg: Config, num_classes: int = 0) -> dict:
    """The switches of the self-distillation step set in ``cfg.objective`` (``default``/``null`` keys
    are left to the objective, whose defaults are its paper's)."""
    o = cfg.objective
    options = {kw: getattr(o, key) for key, kw in _SD_SWITCHES.items() if getattr(o, key) != "default"}
    options.update({key: getattr(o, key) for key in _SD_VALUES if getattr(o, key) is not None})
    if o.fm_steps or o.anneal_steps:
        options.update(fm_steps=o.fm_steps, anneal_steps=o.anneal_steps)
    guided = o.guidance != 1.0 or (o.guidance_kappa or 0.0) != 0.0 or o.guidance_max > 0
    if o.guidance_max > 0:
        options["guidance_max"] = o.guidance_max
    if guided:
        if not num_classes:
            raise ConfigError("objective.guidance: needs a class-conditional model "
                              "(model.class_conditional=true)")
        options.update(guidance=o.guidance, null_label=num_classes)
    if o.guidance_kappa is not None:
        options["guidance_kappa"] = o.guidance_kappa
    if o.guidance_interval is not None:
        if len(o.guidance_interval) != 2:
            raise ConfigError(f"objective.guidance_interval: two times lo,hi, got {o.guidance_interval}")
        options["guidance_interval"] = tuple(float(v) for v in o.guidance_interval)
    return options


def build_objective(cfg: Config, interpolant: Interpolant, teacher=None,
                    num_classes: int = 0) -> Objective:
    """The objective ``cfg.objective`` names, with its options; ``num_classes`` (the null label) for
    guidance of a class-conditional model."""
    o = cfg.objective
    if needs_teacher(cfg) and teacher is None:
        raise ConfigError(f"objective.name: {o.name} distils from a teacher; use `flowmaps distill`")
    try:
        if o.name in SELF_DISTILLATION_CLASSES or o.name in ("lmd", "emd"):
            options = self_distillation_options(cfg, num_classes)
            if o.name == "lmd":
                options.setdefault("stopgrad", "target" if o.semigradient else "source")
                return LMD(interpolant, teacher, **options)
            if o.name == "emd":
                return EMD(interpolant, teacher, form=o.emd_form, **options)
            if teacher is not None:
                options["teacher"] = teacher
            if o.name == "sct" and o.target != "default":
                options["target"] = o.target
            if o.name == "alphaflow":  # the curriculum ends at train.steps unless alpha_end says
                end = o.alpha_end if o.alpha_end is not None else cfg.train.steps
                options.update(alpha_steps=(o.alpha_start, end), alpha_gamma=o.alpha_gamma,
                               alpha_clamp=o.alpha_clamp, target_clamp=o.target_clamp)
            return SELF_DISTILLATION_CLASSES[o.name](interpolant, **options)
        sampler = None if o.distribution == "default" else o.distribution
        times = None if o.times == "default" else TimeSampler(o.times, sampler or "uniform")
        if times is None and sampler not in (None, "uniform"):
            domain = {"velocity": "diagonal", "fmm": "square"}.get(o.name, "triangle")
            times = TimeSampler(domain, sampler)
        if o.name == "velocity":
            return Velocity(interpolant, times)
        if o.name == "fmm":
            return FMM(interpolant, invertibility_weight=o.invertibility_weight, times=times)
        return PFMM(interpolant, teacher, initial_range=o.initial_range, stage_steps=o.stage_steps,
                    form=o.pfmm_form, band=o.pfmm_band)
    except ValueError as err:
        raise ConfigError(f"objective: {o.name}: {err}") from None
