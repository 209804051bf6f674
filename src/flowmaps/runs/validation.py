"""The checks of a run's :class:`~flowmaps.runs.config.Config` beyond the types of its values
(:mod:`flowmaps.runs.typed`): the choices of each named option (:data:`CHOICES`), the keys that must be
positive (:data:`POSITIVE`), ranges, and the combinations of keys that cannot work together, each a
one-line :class:`~flowmaps.runs.typed.ConfigError` naming the key.

:meth:`flowmaps.runs.config.Config.validate` runs :func:`validate`. This module does not import
:mod:`flowmaps.runs.config` (the config arrives as the argument), so that the config can import it.
"""

from __future__ import annotations

import re

from ..teachers.adapters import ADAPTERS, NOISE_ENDS
from ..teachers.samplers import SAMPLERS, SPACINGS
from ..teachers.factory import FACTORY_PATTERN
from .typed import ConfigError, to_dict

__all__ = ["validate", "CHOICES", "POSITIVE", "SELF_DISTILLATION"]


# Objectives that train a flow map from data alone through its own diagonal (self-distillation).
SELF_DISTILLATION = ("lsd", "esd", "psd", "meanflow", "shortcut", "ct", "imf", "alphaflow", "sct")

CHOICES = {
    "data.name": ("checkerboard", "eight_gaussians", "moons", "spirals", "gmm", "file", "digits",
                  "mnist", "fashion_mnist", "cifar10", "imagenet32", "image_folder", "latents",
                  "none"),
    "model.name": ("mlp", "unet", "dit"),
    "model.dit_size": ("S", "B", "L", "XL"),
    "model.qk_norm": ("rms", "layer", "none"),
    "model.attention": ("auto", "math", "sdpa"),
    "model.jvp": ("exact", "fd"),
    "model.init": ("scratch", "teacher"),
    "eval.features": ("classifier", "inception"),
    "interpolant.name": ("linear", "trigonometric"),
    "model.activation": ("gelu", "silu", "tanh", "softplus"),
    "objective.name": ("velocity", "fmm", "lmd", "emd", "pfmm") + SELF_DISTILLATION,
    "objective.times": ("default", "triangle", "square"),
    "objective.distribution": ("default", "uniform", "gap", "logit_normal", "dyadic"),
    "objective.residual": ("default", "lagrangian", "eulerian", "progressive"),
    "objective.diagonal": ("default", "conditional", "teacher"),
    "objective.diagonal_times": ("default", "own", "pair"),
    "objective.target": ("default", "data", "any"),
    "objective.form": ("default", "map", "v"),
    "objective.source": ("default", "self", "ema", "teacher", "conditional"),
    "objective.stopgrad": ("default", "target", "source", "none"),
    "objective.weighting": ("default", "none", "learned", "adaptive", "tangent"),
    "objective.psd_gamma": ("default", "uniform", "midpoint"),
    "objective.emd_form": ("semigradient", "full", "v"),
    "objective.pfmm_form": ("velocity", "map"),
    "objective.pfmm_band": ("clip", "gap"),
    "train.optimizer": ("adam", "adamw", "radam"),
    "train.lr_schedule": ("inverse_sqrt", "constant", "cosine", "linear"),
    "train.precision": ("fp32", "bf16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.logger": ("jsonl", "tensorboard"),
}
POSITIVE = ("data.n_train", "data.n_eval", "model.width", "model.depth",
            "model.max_frequency", "train.steps", "train.batch_size", "train.lr", "train.log_every",
            "train.checkpoint_every", "eval.n_samples", "eval.w2_samples", "eval.energy_samples",
            "eval.rtol", "objective.stage_steps", "train.grad_clip", "train.lr_decay_start",
            "train.threads", "train.keep_checkpoints", "train.max_bad_steps", "train.grad_accum",
            "train.ema_snapshot_every",
            "model.channels", "model.blocks_per_level", "data.image_size", "data.limit",
            "eval.batch_size", "eval.classifier_steps", "objective.time_std", "objective.adaptive_eps",
            "objective.tangent_c", "objective.dyadic_levels", "objective.alpha_gamma",
            "objective.target_clamp", "decode.batch_size", "model.patch", "model.dit_width",
            "model.dit_depth", "model.heads", "model.fd_eps", "data.teacher_paths", "data.teacher_steps",
            "data.refresh_paths")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?)\Z")


