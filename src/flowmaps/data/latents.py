"""Images in a VAE's latent space: a diffusers ``AutoencoderKL`` loaded from a local folder
(:func:`load_vae`, :class:`VAECodec`), latents written as float16/bfloat16 safetensors shards with a JSON
index (:func:`write_latents`), and read back lazily (:class:`LatentShards`, :func:`read_index`).

Conventions (spec additions E.11):

* A latent is ``z = (m − shift) · scale`` where ``m`` is the posterior mean of the VAE's encoder (or one
  seeded posterior sample, ``posterior="sample"``), ``scale``/``shift`` the ``scaling_factor`` and
  ``shift_factor`` of the VAE's config (a missing shift is 0). Decoding inverts it:
  ``x = vae.decode(z / scale + shift)``.
* The VAE sees images in ``[−1, 1]`` with its ``in_channels``: grey images are repeated to 3 channels
  (and the decoded RGB averaged back to grey), so encoded and decoded images have the source's shape.
  Height and width must be multiples of the VAE's downsampling factor ``2^(len(block_out_channels)−1)``.
* A folder of latents holds ``index.json``, ``latents-00000.safetensors`` … (tensors ``latents``
  ``(n, C, h, w)``, ``labels`` int64 ``(n,)`` when the data are labeled, ``source_index`` int64 and
  ``flipped`` uint8 ``(n,)``: which source image each row encodes and whether it was mirrored) and
  ``held_out.safetensors`` (the held-out images' latents, never flipped). The training images are
  written in a seeded random order, so every shard is a uniform random subset of them.

:class:`LatentShards` memory-maps one shard at a time (the safetensors data section read with
``numpy.memmap``): a process holds about one shard, never the set. Nothing is unpickled; diffusers is
imported only when a VAE is loaded. Errors are :class:`LatentDataError`, a ``ValueError`` of one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..precision import autocast

__all__ = ["LatentDataError", "load_vae", "VAECodec", "vae_summary", "write_latents", "read_index",
           "read_safetensors", "read_held_out", "LatentShards", "INDEX_FORMAT", "INDEX_NAME", "LATENT_DTYPES"]

INDEX_FORMAT = "flowmaps-latents"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
HELD_OUT_NAME = "held_out.safetensors"
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors dtype names -> (numpy dtype read from the file, torch dtype it is viewed as)
_ST_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16),
              "F32": (np.float32, torch.float32), "I64": (np.int64, torch.int64),
              "U8": (np.uint8, torch.uint8)}


class LatentDataError(ValueError):
    """Latents or a VAE that cannot be used; the message is one line naming the path and the problem."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------- VAE

def load_vae(path: str | Path, device="cpu"):
    """The diffusers ``AutoencoderKL`` saved in the local folder ``path`` (``save_pretrained``), in eval
    mode on ``device``. Never downloads (``local_files_only``). A missing folder, a folder that holds no
    AutoencoderKL, or diffusers not installed raise :class:`LatentDataError`."""
    path = Path(path)
    if not path.is_dir():
        raise LatentDataError(f"--vae {path}: no such folder (a diffusers AutoencoderKL folder saved "
                              "with save_pretrained)")
    config = path / "config.json"
    try:
        kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "AutoencoderKL":
        raise LatentDataError(f"--vae {path}: not a diffusers AutoencoderKL folder (its config.json "
                              f"{'is missing' if not config.is_file() else 'names ' + repr(kind)})")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise LatentDataError("the latent space needs diffusers, which is not installed "
                              "(pip install diffusers)") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True,
                                            low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors
        raise LatentDataError(f"--vae {path}: cannot load the AutoencoderKL ({_one_line(err)})") from None
    return vae.to(device).eval().requires_grad_(False)


