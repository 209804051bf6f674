"""The model of a run: the network its :class:`~flowmaps.runs.config.Config` describes (fresh, or warm-started
from its teacher), and the checkpoints and exported folders that save and rebuild it (:func:`load_model`,
:func:`save_model`).

A checkpoint records the resolved config, the data scales (numbers: ``"data"`` scales were resolved from
the training set by :func:`flowmaps.runs.experiment.resolve_scales`) and the standardiser, so it rebuilds
its model without the data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..checkpoint import (CheckpointError, check_model_metadata, load_checkpoint, model_folder,
                          save_checkpoint)
from ..data.points import Standardizer
from ..flowmap import FlowMap
from ..interpolants import Interpolant, make_interpolant
from ..nets.mlp import MLP
from ..teachers import TeacherError
from .config import Config, ConfigError, list_presets, load_config, to_dict
from .typed import build

__all__ = ["sample_shape", "class_labels", "time_frequencies", "build_interpolant", "build_model",
           "resolve_warm_start", "Loaded", "load_model", "save_model", "check_model_checkpoint",
           "model_metadata", "select_weights"]


def build_interpolant(cfg: Config, scales: dict) -> Interpolant:
    """The interpolant of ``interpolant.name`` with the base scale ``scales["sigma0"]`` (a number or one per
    dimension)."""
    return make_interpolant(cfg.interpolant.name, torch.tensor(scales["sigma0"]))


def sample_shape(scales: dict) -> tuple[int, ...]:
    """The shape of one sample recorded in a checkpoint's scales (older ones hold only ``dim``)."""
    return tuple(scales.get("shape") or [scales["dim"]])


def class_labels(n: int, scales: dict, device="cpu") -> torch.Tensor | None:
    """Labels ``0, 1, …, K−1, 0, 1, …`` for ``n`` samples of a class-conditional model (else None):
    class-balanced evaluation and sample sheets."""
    k = scales.get("num_classes", 0)
    return torch.arange(n, device=device) % k if k else None


def time_frequencies(cfg: Config) -> int:
    """``model.n_frequencies``, or when unset (``null``) the objective's choice: raw times for LMD, 8
    Fourier frequencies otherwise (see :class:`~flowmaps.runs.config.ModelConfig`)."""
    if cfg.model.n_frequencies is not None:
        return cfg.model.n_frequencies
    return 0 if cfg.objective.name == "lmd" else 8


def resolve_warm_start(cfg: Config) -> Config:
    """``model.init=teacher`` with ``teacher.checkpoint``: the run's model section becomes the teacher's
    (its architecture, with ``n_frequencies`` and a numeric ``sigma_data`` as the teacher resolved them,
    and ``init: teacher``), so the student's checkpoints rebuild without the teacher. Idempotent; other
    configs are returned unchanged."""
    if cfg.model.init != "teacher" or not cfg.teacher.checkpoint:
        return cfg
    try:
        _, meta = load_checkpoint(cfg.teacher.checkpoint, check=check_model_checkpoint)
        teacher_cfg = build(Config, meta["config"])
    except (CheckpointError, KeyError, ConfigError) as err:
        raise ConfigError(f"teacher.checkpoint: {' '.join(str(err).split())}") from None
    model = copy.deepcopy(teacher_cfg.model)
    model.init = "teacher"
    model.n_frequencies = time_frequencies(teacher_cfg)
    sigma_data = meta.get("scales", {}).get("sigma_data")
    if isinstance(sigma_data, (int, float)):
        model.sigma_data = float(sigma_data)
    out = copy.deepcopy(cfg)
    out.model = model
    return out


def build_model(cfg: Config, scales: dict, teacher=None) -> FlowMap:
    """The network ``cfg.model`` describes, in a :class:`FlowMap`. With ``model.init=teacher`` the
    student made from the teacher's network (:func:`~flowmaps.teachers.two_time`); ``teacher`` is the
    teacher built by :func:`~flowmaps.runs.experiment.build_teacher` (the weights to copy), ``None`` when
    a checkpoint's weights are loaded next (then a factory student is rebuilt from ``teacher.factory``
    without its weights)."""
    m = cfg.model
    if m.init == "teacher":
        return _warm_student(cfg, scales, teacher)
    return _fresh_model(cfg, scales)