def validate(cfg) -> None:
    """Check ``cfg`` (a :class:`~flowmaps.runs.config.Config`, already type-checked) beyond types: choices,
    ranges and the combinations of keys that cannot work together; the first problem raises a one-line
    :class:`~flowmaps.runs.typed.ConfigError` naming the key. Normalises ``train.ema_std`` to a list."""
    flat = _flatten(to_dict(cfg))
    for key, options in CHOICES.items():
        if flat[key] not in options:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(options)}")
    for key in POSITIVE:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    if not _NAME.match(cfg.preset):
        raise ConfigError(f"preset: {cfg.preset!r} is not a plain name (letters, digits, '_', '-', '.'); "
                          "it names run directories")
    if not _DEVICE.match(cfg.train.device):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not a device; use cpu, cuda, cuda:N "
                          "or mps")
    for key in ("model.n_frequencies", "train.warmup_steps", "data.refresh_every"):
        if flat[key] is not None and flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    if not 0 <= cfg.train.lr_final <= 1:
        raise ConfigError(f"train.lr_final: a fraction of train.lr in [0, 1], got {cfg.train.lr_final}")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must be >= 0, got {cfg.train.weight_decay!r}")
    for key in ("interpolant.sigma0", "model.sigma_data"):
        v = flat[key]
        if isinstance(v, str) and v != "data" or not isinstance(v, str) and not v > 0:
            raise ConfigError(f"{key}: must be a positive number or 'data', got {v!r}")
    if cfg.train.ema_decay is not None and not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    _validate_ema_std(cfg.train)
    if not 0 < cfg.objective.initial_range <= 1:
        raise ConfigError("objective.initial_range: must be in (0, 1]")
    o = cfg.objective
    if o.eta is not None and not 0 <= o.eta < 1:
        raise ConfigError(f"objective.eta: the diagonal fraction must be in [0, 1), got {o.eta}")
    if o.ema_decay is not None and not 0 <= o.ema_decay < 1:
        raise ConfigError(f"objective.ema_decay: must be in [0, 1), got {o.ema_decay}")
    for key in ("fm_steps", "anneal_steps", "tangent_warmup", "adaptive_p", "alpha_start"):
        value = getattr(o, key)
        if value is not None and value < 0:
            raise ConfigError(f"objective.{key}: must be >= 0, got {value}")
    if o.guidance_max < 0 or o.guidance < 1 and o.name == "imf":
        raise ConfigError("objective.guidance_max: must be >= 0 (and objective.guidance >= 1 for imf)")
    if o.guidance_max > 0 and o.name != "imf":
        raise ConfigError("objective.guidance_max: applies to imf (improved MeanFlow) only")
    if o.guidance_max > 0 and not (cfg.model.guidance_conditioning and cfg.model.class_conditional):
        raise ConfigError("objective.guidance_max: the sampled guidance scale is fed to the network; "
                          "set model.class_conditional=true and model.guidance_conditioning=true")
    if cfg.model.init == "teacher":
        t = cfg.teacher
        if t.exact or not (t.checkpoint or t.factory):
            raise ConfigError("model.init: teacher copies the teacher's network; it needs "
                              "teacher.checkpoint=RUN or teacher.factory=package.module:function "
                              "(flowmaps distill)" + (", not teacher.exact (no network)" if t.exact else ""))
        if t.guidance != 1.0:
            raise ConfigError("model.init: teacher copies the unguided network, so it cannot equal a guided "
                              "teacher (teacher.guidance != 1); use model.init=scratch")
    if cfg.model.guidance_conditioning and not (cfg.model.name in ("unet", "dit")
                                                and cfg.model.class_conditional):
        raise ConfigError("model.guidance_conditioning: needs model.name=unet or dit and "
                          "model.class_conditional=true")
    if cfg.model.name == "dit" and cfg.model.dropout:
        raise ConfigError(f"model.dropout: the DiT has no dropout (as in DiT and MeanFlow's ImageNet "
                          f"runs); got {cfg.model.dropout}")
    if o.alpha_end is not None and o.alpha_end < o.alpha_start:
        raise ConfigError(f"objective.alpha_end: must be >= objective.alpha_start ({o.alpha_start}), "
                          f"got {o.alpha_end}")
    if not 0 <= o.alpha_clamp < 0.5:
        raise ConfigError(f"objective.alpha_clamp: must be in [0, 0.5), got {o.alpha_clamp}")
    if cfg.objective.invertibility_weight < 0:
        raise ConfigError("objective.invertibility_weight: must be >= 0")
    if not cfg.eval.steps or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                                 for k in cfg.eval.steps):
        raise ConfigError(f"eval.steps: must be a list of positive integers, got {cfg.eval.steps}")
    bad = [s for s in cfg.eval.solvers if s not in ("euler", "heun", "rk4")]
    if bad:
        raise ConfigError(f"eval.solvers: unknown solver(s) {bad}; choose from euler, heun, rk4")
    _validate_fast_samplers(cfg.eval)
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    if not 0 <= cfg.train.label_dropout < 1:
        raise ConfigError(f"train.label_dropout: must be in [0, 1), got {cfg.train.label_dropout}")
    for key in ("model.channel_mults", "model.attention_resolutions"):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in flat[key]) or (
                key == "model.channel_mults" and not flat[key]):
            raise ConfigError(f"{key}: must be a list of positive integers, got {flat[key]}")
    betas = cfg.train.betas
    if len(betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                              for b in betas):
        raise ConfigError(f"train.betas: two numbers in [0, 1), got {betas}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} does not divide train.batch_size "
                          f"{cfg.train.batch_size}")
    if cfg.data.name == "file" and not cfg.data.path:
        raise ConfigError("data.path: required when data.name is 'file'")
    if cfg.data.name == "latents" and not cfg.data.path:
        raise ConfigError("data.path: required when data.name is 'latents' (a folder made by "
                          "`flowmaps encode`)")
    if cfg.data.name == "none":
        _validate_data_free(cfg)
    elif cfg.teacher.shape is not None or cfg.teacher.num_classes:
        raise ConfigError("teacher.shape, teacher.num_classes: apply without data (data.name: none); "
                          "the data gives them otherwise")
    _validate_teacher(cfg.teacher)


