"""Runs in a VAE's latent space: :func:`encode_dataset` (``flowmaps encode``: the data section of an
image config encoded into a latents folder), :func:`latent_codec` (the VAE that decodes a run's samples,
checked against the one that encoded its data) and :func:`reference_bundle` (the source images the
Fréchet distance of decoded samples is measured against). Formats and conventions:
:mod:`flowmaps.data.latents`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from ..data.latents import LatentDataError, VAECodec, load_vae, vae_summary, write_latents
from . import experiment as ex
from .config import Config, ConfigError, to_dict
from .typed import build

__all__ = ["encode_dataset", "latent_codec", "reference_bundle", "source_config", "decode_paths"]


def encode_dataset(cfg: Config, vae_dir: str | Path, out: str | Path, *, device="cpu",
                   batch_size: int = 64, dtype: str = "float16", posterior: str = "mean",
                   seed: int = 0, shard_size: int = 10_000, precision: str = "fp32",
                   progress: bool = True) -> dict:
    """Encode the images ``cfg.data`` describes (any image dataset, with its ``limit``,
    ``image_size`` and hold-out split ``n_eval``/``seed``, exactly as a pixel run splits them) with
    the VAE in ``vae_dir`` into the new folder ``out``; the training part gets flipped copies when
    ``data.hflip``. Everything is checked before ``out`` is created, and a failure while writing
    removes the partial ``out`` (it did not exist before). Returns the index."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out}: already exists; latents are never overwritten (choose a new "
                          "folder)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: its parent folder {out.parent} does not exist")
    if cfg.data.name not in ex.IMAGE_DATASETS:
        raise ConfigError(f"data.name: encode needs an image dataset "
                          f"({', '.join(ex.IMAGE_DATASETS)}); {cfg.data.name!r} is not one")
    vae = load_vae(vae_dir, device)
    info = vae_summary(vae, vae_dir)
    bundle = ex.build_data(cfg)
    codec = VAECodec(vae, info, bundle.sample_shape[0], device, batch_size, precision)
    codec.check_size(bundle.sample_shape, f"{cfg.data.name} images")
    data = to_dict(cfg.data)
    if data.get("path"):
        data["path"] = str(Path(data["path"]).resolve())
    meta = {"source": {"preset": cfg.preset, "data": data}}
    try:
        index = write_latents(out, codec, bundle.train, bundle.labels, bundle.num_classes,
                              bundle.held_out, bundle.held_out_labels, dtype=dtype, hflip=cfg.data.hflip,
                              posterior=posterior, seed=seed, shard_size=shard_size, meta=meta,
                              progress=progress)
    except BaseException:
        if out.is_dir():
            shutil.rmtree(out)
        raise
    if progress:
        print(f"wrote {index['count']} latents {tuple(index['shape'])} ({dtype}, "
              f"{len(index['shards'])} shard(s)) and {index['held_out']['count'] if index['held_out'] else 0}"
              f" held out to {out}", file=sys.stderr)
    return index


def source_config(cfg: Config, index: dict) -> Config:
    """``cfg`` with its data section replaced by the one the latents were encoded from."""
    data = dict(index["source"]["data"])
    try:
        source = build(type(cfg), {"data": data})
    except ConfigError as err:
        raise ConfigError(f"{index['folder']}: its source data section is invalid ({err})") from None
    out = build(type(cfg), to_dict(cfg))
    out.data = source.data
    return out


def reference_bundle(cfg: Config, bundle: ex.DataBundle) -> ex.DataBundle:
    """The images the quality of samples is measured against: ``bundle`` itself for image data; for
    latents the source images, re-read and split as they were when encoded (the feature classifier
    trains on them and the reference statistics are theirs, so the Fréchet distance of decoded
    samples is against the real images, as FID is)."""
    if bundle.latents is None:
        return bundle
    images = ex.build_data(source_config(cfg, bundle.latents))
    if list(images.sample_shape) != list(bundle.latents["image_shape"]):
        raise ConfigError(f"{bundle.latents['folder']}: the source images now have shape "
                          f"{list(images.sample_shape)}, they were {bundle.latents['image_shape']} when "
                          "encoded")
    return images


def latent_codec(cfg: Config, scales: dict, device="cpu", vae: str | None = None,
                 batch_size: int | None = None) -> VAECodec:
    """The VAE that decodes a latent run's samples: ``vae`` or the config's ``decode.vae``, on
    ``device``, ``decode.batch_size`` at a time (bf16 autocast with ``train.precision: bf16``). Its
    config must hash as the encoder's did (recorded in ``scales["latents"]``): the same architecture,
    scale and shift (the weights themselves are not compared)."""
    recorded = scales.get("latents")
    if not recorded:
        raise ConfigError("decode: this model was not trained on latents (data.name: latents)")
    folder = vae or cfg.decode.vae
    if not folder:
        raise ConfigError("decode.vae: unset; give the VAE folder the latents were encoded with "
                          "(decode.vae=DIR, or --vae DIR)")
    model = load_vae(folder, device)
    info = vae_summary(model, folder)
    if info["config_sha256"] != recorded["config_sha256"]:
        raise ConfigError(f"decode.vae {folder}: its config differs from the VAE the latents were "
                          f"encoded with (config sha256 {info['config_sha256'][:12]} against "
                          f"{recorded['config_sha256'][:12]})")
    try:
        return VAECodec(model, info, int(recorded["image_shape"][0]), device,
                        batch_size or cfg.decode.batch_size, cfg.train.precision)
    except LatentDataError as err:
        raise ConfigError(f"decode.vae {folder}: {err}") from None


def decode_paths(decoder, paths: dict[str, torch.Tensor], n: int = 8) -> dict[str, torch.Tensor]:
    """Trajectories ``(T, N, C, h, w)`` of latents decoded to images ``(T, n, C', H, W)``, the first
    ``n`` samples of each."""
    out = {}
    for name, path in paths.items():
        p = path[:, :n]
        images = decoder(p.reshape(-1, *p.shape[2:]))
        out[name] = images.reshape(p.shape[0], p.shape[1], *images.shape[1:])
    return out