def _config_hash(vae) -> str:
    """SHA-256 of the VAE's config (its architecture and scaling), keys starting with ``_`` left out."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    return hashlib.sha256(text.encode()).hexdigest()


def vae_summary(vae, path: str | Path) -> dict:
    """What an index records of a VAE: its folder (absolute), config hash, scale, shift, channels and
    downsampling factor."""
    c = vae.config
    shift = c.get("shift_factor")
    return {"path": str(Path(path).resolve()), "config_sha256": _config_hash(vae),
            "scaling_factor": float(c.get("scaling_factor") or 1.0),
            "shift_factor": float(shift) if shift is not None else 0.0,
            "in_channels": int(c["in_channels"]), "out_channels": int(c["out_channels"]),
            "latent_channels": int(c["latent_channels"]),
            "downsample": 2 ** (len(c["block_out_channels"]) - 1)}


class VAECodec:
    """Encode images to latents and decode latents to images with a VAE, ``batch_size`` at a time on
    ``device`` (under bf16 autocast when ``precision="bf16"``; the results are returned as float32 on
    the CPU). ``precision`` is the run's ``train.precision`` when decoding a run's samples
    (:func:`~flowmaps.runs.latents.latent_codec`: ``sample``, ``evaluate``, the training sheets) and
    ``--precision`` when encoding; under bf16 the VAE's convolutions and matmuls round to 8 significant
    bits (:mod:`flowmaps.precision`, rule 1), so latents and decoded images differ from fp32's by a few
    ``2^-8`` relative.

    ``encode(x)``: images ``(N, C, H, W)`` in [−1, 1] with the source's ``C`` (``image_channels``) →
    ``(m − shift) · scale`` with ``m`` the posterior mean (``posterior="mean"``) or a sample drawn with
    ``generator``. ``decode(z)``: ``vae.decode(z / scale + shift)`` converted back to ``image_channels``
    (3 → 1: the mean of the three planes)."""

    def __init__(self, vae, info: dict, image_channels: int, device="cpu", batch_size: int = 64,
                 precision: str = "fp32"):
        if image_channels not in (1, 3) or info["in_channels"] not in (1, 3) \
                or (image_channels == 3 and info["in_channels"] == 1):
            raise LatentDataError(f"the VAE takes {info['in_channels']}-channel images; "
                                  f"{image_channels}-channel images cannot be given to it")
        self.vae, self.info, self.image_channels = vae, info, int(image_channels)
        self.device, self.batch_size, self.precision = torch.device(device), int(batch_size), precision
        self.scale, self.shift = float(info["scaling_factor"]), float(info["shift_factor"])

    def _autocast(self):
        return autocast(self.device.type, self.precision)  # the training step's rule 1 (spec E.12)

    def check_size(self, shape, what: str = "images") -> None:
        """Refuse images whose height or width is not a multiple of the downsampling factor."""
        f = self.info["downsample"]
        h, w = shape[-2:]
        if h % f or w % f:
            raise LatentDataError(f"{what} of {h}x{w} pixels: the VAE downsamples by {f}, so height and "
                                  f"width must be multiples of {f} (resize them with data.image_size=)")

    def _to_vae_channels(self, x: Tensor) -> Tensor:
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 and self.info["in_channels"] == 3 else x

    @torch.no_grad()
    def encode_batch(self, x: Tensor, posterior: str = "mean",
                     generator: torch.Generator | None = None) -> Tensor:
        """One batch of images → latents (float32, CPU), without splitting it."""
        x = self._to_vae_channels(x.to(self.device, torch.float32))
        with self._autocast():
            dist = self.vae.encode(x).latent_dist
            if posterior == "mean":
                m = dist.mean
            else:
                noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device
                                    if generator is not None else "cpu").to(dist.mean.device)
                m = dist.mean + dist.std * noise
        return ((m.float() - self.shift) * self.scale).cpu()

    @torch.no_grad()
    def encode(self, x: Tensor, posterior: str = "mean",
               generator: torch.Generator | None = None) -> Tensor:
        return torch.cat([self.encode_batch(c, posterior, generator) for c in x.split(self.batch_size)])

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents ``(N, C, h, w)`` (model space) → images ``(N, image_channels, H, W)`` float32 on the
        CPU, ``batch_size`` at a time on the device."""
        out = []
        for chunk in z.split(self.batch_size):
            chunk = chunk.to(self.device, torch.float32) / self.scale + self.shift
            with self._autocast():
                x = self.vae.decode(chunk).sample
            x = x.float()
            if self.image_channels == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            out.append(x.cpu())
        return torch.cat(out) if out else torch.empty(0)

    __call__ = decode


