"""Run configuration: typed sections, YAML presets shipped with the package, ``key=value`` overrides.

A run is fully described by one :class:`Config`; its resolved form is saved in every run directory and
checkpoint, so ``flowmaps train --config RUN/config.yaml`` reproduces the run. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` with a one-line message naming the key (the
type checking of each value is :mod:`flowmaps.runs.typed`, the checks of values and of their
combinations :mod:`flowmaps.runs.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .typed import ConfigError, build, parse_override, read_yaml, to_dict
from . import validation

__all__ = ["Config", "ConfigError", "load_config", "list_presets", "apply_overrides", "to_dict"]


@dataclass
class GMMSpec:
    """Gaussian-mixture target: ``means`` (K×d), ``stds`` (K or K×d) or ``covs`` (K×d×d), ``weights``."""

    means: list = field(default_factory=lambda: [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]])
    stds: list | None = None
    covs: list | None = field(default_factory=lambda: [[[0.3, 0.1], [0.1, 0.2]],
                                                       [[0.05, 0.0], [0.0, 0.4]],
                                                       [[0.1, 0.0], [0.0, 0.1]]])
    weights: list | None = field(default_factory=lambda: [0.5, 0.3, 0.2])


@dataclass
class DataConfig:
    """Dataset: a generator (``checkerboard``, ``eight_gaussians``, ``moons``, ``spirals``), ``gmm``
    (exact velocity available), ``file`` (``path`` to ``.npy``/``.csv``, any dimension), or images:
    ``digits`` (scikit-learn's bundled 8×8 digits), ``mnist`` / ``fashion_mnist`` (IDX files in
    ``path``), ``cifar10`` (the official binary version in ``path``), ``imagenet32`` (the official
    ``.npz`` files in ``path``), ``image_folder`` (PNG/JPEG in ``path``, resized to ``image_size``),
    or ``latents`` (a folder made by ``flowmaps encode`` in ``path``: a VAE's latents of one of those,
    read one shard at a time; its hold-out split is the encoder's, and ``hflip`` is ignored since the
    flipped copies were encoded). Images are scaled to [−1, 1]; ``hflip`` augments by horizontal flips; ``limit`` keeps the first N
    images; ``n_eval`` images are held out (for image data ``n_train`` is unused)."""

    name: str = "checkerboard"
    path: str | None = None
    n_train: int = 200_000
    n_eval: int = 10_000
    standardize: bool = False
    seed: int = 1234
    image_size: int | None = None
    hflip: bool = False
    limit: int | None = None
    teacher_paths: int = 4096
    teacher_steps: int = 32
    refresh_every: int = 100
    refresh_paths: int = 256
    gmm: GMMSpec = field(default_factory=GMMSpec)


@dataclass
class DecodeConfig:
    """Decoding of latents (``data.name: latents``) into images for samples, sheets and the Fréchet
    distance: ``vae`` the local diffusers AutoencoderKL folder (``null``: the one recorded in the
    latents' index, filled in when a run starts), ``batch_size`` latents decoded at a time on the
    device (bf16 autocast when ``train.precision: bf16``)."""

    vae: str | None = None
    batch_size: int = 64


@dataclass
class InterpolantConfig:
    """``linear`` or ``trigonometric``; ``sigma0``: base std, a number or ``"data"`` (per-dimension data
    std, as [C2] does for the 2-D checker)."""

    name: str = "linear"
    sigma0: float | str = 1.0


@dataclass
class ModelConfig:
    """The network ``v(x, s, t)``: ``mlp`` (vectors: ``width``, ``depth``, ``activation``, Fourier time
    features) or ``unet`` (images, spec §5.2.2: ``channels``, ``channel_mults``, ``blocks_per_level``,
    ``attention_resolutions``, ``dropout``; positional embeddings of ``s`` and ``t − s``).
    ``n_frequencies``: Fourier frequencies of the time features (mlp); ``null`` (default) lets the
    objective choose: 0 (raw times ``s``, ``t − s``) for ``lmd``, whose maps they make 1.5–2.6× more
    accurate (``benchmarks/quality_per_budget.py``), 8 for every other objective (semigradient EMD needs
    them: 0.31 against 1.15 one-step error in ``tests/test_training.py``'s problem). ``skip`` adds
    residual connections (mlp).
    ``sigma_data``: a number or ``"data"`` (the data std). ``class_conditional``: condition on the
    dataset's labels (with a null label for classifier-free guidance). ``guidance_conditioning``
    (unet, class-conditional): the network also takes the guidance scale and interval
    (:mod:`flowmaps.nets.guidance`; improved MeanFlow with ``objective.guidance_max``).

    ``dit`` (images or latents, :class:`~flowmaps.nets.dit.DiT`, spec addition E.9): ``dit_size`` S | B | L |
    XL (DiT's width, depth, heads), ``patch`` (2, 4, 8), ``dit_width``/``dit_depth``/``heads`` overriding the
    size's numbers (CPU-sized tests), ``qk_norm`` rms | layer | none, ``attention`` auto (fused SDPA unless a
    forward-mode derivative is taken) | math | sdpa, ``jvp`` exact | fd (central finite-difference JVP of
    step ``fd_eps``). ``class_conditional`` and ``guidance_conditioning`` as for the U-Net.

    ``init``: ``scratch`` (default: a new network, zero output layer) or ``teacher`` (``flowmaps distill``
    only): the student is the teacher's own network made two-time (:func:`flowmaps.two_time`), exactly
    the teacher at initialisation, ``v_{s,t} = b_s``. With ``teacher.checkpoint`` the model section is
    replaced by the teacher's (its architecture); with ``teacher.factory`` the student is the user's
    network converted by ``teacher.adapter`` plus a zero-initialised embedding of ``t − s``."""

    name: str = "mlp"
    width: int = 256
    depth: int = 4
    activation: str = "gelu"
    n_frequencies: int | None = None
    max_frequency: float = 8.0
    sigma_data: float | str = 1.0
    skip: bool = False
    channels: int = 32
    channel_mults: list = field(default_factory=lambda: [1, 2])
    blocks_per_level: int = 2
    attention_resolutions: list = field(default_factory=list)
    dropout: float = 0.0
    class_conditional: bool = False
    guidance_conditioning: bool = False
    dit_size: str = "B"
    patch: int = 2
    dit_width: int | None = None
    dit_depth: int | None = None
    heads: int | None = None
    qk_norm: str = "rms"
    attention: str = "auto"
    jvp: str = "exact"
    fd_eps: float = 3e-3
    init: str = "scratch"


@dataclass
class ObjectiveConfig:
    """Objective and its options; options that do not apply to the chosen objective are ignored, and
    ``default`` (or ``null``) leaves the objective's own default (the papers' settings).

    ``times``: ``default`` (the objective's own domain), ``triangle`` or ``square``. ``distribution``:
    the time sampler: ``uniform``, ``gap`` (jump length uniform), ``logit_normal`` (``time_mean``,
    ``time_std``) or ``dyadic`` (shortcut grid, self-distillation only).

    Self-distillation (``lsd``, ``esd``, ``psd``, ``meanflow``, ``imf``, ``alphaflow``, ``shortcut``,
    ``ct``, ``sct``; and the switches of ``lmd``/``emd``, which are its instances with a teacher): ``eta``
    diagonal fraction;
    ``diagonal`` conditional | teacher (the diagonal term's target: ``İ_t`` or the teacher's velocity);
    ``residual`` lagrangian | eulerian | progressive; ``form`` map | v; ``source`` self | ema | teacher |
    conditional (``ema_decay`` for ema); ``stopgrad`` target | source | none; ``weighting`` none |
    learned | adaptive (``adaptive_p``, ``adaptive_eps``) | tangent (``tangent_c``,
    ``tangent_warmup``); ``psd_gamma`` uniform | midpoint; ``fm_steps``/``anneal_steps`` the
    gap-annealing curriculum; ``guidance`` classifier-free guidance scale of the velocity source
    (class-conditional models), with ``guidance_kappa`` and ``guidance_interval`` (``lo,hi`` in our
    time) MeanFlow's κ and interval; ``guidance_max`` (``imf``): the largest guidance scale minus 1,
    sampled in training and fed to the network (``model.guidance_conditioning``), chosen at sampling
    time; ``diagonal_times`` own | pair (diagonal times from the start of a pair, MeanFlow's sampler);
    ``offdiag_dropout`` dropout in the off-diagonal pass.

    ``sct`` (:class:`~flowmaps.objectives.SCT`): ``target`` data (the paper: ``t ≡ 1``, only ``X_{s,1}``
    is trained; multi-step sampling needs ``gamma=1``) | any (``(s, t)`` on the triangle, no longer sCT);
    ``tangent_c`` its ``c`` and ``tangent_warmup`` its warm-up ``H``; ``time_mean``/``time_std`` the
    logit-normal of ``s`` (defaults: the paper's CIFAR-10 values for data std 0.5).

    α-Flow (``alphaflow``): the curriculum of α over steps ``alpha_start`` → ``alpha_end`` (``null``:
    ``train.steps``; a resume keeps the window the run was saved with), ``alpha_gamma`` its steepness γ,
    ``alpha_clamp`` its η (α below η is 0, above 1 − η is 1); ``target_clamp`` the clip of the
    discrete targets (``null``: none); ``weighting`` adaptive (its code) | none (its Def. 1)."""

    name: str = "velocity"
    times: str = "default"
    distribution: str = "default"
    time_mean: float | None = None
    time_std: float | None = None
    semigradient: bool = True
    emd_form: str = "semigradient"
    pfmm_form: str = "velocity"
    invertibility_weight: float = 1.0
    initial_range: float = 0.0625
    stage_steps: int = 500
    pfmm_band: str = "gap"
    eta: float | None = None
    diagonal: str = "default"
    residual: str = "default"
    form: str = "default"
    source: str = "default"
    stopgrad: str = "default"
    weighting: str = "default"
    psd_gamma: str = "default"
    ema_decay: float | None = None
    fm_steps: int = 0
    anneal_steps: int = 0
    adaptive_p: float | None = None
    adaptive_eps: float | None = None
    tangent_c: float | None = None
    tangent_warmup: int | None = None
    dyadic_levels: int | None = None
    guidance: float = 1.0
    guidance_max: float = 0.0
    guidance_kappa: float | None = None
    guidance_interval: list | None = None
    diagonal_times: str = "default"
    offdiag_dropout: bool | None = None
    target: str = "default"
    alpha_start: int = 0
    alpha_end: int | None = None
    alpha_gamma: float = 25.0
    alpha_clamp: float = 5e-3
    target_clamp: float | None = 4.0


@dataclass
class TeacherConfig:
    """Teacher velocity for distillation, exactly one of: a ``checkpoint`` made by ``flowmaps train``;
    ``exact`` (the dataset's closed-form velocity; ``gmm`` data only); or ``factory``, a function
    ``package.module:function`` of your own code (imported, never unpickled) called with ``kwargs`` that
    returns a velocity ``b(x, t)``, a module, or ``(module, scheduler)``. ``weights``: a ``.safetensors``
    state dict loaded into the returned module. ``adapter``: how the module's output becomes our velocity
    (``torchcfm``, ``flow_matching``, ``diffusers_flow``, ``diffusers_vp``; unset: it already is one). See
    :mod:`flowmaps.teachers`. ``guidance``: classifier-free guidance of a class-conditional checkpoint.
    ``noise_end`` (``auto``, ``gaussian``, ``clamp``, ``exact``) and ``tau_start``: the noise end of a
    ``diffusers_vp`` teacher (:func:`flowmaps.teachers.diffusers_vp`; ``auto``: an ε-prediction model
    is queried at ``t ≥ 0.05`` only, ``b_t := b_{0.05}`` below; ``exact`` the whole schedule).
    ``shape`` and ``num_classes``: what a ``factory`` teacher distilled without data (``data.name: none``)
    takes, the shape of one sample (e.g. ``[4, 32, 32]``) and its number of class labels (0:
    unconditional; the null label is ``num_classes``); a checkpoint records both, data gives them
    otherwise."""

    checkpoint: str | None = None
    exact: bool = False
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    adapter: str | None = None
    guidance: float = 1.0
    noise_end: str = "auto"
    tau_start: float | None = None
    shape: list | None = None
    num_classes: int = 0


@dataclass
class TrainConfig:
    """Optimisation and run options. ``batch_size`` is per process (a torchrun job of N processes
    steps on N × batch_size samples), split into ``grad_accum`` micro-batches. ``checkpoint_every``
    steps a resumable checkpoint ``checkpoints/step-K`` is written; the newest ``keep_checkpoints`` are
    kept, plus ``checkpoints/best`` (lowest validation loss). ``max_bad_steps`` consecutive non-finite
    steps stop the run. ``precision: bf16`` autocasts the network's forward passes (JVPs stay fp32
    while ``jvp_fp32``; the VAE of a latent run encodes and decodes under it too); ``tf32: true`` lets
    fp32 matmuls and convolutions outside JVPs use TF32 on CUDA (10-bit mantissa; default ``false``,
    which also turns off cuDNN's TF32, on in torch by default; no effect on the CPU; spec E.12);
    ``compile`` uses ``torch.compile`` with ``compile_backend`` (``inductor``
    generates kernels with the host's compiler; ``aot_eager`` only traces). ``device``: cpu, cuda, cuda:N, mps.
    ``lr_schedule``: ``inverse_sqrt`` (after ``lr_decay_start``), ``constant``, ``cosine`` or ``linear``
    (decay to ``lr_final`` × ``lr`` at ``steps``), after a linear warm-up of ``warmup_steps``.
    ``ema_warmup``: cap the EMA decay at ``(1 + k)/(10 + k)`` early on. ``ema_std``: also keep EDM2's
    power-function EMA profiles of these lengths σ_rel (a list, ``0.05,0.10``; each in (0, 0.2887]),
    the first of which is then the default weights of sampling, evaluation and export (``ema_decay``'s
    EMA stays available by the name ``ema``); ``ema_snapshot_every``: every that many steps (and at the
    last) save the profiles to ``RUN/ema_snapshots/`` for ``flowmaps ema`` (post-hoc lengths).
    ``betas``: the optimiser's ``β₁, β₂`` (MeanFlow's ImageNet runs: ``0.9, 0.95``).
    ``logger``: ``jsonl`` (``metrics.jsonl``, always written: the record) or ``tensorboard`` (also event
    files in ``RUN/tensorboard/`` for TensorBoard; the optional ``tensorboard`` extra)."""

    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lr_decay_start: int | None = 1000
    lr_schedule: str = "inverse_sqrt"
    warmup_steps: int = 0
    lr_final: float = 0.0
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    ema_std: list | float | None = None
    ema_snapshot_every: int | None = None
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 10
    grad_accum: int = 1
    precision: str = "fp32"
    jvp_fp32: bool = True
    tf32: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    label_dropout: float = 0.1
    device: str = "cpu"
    threads: int | None = None
    logger: str = "jsonl"


@dataclass
class EvalConfig:
    """Evaluation: flow maps at ``steps`` jumps against the teacher's ``solvers`` at equal NFE and
    dopri5 (``rtol``), on ``n_samples`` samples from the base points of ``seed``. Vectors: W2 (on
    ``w2_samples``), energy distance, KL where the density is known. Images: Fréchet distance on
    ``features`` — ``classifier`` (a small classifier trained on the dataset for ``classifier_steps``,
    offline) or ``inception`` (Inception-v3 from the local file ``inception_weights``; needs the
    ``fid`` extra) — against reference statistics in ``fid_stats`` (made by ``flowmaps fid-stats``;
    computed on the fly when unset); samples are drawn ``batch_size`` at a time.
    ``samplers`` — the teacher's fast samplers at the same step counts (``ddim``, ``dpmpp_2m``; ``[]``
    for none) on each of ``spacings`` (``auto``, ``uniform_t``, ``uniform_lambda``, and for diffusers VP
    teachers ``leading``, ``trailing``, ``linspace``); ``schedulers`` — a diffusers teacher's own
    scheduler (``own``) or a compatible class by name (``DDIMScheduler``…), run with its
    ``set_timesteps(k)`` and ``step`` on the teacher's network."""

    steps: list = field(default_factory=lambda: [1, 2, 4, 8, 16])
    n_samples: int = 10_000
    w2_samples: int = 2000
    energy_samples: int = 4000
    solvers: list = field(default_factory=lambda: ["euler", "heun", "rk4"])
    dopri5: bool = True
    rtol: float = 1e-5
    seed: int = 99
    features: str = "classifier"
    inception_weights: str | None = None
    fid_stats: str | None = None
    classifier_steps: int = 1500
    batch_size: int = 1000
    samplers: list = field(default_factory=lambda: ["ddim", "dpmpp_2m"])
    spacings: list = field(default_factory=lambda: ["auto"])
    schedulers: list = field(default_factory=lambda: ["own"])


@dataclass
class Config:
    preset: str = "checkerboard"
    data: DataConfig = field(default_factory=DataConfig)
    interpolant: InterpolantConfig = field(default_factory=InterpolantConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self) -> "Config":
        """Check the values and their combinations (:func:`flowmaps.runs.validation.validate`); returns
        the config."""
        validation.validate(self)
        return self


# --- merging, overrides (the typed reading is in .typed, the checks in .validation) --------------

def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "gmm":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in ``flowmaps/runs/presets``."""
    folder = resources.files("flowmaps.runs") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        out = _merge(out, nested)
    return out


PER_OBJECTIVE = "objectives"  # a preset's per-objective settings: {objective name: {section: {...}}}


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Preset (or the defaults) ← the preset's block for the chosen objective ← config file ←
    ``key=value`` overrides, then type-checked.

    A preset may hold, under ``objectives:``, settings that apply only when that objective is chosen
    (its paper's batch split, a budget that suits it...): ``flowmaps train --preset checkerboard
    --objective lsd`` gets the checkerboard preset with its ``lsd`` block on top.
    """
    base, by_objective = ({}, {}) if preset is None else _read_preset(preset)
    from_file = {} if config_file is None else _read_config_file(Path(config_file))

    def resolve(block: dict) -> dict:
        return apply_overrides(_merge(_merge(base, block), from_file), overrides or [])

    data = resolve({})
    name = (data.get("objective") or {}).get("name", ObjectiveConfig.name)
    if isinstance(name, str) and name in by_objective:
        data = resolve(by_objective[name])
    return build(Config, data).validate()


def _read_preset(preset: str) -> tuple[dict, dict]:
    """A shipped preset: its sections and its per-objective blocks."""
    if preset not in list_presets():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
    text = (resources.files("flowmaps.runs") / "presets" / f"{preset}.yaml").read_text()
    data = read_yaml(text, f"preset {preset}")
    data.setdefault("preset", preset)
    blocks = data.pop(PER_OBJECTIVE, None) or {}
    if not isinstance(blocks, dict) or any(not isinstance(b, dict) for b in blocks.values()):
        raise ConfigError(f"preset {preset}: '{PER_OBJECTIVE}' must map objective names to sections")
    return data, blocks


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    from_file = read_yaml(text, str(path))
    try:  # unknown keys and wrong types, reported against the file that holds them
        build(Config, from_file)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return from_file


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