def _warm_student(cfg: Config, scales: dict, teacher) -> FlowMap:
    from ..teachers.warm_start import FactoryStudent, WarmStartError, two_time

    t = cfg.teacher
    if t.factory:
        sigma0 = torch.as_tensor(scales["sigma0"], dtype=torch.float64).reshape(-1)
        try:
            net = FactoryStudent(t.factory, kwargs=dict(t.kwargs), adapter=t.adapter, sigma0=float(sigma0[0]),
                                 sample_shape=list(sample_shape(scales)))
            if teacher is not None:
                net.copy_teacher(teacher)
        except TeacherError as err:
            raise ConfigError(f"teacher.{err.key}: {err}") from None
        except WarmStartError as err:
            raise ConfigError(f"model.init: {err}") from None
        return FlowMap(net, jvp_fp32=cfg.train.jvp_fp32)
    model = _fresh_model(cfg, scales)
    if teacher is not None:
        if not isinstance(teacher, FlowMap):
            raise ConfigError("model.init: teacher needs the teacher's network; this teacher is "
                              f"{type(teacher).__name__}")
        warm = two_time(teacher)
        try:
            model.net.load_state_dict(warm.state_dict())
        except RuntimeError:
            raise ConfigError("model.init: teacher: the teacher's network does not match the model section "
                              "resolved from its checkpoint") from None
    return model


def _fresh_model(cfg: Config, scales: dict) -> FlowMap:
    m = cfg.model
    if m.name == "unet":
        from ..nets.unet import UNet

        shape = sample_shape(scales)
        if len(shape) != 3:
            raise ConfigError(f"model.name: unet needs images (C, H, W); samples have shape {shape}")
        net = UNet(shape, channels=m.channels, channel_mults=tuple(m.channel_mults),
                   blocks_per_level=m.blocks_per_level,
                   attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout,
                   num_classes=scales.get("num_classes", 0), sigma_data=float(scales["sigma_data"]),
                   guidance_conditioning=m.guidance_conditioning)
        return FlowMap(net, jvp_fp32=cfg.train.jvp_fp32)
    if m.name == "dit":
        return FlowMap(_build_dit(cfg, scales), jvp_fp32=cfg.train.jvp_fp32)
    net = MLP(scales["dim"], width=m.width, depth=m.depth, activation=m.activation,
              sigma_data=torch.tensor(scales["sigma_data"]), n_frequencies=time_frequencies(cfg),
              max_frequency=m.max_frequency, skip=m.skip)
    return FlowMap(net, jvp_fp32=cfg.train.jvp_fp32)


def _build_dit(cfg: Config, scales: dict):
    """The :class:`~flowmaps.nets.dit.DiT` of ``model.dit_size``/``model.patch`` with the width, depth and
    heads overrides; a bad combination (image size not divisible by the patch, heads not dividing the
    width) is a one-line :class:`ConfigError`."""
    from ..nets.dit import DIT_SIZES, DiT

    m = cfg.model
    shape = sample_shape(scales)
    if len(shape) != 3:
        raise ConfigError(f"model.name: dit needs images (C, H, W); samples have shape {shape}")
    width, depth, heads = DIT_SIZES[m.dit_size]
    width = m.dit_width or width
    depth = m.dit_depth or depth
    heads = m.heads or heads
    try:
        return DiT(shape, patch=m.patch, width=width, depth=depth, heads=heads,
                   num_classes=scales.get("num_classes", 0), qk_norm=m.qk_norm,
                   sigma_data=float(scales["sigma_data"]),
                   guidance_conditioning=m.guidance_conditioning, attention=m.attention, jvp=m.jvp,
                   fd_eps=m.fd_eps)
    except ValueError as err:
        raise ConfigError(f"model (dit {m.dit_size}/{m.patch}, width {width}, depth {depth}, heads "
                          f"{heads}): {err}") from None


# --- checkpoints of trained models -----------------------------------------------------------------