# ------------------------------------------------------------------------------------------ writing

def _save_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
    os.replace(tmp, path)


def write_latents(out: str | Path, codec: VAECodec, images, labels: Tensor | None, num_classes: int,
                  held_out_images, held_out_labels: Tensor | None, *, dtype: str = "float16",
                  hflip: bool = False, posterior: str = "mean", seed: int = 0,
                  shard_size: int = 10_000, meta: dict | None = None,
                  progress: bool = True) -> dict:
    """Encode ``images`` (training part, with their mirror images when ``hflip``) and
    ``held_out_images`` into the new folder ``out``; returns the index (also written as ``index.json``,
    last, so its presence marks a complete folder).

    ``images``/``held_out_images``: anything indexable by a LongTensor of rows giving float32
    ``(n, C, H, W)`` in [−1, 1] (a tensor or :class:`~flowmaps.data.images.ByteImages`). The training
    images are taken in the order of ``torch.randperm(N, generator=seed)``, ``codec.batch_size`` at a time;
    a row's flipped copy is encoded in a batch of its own right after its batch and stored beside it.
    Shards hold ``shard_size`` rows (the last fewer). Per-channel mean and std of the stored values
    (float64 sums) are recorded in the index as ``stats``."""
    out = Path(out)
    if dtype not in LATENT_DTYPES:
        raise LatentDataError(f"--dtype {dtype!r}: choose one of {', '.join(LATENT_DTYPES)}")
    if posterior not in ("mean", "sample"):
        raise LatentDataError(f"--posterior {posterior!r}: choose mean or sample")
    if shard_size < 1:
        raise LatentDataError(f"--shard-size must be positive, got {shard_size}")
    n, shape = len(images), tuple(images.shape[1:])
    if n < 1:
        raise LatentDataError("no training images to encode")
    codec.check_size(shape)
    out.mkdir(parents=True, exist_ok=False)
    torch_dtype = LATENT_DTYPES[dtype]
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    noise = torch.Generator().manual_seed(int(seed) + 1)  # posterior samples
    copies = 2 if hflip else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * copies + len(held_out_images), desc="encoding", unit="img",
                   dynamic_ncols=True)
    sums = None
    shards, pending, pending_rows = [], [], 0

    def flush(final: bool = False):
        nonlocal pending, pending_rows
        while pending_rows >= shard_size or (final and pending_rows):
            parts = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            take = min(shard_size, pending_rows)
            name = f"latents-{len(shards):05d}.safetensors"
            _save_shard(out / name, {k: v[:take] for k, v in parts.items()})
            shards.append({"file": name, "count": take})
            rest = {k: v[take:] for k, v in parts.items()}
            pending, pending_rows = ([rest] if pending_rows > take else []), pending_rows - take

    latent_shape = None

    def finite(z: Tensor) -> Tensor:
        nonlocal latent_shape
        if not bool(torch.isfinite(z).all()):
            raise LatentDataError("the VAE returned NaN or infinite latents")
        latent_shape = latent_shape or list(z.shape[1:])
        return z.to(torch_dtype)

    def stored(z: Tensor) -> Tensor:
        nonlocal sums
        q = finite(z)
        d = q.double()
        s = torch.stack([d.sum((0, 2, 3)), d.square().sum((0, 2, 3))])
        sums = s if sums is None else sums + s
        return q

    for rows in order.split(codec.batch_size):
        x = images[rows]
        versions = [(x, 0)] + ([(x.flip(-1), 1)] if hflip else [])
        for xv, flipped in versions:
            z = stored(codec.encode_batch(xv, posterior, noise))
            part = {"latents": z, "source_index": rows.long(),
                    "flipped": torch.full((len(rows),), flipped, dtype=torch.uint8)}
            if labels is not None:
                part["labels"] = labels[rows].long()
            pending.append(part)
            pending_rows += len(rows)
            if bar is not None:
                bar.update(len(rows))
        flush()
    flush(final=True)
    count = n * copies
    m = len(held_out_images)
    if m:
        parts = []
        for rows in torch.arange(m).split(codec.batch_size):
            parts.append(finite(codec.encode_batch(held_out_images[rows], posterior, noise)))
            if bar is not None:
                bar.update(len(rows))
        held = {"latents": torch.cat(parts), "source_index": torch.arange(m)}
        if held_out_labels is not None:
            held["labels"] = held_out_labels.long()
        _save_shard(out / HELD_OUT_NAME, held)
    if bar is not None:
        bar.close()
    values = count * latent_shape[1] * latent_shape[2]  # stored values per channel
    mean = sums[0] / values
    var = (sums[1] - values * mean.square()) / max(values - 1, 1)
    all_mean = sums[0].sum() / (values * mean.numel())
    all_var = (sums[1].sum() - values * mean.numel() * all_mean ** 2) / max(values * mean.numel() - 1, 1)
    index = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION,
             "shape": latent_shape,
             "dtype": dtype, "count": count, "shards": shards,
             "held_out": {"file": HELD_OUT_NAME, "count": m} if m else None,
             "num_classes": int(num_classes) if labels is not None else 0,
             "hflip": bool(hflip), "posterior": posterior, "seed": int(seed), "order": "randperm(seed)",
             "image_shape": list(shape), "vae": codec.info, "precision": codec.precision,
             "stats": {"mean": mean.tolist(), "std": var.clamp_min(0).sqrt().tolist(),
                       "std_all": float(all_var.clamp_min(0).sqrt())}}
    index.update(meta or {})
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