def _validate_ema_std(t) -> None:
    """``train.ema_std``: one σ_rel or a list of distinct ones in (0, 12^{-1/2}] (normalised to a list);
    ``train.ema_snapshot_every`` needs it."""
    from ..train.power_ema import STD_MAX, profile_name

    if isinstance(t.ema_std, float):
        t.ema_std = [t.ema_std]
    if t.ema_std is None:
        if t.ema_snapshot_every is not None:
            raise ConfigError("train.ema_snapshot_every: snapshots are of the power-function EMA "
                              "profiles; set train.ema_std too (e.g. train.ema_std=0.05,0.10)")
        return
    values = t.ema_std
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= STD_MAX
                         for v in values):
        raise ConfigError(f"train.ema_std: a list of relative standard deviations in (0, {STD_MAX:.4f}] "
                          f"(e.g. 0.05,0.10), got {values!r}")
    t.ema_std = [float(v) for v in values]
    names = [profile_name(v) for v in t.ema_std]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.ema_std: the lengths must differ, got {values!r}")


def _validate_fast_samplers(e) -> None:
    for key, allowed in (("samplers", SAMPLERS), ("spacings", ("auto",) + SPACINGS)):
        values = getattr(e, key)
        bad = [v for v in values if v not in allowed] if isinstance(values, list) else [values]
        if bad:
            raise ConfigError(f"eval.{key}: unknown {bad}; choose from {', '.join(allowed)}")
    if not e.spacings:
        raise ConfigError("eval.spacings: needs at least one spacing (auto by default)")
    if not isinstance(e.schedulers, list) or any(
            not isinstance(v, str) or not re.match(r"[A-Za-z_]\w*\Z", v) for v in e.schedulers):
        raise ConfigError(f"eval.schedulers: 'own' or diffusers scheduler class names, got {e.schedulers}")