@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with everything needed to sample it in data units."""

    model: FlowMap
    interpolant: Interpolant
    config: Config
    scales: dict
    standardizer: Standardizer | None
    metadata: dict
    weights: str = "model"  # which weights: model (raw), ema (classic), or a power profile's name
    decoder: Callable[[Tensor], Tensor] | None = None  # latents -> images (runs.latents.latent_codec)
    # Where ``config`` comes from: "checkpoint" (a run's checkpoint), "export" (an export's recorded run
    # config), "preset" (an older export: rebuilt from its preset, objective and data name), or None
    # (an export made by FlowMap.save_pretrained: nothing recorded; ``config`` is a placeholder).
    config_source: str | None = "checkpoint"
    path: str = ""

    def to_data_units(self, x: Tensor) -> Tensor:
        """Model space to data units: un-standardised, and decoded when a decoder is set."""
        x = self.standardizer.inverse(x) if self.standardizer is not None else x
        return self.decoder(x) if self.decoder is not None else x


def model_metadata(cfg: Config, scales: dict, standardizer: Standardizer | None, step: int,
                   domain: str | None) -> dict:
    """The metadata that rebuilds a run's model from a checkpoint (config, step, objective, training
    domain, interpolant, scales, standardiser)."""
    return {"config": to_dict(cfg), "step": step, "objective": cfg.objective.name, "domain": domain,
            "interpolant": {"name": cfg.interpolant.name, "sigma0": scales["sigma0"]},
            "scales": scales, "standardizer": standardizer.to_dict() if standardizer else None}


def save_model(stem: str | Path, model: FlowMap, ema: FlowMap | None, cfg: Config, scales: dict,
               standardizer: Standardizer | None, step: int, extra: dict | None = None,
               trainer_state: tuple[dict, dict] | None = None) -> Path:
    """Write a checkpoint: weights (and EMA), the resolved config and data scales; with
    ``trainer_state = Trainer.state_dict()`` also everything needed to resume training exactly (then
    the power-function EMA profiles too, whose ``ema_profiles``/``ema_default`` the caller passes in
    ``extra``: :meth:`~flowmaps.train.trainer.Trainer.ema_metadata`)."""
    tensors = {"model": model.state_dict()}
    if ema is not None:
        tensors["ema"] = ema.state_dict()
    if trainer_state is not None:
        tensors = {group: state for group, state in trainer_state[0].items() if state}
    meta = model_metadata(cfg, scales, standardizer, step, getattr(model, "domain", None))
    if trainer_state is not None:
        meta["trainer"] = trainer_state[1]
    meta.update(extra or {})
    return save_checkpoint(stem, tensors, meta)


def select_weights(groups: dict, meta: dict, use_ema: bool | str = True, where="checkpoint"
                   ) -> tuple[str, str]:
    """Which weight group of a checkpoint to load: ``(group, name)``.

    ``use_ema=False``: the raw weights (``model``). ``True``: the checkpoint's default average — its
    ``ema_default`` (the first power-function profile of a run with ``train.ema_std``, or a post-hoc
    reconstruction), else the classic ``ema``, else the raw weights (older checkpoints have no
    ``ema_default``). A string names an average: ``"ema"`` (the classic EMA) or a power profile by name
    or length (``"std0.050"``, ``"std0.05"``, ``"0.05"``). An unknown name is a one-line
    :class:`CheckpointError` listing the averages the checkpoint holds."""
    from ..train.power_ema import parse_std

    profiles = meta.get("ema_profiles") or []
    names = (["ema"] if "ema" in groups else []) + [p.get("name") for p in profiles]
    if use_ema is False:
        if "model" not in groups:
            raise CheckpointError(f"{where}: holds no raw weights (averaged weights only: "
                                  f"{', '.join(names) or 'none'})")
        return "model", "model"
    if use_ema is True:
        default = meta.get("ema_default")
        if default is not None:
            use_ema = default
        elif "ema" in groups:
            return "ema", "ema"
        else:
            return "model", "model"
    if use_ema == "ema" and "ema" in groups:
        return "ema", "ema"
    wanted = parse_std(use_ema)
    for p in profiles:
        if p.get("name") == use_ema or (wanted is not None and isinstance(p.get("std"), (int, float))
                                        and abs(p["std"] - wanted) <= 1e-9 * max(1.0, wanted)):
            if p.get("group") not in groups:
                break
            return p["group"], p["name"]
    raise CheckpointError(f"{where}: no averaged weights named {use_ema!r}; it holds "
                          f"{', '.join(names) or 'none'}")


def _check_config(where: Path, config: dict) -> None:
    try:
        build(Config, config).validate()
    except ConfigError as err:
        raise CheckpointError(f"{where}: invalid config ({err})") from None


def check_model_checkpoint(where: Path, meta: dict) -> None:
    """The schema check of a run's model checkpoint: the format-1 schema of
    :func:`~flowmaps.checkpoint.check_model_metadata` with its config validated as a :class:`Config`."""
    check_model_metadata(where, meta, check_config=_check_config)


def load_model(path: str | Path, use_ema: bool | str = True, device="cpu") -> Loaded:
    """Rebuild the FlowMap of a checkpoint or run directory (its default averaged weights when present
    and ``use_ema``; a name such as ``"std0.100"`` or ``"ema"`` picks one, see :func:`select_weights`),
    with its config, scales and standardiser; ``.model`` carries its interpolant, sample shape,
    number of classes and standardiser (``.model.to_data_units``), as :func:`flowmaps.load` returns
    it. ``.weights`` names the weights loaded (``model``, ``ema``, ``std0.050``…)."""
    folder = model_folder(path)
    if folder is not None:
        return _load_export(folder, use_ema, device)
    groups, meta = load_checkpoint(path, check=check_model_checkpoint)
    try:
        cfg = build(Config, meta["config"])
        scales = meta["scales"]
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{path}: metadata is incomplete or from an incompatible version "
                              f"({err})") from None
    model = build_model(cfg, scales)
    group, weights = select_weights(groups, meta, use_ema, where=str(path))
    state = groups[group]
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not match the architecture in its metadata") from None
    model.to(device).eval()
    model.domain = meta.get("domain")  # where (s, t) was trained: inverse() refuses untrained directions
    std = Standardizer.from_dict(meta["standardizer"]) if meta.get("standardizer") else None
    interpolant = build_interpolant(cfg, scales)
    # what sampling needs travels with the map (as FlowMap.from_pretrained sets it)
    model.interpolant, model.standardizer = interpolant, std
    model.sample_shape, model.num_classes = sample_shape(scales), scales.get("num_classes", 0)
    return Loaded(model, interpolant, cfg, scales, std, meta, weights, path=str(path))


def _load_export(folder: Path, use_ema: bool | str, device) -> Loaded:
    """An exported folder (``flowmaps export`` / :meth:`FlowMap.save_pretrained`) as a :class:`Loaded`,
    so every command takes it where it takes a run. The map, interpolant, scales and standardiser are the
    export's own. The config: the run's, recorded by ``flowmaps export`` (``run_config``); for an older
    export the preset, objective and data name it records (``trained``); for a bare
    ``save_pretrained`` folder a placeholder (``config_source=None``: what needs the data or the teacher
    says so in one line). One set of weights is exported: ``use_ema=False`` is refused for an export of
    the EMA weights."""
    import json

    model = FlowMap.from_pretrained(folder, device=device)
    where = folder / "config.json"
    meta = json.loads(where.read_text(encoding="utf-8"))
    if use_ema is False and meta.get("weights") == "ema":
        raise CheckpointError(f"{folder}: holds the EMA weights only (exported without --raw-weights); "
                              "--raw-weights needs the run or a raw-weights export")
    trained = meta.get("trained") if isinstance(meta.get("trained"), dict) else {}
    cfg, source = None, None
    if isinstance(meta.get("run_config"), dict):
        try:
            cfg, source = build(Config, meta["run_config"]).validate(), "export"
        except ConfigError as err:
            raise CheckpointError(f"{where}: invalid run_config ({err})") from None
    elif trained.get("preset") in list_presets():
        over = [f"objective.name={trained.get('objective') or 'lmd'}"]
        if trained.get("data") and trained["data"] != "none":
            over.append(f"data.name={trained['data']}")
        try:
            cfg, source = load_config(trained["preset"], None, over), "preset"
        except ConfigError:
            cfg = None
    if cfg is None:  # nothing recorded: a flow map of the export's shape; data and teacher unknown
        cfg = Config()
        cfg.objective.name = trained.get("objective") or "lmd"
        cfg.preset = "export"
    spec = meta["interpolant"]
    cfg.interpolant.name = spec["name"]
    scales = dict(meta["scales"])
    step = trained.get("step", 0) if isinstance(trained.get("step", 0), int) else 0
    metadata = {"step": step, "groups": [meta.get("weights", "model")], "domain": model.domain,
                "objective": cfg.objective.name, "export": str(folder)}
    return Loaded(model, model.interpolant, cfg, scales, model.standardizer, metadata,
                  weights=meta.get("weights", "model"), config_source=source, path=str(folder))