# ------------------------------------------------------------------------------------------ reading

def _header(path: Path) -> tuple[dict, int]:
    """The checked header of a safetensors file: ``({name: (numpy dtype, torch dtype, shape, offset)},
    start of the data section)``; every tensor must be of a dtype read here and lie inside the file."""
    if not path.is_file():
        raise LatentDataError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise LatentDataError(f"{path}: too short for a safetensors file (truncated or corrupt)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 << 20):
                raise LatentDataError(f"{path}: not a safetensors file (header length {length}; "
                                      "truncated or corrupt)")
            header = json.loads(handle.read(length))
    except LatentDataError:
        raise
    except (OSError, ValueError) as err:
        raise LatentDataError(f"{path}: not a safetensors file ({_one_line(err)})") from None
    if not isinstance(header, dict):
        raise LatentDataError(f"{path}: not a safetensors file (its header is not a mapping)")
    start, out = 8 + length, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            np_dtype, torch_dtype = _ST_DTYPES[spec["dtype"]]
            shape = tuple(int(v) for v in spec["shape"])
            lo, hi = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LatentDataError(f"{path}: tensor {name!r} has an unreadable or unsupported entry "
                                  f"{str(spec)[:100]}") from None
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        if hi - lo != nbytes or lo < 0 or start + hi > size:
            raise LatentDataError(f"{path}: tensor {name!r} does not fit the file (truncated or corrupt)")
        out[name] = (np_dtype, torch_dtype, shape, start + lo)
    return out, start


def read_safetensors(path: str | Path, names: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    """The tensors of a safetensors file, memory-mapped read-only (nothing copied until indexed):
    ``{name: tensor}`` (bfloat16 viewed from its 16-bit words). Only the dtypes F16, BF16, F32, I64
    and U8 are read. A file that is not a well-formed safetensors file (truncated, a tensor outside
    the file) raises :class:`LatentDataError`."""
    import warnings

    path = Path(path)
    header, _ = _header(path)
    out = {}
    for name, (np_dtype, torch_dtype, shape, offset) in header.items():
        if names is not None and name not in names:
            continue
        if math.prod(shape) == 0:
            out[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        array = np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=shape)
        with warnings.catch_warnings():  # read-only memory: torch warns; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        out[name] = t.view(torch_dtype) if torch_dtype != t.dtype else t
    return out


def _check_entries(path: Path, header: dict, index: dict, count: int, labeled: bool) -> None:
    """A shard's (or the held-out file's) header against the index: ``latents`` of the index's dtype
    and shape with ``count`` rows, int64 ``labels`` of ``count`` when the data are labeled."""
    entry = header.get("latents")
    want = (LATENT_DTYPES[index["dtype"]], (count, *index["shape"]))
    if entry is None or (entry[1], entry[2]) != want:
        got = None if entry is None else f"{entry[1]} {list(entry[2])}"
        raise LatentDataError(f"{path}: 'latents' is not {index['dtype']} {[count, *index['shape']]} as "
                              f"the index says (got {got})")
    if labeled:
        y = header.get("labels")
        if y is None or (y[1], y[2]) != (torch.int64, (count,)):
            raise LatentDataError(f"{path}: 'labels' missing or not int64 ({count},)")


def read_index(path: str | Path) -> dict:
    """The index of a latents folder (``path`` the folder or its ``index.json``), checked: format,
    shape, dtype, shards that exist with counts adding up. Raises :class:`LatentDataError`."""
    path = Path(path)
    folder = path.parent if path.name == INDEX_NAME else path
    file = folder / INDEX_NAME
    if not folder.exists():
        raise LatentDataError(f"data.path {folder}: no such folder (make it with `flowmaps encode`)")
    if not file.is_file():
        raise LatentDataError(f"data.path {folder}: not a latents folder (no {INDEX_NAME}; make it with "
                              "`flowmaps encode`)")
    try:
        index = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise LatentDataError(f"{file}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise LatentDataError(f"{file}: not a flowmaps latents index")
    if index.get("format_version") != INDEX_VERSION:
        raise LatentDataError(f"{file}: latents format {index.get('format_version')!r} is not supported "
                              f"(this library reads {INDEX_VERSION})")
    try:
        shape = [int(v) for v in index["shape"]]
        shards = [(str(s["file"]), int(s["count"])) for s in index["shards"]]
        ok = (len(shape) == 3 and min(shape) > 0 and index["dtype"] in LATENT_DTYPES and shards
              and all(c > 0 and "/" not in f and "\\" not in f for f, c in shards)
              and sum(c for _, c in shards) == int(index["count"])
              and isinstance(index["vae"], dict) and int(index["num_classes"]) >= 0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise LatentDataError(f"{file}: malformed latents index (shape, dtype, shards, counts, vae)")
    for name, count in shards:  # headers only (a few hundred bytes each): truncation shows here
        if not (folder / name).is_file():
            raise LatentDataError(f"{folder / name}: shard listed in {file} is missing")
        header, _ = _header(folder / name)
        _check_entries(folder / name, header, index, count, bool(index["num_classes"]))
    index["folder"] = str(folder)
    return index


def _check_labels(path: Path, labels: Tensor | None, index: dict) -> None:
    if labels is not None and labels.numel() and (int(labels.min()) < 0
                                                  or int(labels.max()) >= index["num_classes"]):
        raise LatentDataError(f"{path}: labels outside 0..{index['num_classes'] - 1}")


class LatentShards:
    """A trainer data source over the shards of a latents folder, reading one shard at a time.

    ``draw_labeled(n, generator) -> (x, labels | None)``: ``n`` rows drawn uniformly with replacement
    (``torch.randint`` with ``generator``) from the *current* shard, decoded to float32 on ``device``;
    labels when ``labeled``. A shard serves as many rows as it holds (whole batches: a visit ends
    once at least its count has been drawn), then the next one is memory-mapped and the previous one
    released. Shards are visited in epochs: epoch ``e`` orders them by
    ``randperm(S, seed=seed·1_000_003 + e)``, the same on every rank, and rank ``r`` of ``world``
    takes positions ``r, r + world, …`` of it (all ranks share the shard ``r mod S`` when ``S <
    world``). The position (epoch, shard, rows left) is :meth:`state_dict`, so a resumed run draws the
    same batches.

    Bias (E.11): over a whole epoch every row is drawn once in expectation (up to the partial batch
    that ends a visit, which favours a small last shard by at most one batch per visit); within a
    visit the batches come from one shard, a uniform random subset of the set since the encoder
    shuffled the rows, so consecutive batches are less diverse than i.i.d. draws from the whole set.

    ``std()`` is the recorded std of all stored values; ``shape`` is ``(count, C, h, w)``."""

    def __init__(self, path: str | Path, labeled: bool = False, seed: int = 0, rank: int = 0,
                 world: int = 1, device="cpu", index: dict | None = None):
        self.index = index or read_index(path)
        self.folder = Path(self.index["folder"])
        if labeled and not self.index["num_classes"]:
            raise LatentDataError(f"{self.folder}: the latents have no labels")
        self.labeled, self.seed, self.rank, self.world = bool(labeled), int(seed), int(rank), int(world)
        self.device = torch.device(device)
        self.shards = [(s["file"], int(s["count"])) for s in self.index["shards"]]
        self.epoch, self.position, self.left = 0, 0, 0
        self._current: tuple[int, Tensor, Tensor | None] | None = None
        self.loads = 0  # shards memory-mapped so far (tests watch it)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.index["count"]), *self.index["shape"])

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self.index["count"])

    def __repr__(self) -> str:
        return (f"LatentShards({self.folder}, {len(self)} latents {tuple(self.index['shape'])} "
                f"{self.index['dtype']} in {len(self.shards)} shards)")

    def to(self, device) -> "LatentShards":
        """This source, drawing onto ``device`` (the current shard is copied there when not the CPU)."""
        self.device = torch.device(device)
        self._current = None
        return self

    def std(self) -> Tensor:
        return torch.tensor(float(self.index["stats"]["std_all"]))

    def _mine(self, epoch: int) -> list[int]:
        s = len(self.shards)
        order = torch.randperm(s, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if s < self.world:
            return [int(order[self.rank % s])]
        return [int(k) for k in order[self.rank::self.world]]

    def _load(self, k: int) -> None:
        self._current = None  # release the previous shard first
        name, count = self.shards[k]
        path = self.folder / name
        header, _ = _header(path)  # the file may have changed since the index was read
        _check_entries(path, header, self.index, count, self.labeled)
        tensors = read_safetensors(path, ("latents", "labels"))
        _check_labels(path, tensors.get("labels") if self.labeled else None, self.index)
        z = tensors["latents"]
        if not all(bool(torch.isfinite(block).all()) for block in z.split(256)):  # no shard-sized mask
            raise LatentDataError(f"{path}: holds NaN or infinite latents")
        y = tensors.get("labels") if self.labeled else None
        if self.device.type != "cpu":
            z = z.to(self.device)
            y = None if y is None else y.to(self.device)
        self._current = (k, z, y)
        self.loads += 1

    def _advance(self) -> None:
        mine = self._mine(self.epoch)
        if self.position >= len(mine):
            self.epoch, self.position = self.epoch + 1, 0
            mine = self._mine(self.epoch)
        k = mine[self.position]
        self.position += 1
        self.left = self.shards[k][1]
        self._load(k)

    def draw_labeled(self, n: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor | None]:
        if self.left <= 0:
            self._advance()
        elif self._current is None:  # restored from a state: reopen the shard of that position
            self._load(self._mine(self.epoch)[self.position - 1])
        _, z, y = self._current
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(z.shape[0], (n,), generator=generator, device=device).to(z.device)
        self.left -= n
        x = z[idx].to(self.device, torch.float32)
        return x, (None if y is None else y[idx].to(self.device))

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.draw_labeled(n, generator)[0]

    @property
    def yields_labels(self) -> bool:
        return self.labeled

    def state_dict(self) -> dict:
        """The position in the shard schedule (JSON)."""
        return {"epoch": self.epoch, "position": self.position, "left": self.left}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.left = (int(state[k]) for k in ("epoch", "position", "left"))
        self._current = None

    def iter_shards(self) -> Iterator[tuple[dict, dict[str, Tensor]]]:
        """Every shard in file order as ``(entry, memory-mapped tensors)``, one at a time."""
        for name, count in self.shards:
            yield {"file": name, "count": count}, read_safetensors(self.folder / name)


def read_held_out(index: dict) -> tuple[Tensor | None, Tensor | None]:
    """The held-out latents (memory-mapped, in the stored dtype) and labels of a latents folder, or
    ``(None, None)`` when it has none."""
    entry = index.get("held_out")
    if not entry:
        return None, None
    path = Path(index["folder"]) / entry["file"]
    header, _ = _header(path)
    _check_entries(path, header, index, int(entry["count"]), bool(index["num_classes"]))
    tensors = read_safetensors(path, ("latents", "labels"))
    _check_labels(path, tensors.get("labels"), index)
    return tensors["latents"], tensors.get("labels")