def _validate_data_free(cfg) -> None:
    """``data.name=none`` (spec E.8): what training without a dataset cannot do, one line each."""
    o, t = cfg.objective, cfg.teacher
    if o.name in ("velocity", "fmm") or (o.name in SELF_DISTILLATION and o.source != "teacher"):
        raise ConfigError(f"data.name: none trains from a teacher's ODE paths, but {o.name} learns from "
                          "data (use `flowmaps distill` with lmd or emd, or objective.source=teacher)")
    if o.name == "pfmm":
        raise ConfigError("data.name: none: pfmm trains at the data's interpolant points; use lmd or emd")
    if t.factory is not None:
        if not t.shape:
            raise ConfigError("teacher.shape: data.name: none with teacher.factory needs the shape of one "
                              "sample, e.g. teacher.shape=[4,32,32]")
        if not isinstance(cfg.interpolant.sigma0, (int, float)) or isinstance(cfg.interpolant.sigma0, bool):
            raise ConfigError("interpolant.sigma0: without data the base scale of a teacher.factory model "
                              f"is a number, got {cfg.interpolant.sigma0!r}")
        if cfg.model.class_conditional and not t.num_classes:
            raise ConfigError("model.class_conditional: the teacher takes no labels; set "
                              "teacher.num_classes to the number of classes it was trained on")
    if cfg.data.standardize:
        raise ConfigError("data.standardize: without data the model space is the teacher's (its "
                          "standardiser, if any, is kept); drop data.standardize")
    if cfg.model.class_conditional and t.exact:
        raise ConfigError("model.class_conditional: the exact mixture teacher takes no labels")


def _validate_teacher(t) -> None:
    if t.factory is not None and not FACTORY_PATTERN.match(t.factory):
        raise ConfigError(f"teacher.factory: {t.factory!r} is not of the form package.module:function")
    if t.factory is None:
        for key in ("weights", "adapter"):
            if getattr(t, key) is not None:
                raise ConfigError(f"teacher.{key}: applies to teacher.factory=package.module:function only")
        if t.kwargs:
            raise ConfigError("teacher.kwargs: applies to teacher.factory=package.module:function only")
    if t.adapter is not None and t.adapter not in ADAPTERS:
        raise ConfigError(f"teacher.adapter: {t.adapter!r} is not one of {', '.join(ADAPTERS)}")
    if t.noise_end not in ("auto",) + NOISE_ENDS:
        raise ConfigError(f"teacher.noise_end: {t.noise_end!r} is not one of auto, {', '.join(NOISE_ENDS)}")
    if (t.noise_end != "auto" or t.tau_start is not None) and t.adapter != "diffusers_vp":
        raise ConfigError("teacher.noise_end, teacher.tau_start: apply to teacher.adapter=diffusers_vp only")
    if t.tau_start is not None and (isinstance(t.tau_start, bool) or not isinstance(t.tau_start, (int, float))
                                    or not 0 <= t.tau_start < 1):
        raise ConfigError(f"teacher.tau_start: a time in [0, 1), got {t.tau_start!r}")
    if (t.shape is not None or t.num_classes) and t.factory is None:
        raise ConfigError("teacher.shape, teacher.num_classes: apply to teacher.factory without data "
                          "(data.name: none); a checkpoint records its own")
    if t.shape is not None and (not isinstance(t.shape, list) or not t.shape or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in t.shape)):
        raise ConfigError(f"teacher.shape: a list of positive integers (one sample's shape), got {t.shape!r}")
    if isinstance(t.num_classes, bool) or not isinstance(t.num_classes, int) or t.num_classes < 0:
        raise ConfigError(f"teacher.num_classes: a number of classes >= 0, got {t.num_classes!r}")
    if any(not isinstance(k, str) for k in t.kwargs):
        raise ConfigError(f"teacher.kwargs: keys must be names, got {sorted(map(repr, t.kwargs))}")


def _flatten(d: dict, prefix: str = "") -> dict:
    """A config's mapping (:func:`~flowmaps.runs.typed.to_dict`) by dotted keys, ``{"train.lr": ...}``;
    a GMM spec stays one value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "gmm":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
