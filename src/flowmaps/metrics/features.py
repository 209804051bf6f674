"""Feature extractors for image metrics, and the features and statistics of many images.

Two extractors:

* :class:`ClassifierFeatures` wraps a small CNN, :class:`~flowmaps.metrics.classifier.FeatureClassifier`,
  trained here in seconds on the CPU on the same labelled images the generative model learns. Its
  penultimate layer gives a *meaningful but non-standard* Fréchet distance: numbers are comparable only
  between runs that use the same classifier weights (same :attr:`FeatureExtractor.fingerprint`), never
  with published FIDs.
* :class:`InceptionFeatures` gives the standard FID features (Inception-v3 pool3, 2048-D, as in
  torch-fidelity / the TF original) when the optional ``torch-fidelity`` package (``pip install
  "flowmaps[fid]"``, needs a working torchvision) and a local copy of its weights file are available.
  It never downloads, and it loads the weights with ``torch.load(..., weights_only=True)`` only.

Conventions. Images are float tensors ``(B, C, H, W)`` in ``[−1, 1]`` (what the generative models here
produce); values outside are clamped to ``[−1, 1]`` by the extractors, as they would be when written as
an image. Features come back as float64 CPU tensors ``(N, F)``; :func:`compute_feature_stats` streams them
into a :class:`~flowmaps.metrics.images.FeatureStats`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..data.images import ByteImages
from .classifier import FeatureClassifier, _check_images, _weights_fingerprint
from .images import FeatureStats

__all__ = ["FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "InceptionUnavailableError",
           "compute_features", "compute_feature_stats"]


class FeatureExtractor:
    """What the statistics helpers need from an extractor: a ``name``, a ``fingerprint`` identifying its
    weights (statistics from different fingerprints are not comparable), and ``extract(batch) -> (B, F)``
    for one batch. Calling the extractor runs ``extract`` over ``images`` in batches under ``no_grad`` and
    returns float64 CPU features ``(N, F)``."""

    name: str = "features"

    @property
    def fingerprint(self) -> str:
        return ""

    def extract(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, images, batch_size: int = 256) -> Tensor:
        images = _check_images(images)
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                out.append(self.extract(images[i:i + batch_size]).detach().to("cpu", torch.float64))
        if not out:
            raise ValueError("no images to extract features from")
        return torch.cat(out)


class ClassifierFeatures(FeatureExtractor):
    """Penultimate-layer features of a :class:`FeatureClassifier` (its device; images clamped to
    ``[−1, 1]``). ``fingerprint``: SHA-256 prefix of its weights, fixed at construction."""

    def __init__(self, model: FeatureClassifier):
        self.model = model.eval()
        cfg = model.config
        self.name = f"classifier-c{cfg['in_channels']}-w{cfg['width']}-f{cfg['feature_dim']}"
        self._fingerprint = _weights_fingerprint(model.state_dict())

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def extract(self, images: Tensor) -> Tensor:
        param = next(self.model.parameters())
        return self.model.features(images.to(param.device, param.dtype).clamp(-1.0, 1.0))


class InceptionUnavailableError(ImportError):
    """torch-fidelity (or the torchvision it needs) cannot be imported here."""


def _refuse_download(*args, **kwargs):
    raise RuntimeError("flowmaps never downloads Inception weights; pass a local weights_path")


@contextlib.contextmanager
def _weights_only_torch_load(module=None):
    """Within the block, ``torch.load`` always runs with ``weights_only=True`` (whatever the caller asks:
    a weights file then cannot execute code when it is unpickled) and downloads through
    ``torch.hub.load_state_dict_from_url`` (also as imported into ``module``) are refused. The patch is
    process-wide for its duration (another thread loading meanwhile also gets ``weights_only=True``)."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    patches = [(torch, "load", safe_load), (torch.hub, "load_state_dict_from_url", _refuse_download)]
    if module is not None and hasattr(module, "load_state_dict_from_url"):
        patches.append((module, "load_state_dict_from_url", _refuse_download))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


class InceptionFeatures(FeatureExtractor):
    """Standard FID features: torch-fidelity's Inception-v3 ("inception-v3-compat", pool3, 2048-D).

    ``weights_path`` is a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
    (fetched once by the user on a machine with network access): it must exist, nothing is downloaded. It
    is read with ``torch.load(weights_only=True)`` forced (torch-fidelity itself asks for a full unpickle),
    so a tampered file cannot run code. Needs the optional ``torch-fidelity`` package (``pip install
    "flowmaps[fid]"``) and a torchvision that imports; otherwise :class:`InceptionUnavailableError`.

    Images: float ``(B, C, H, W)`` in ``[−1, 1]`` are converted to uint8 ``round((x + 1)·127.5)`` (a uint8
    input is passed as is); one channel is repeated to three. torch-fidelity resizes to 299×299 itself
    (TF-compatible bilinear). ``fingerprint``: SHA-256 prefix of the weights file.
    """

    name = "inception-v3-compat"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu"):
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path} (flowmaps never downloads them: "
                                    "fetch torch-fidelity's weights-inception-2015-12-05-6726825d.pth once "
                                    "and pass its path)")
        try:
            module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        except Exception as err:  # ImportError, or torchvision failing to load its operators
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise InceptionUnavailableError(
                'Inception features need torch-fidelity: pip install "flowmaps[fid]" (and torchvision '
                f"must import); import failed: {type(err).__name__}: {reason}") from None
        with path.open("rb") as handle:
            digest = hashlib.sha256()
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        self._fingerprint = digest.hexdigest()[:16]
        self.weights_path = path
        self.device = torch.device(device)
        with _weights_only_torch_load(module):
            model = module.FeatureExtractorInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                       feature_extractor_weights_path=str(path))
        self.model = model.to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """``(B, 1 or 3, H, W)`` in ``[−1, 1]`` (or uint8) → uint8 ``(B, 3, H, W)``."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images

    def __call__(self, images, batch_size: int = 64) -> Tensor:
        images = images if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
        if images.dtype == torch.uint8:  # already pixels: skip the float check of the base class
            out = [self.extract(images[i:i + batch_size]).detach().to("cpu", torch.float64)
                   for i in range(0, images.shape[0], batch_size)]
            return torch.cat(out)
        return super().__call__(images, batch_size)

    def extract(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.model(self.to_uint8(images).to(self.device))
        return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------ statistics helpers

ImageSource = Tensor | np.ndarray | ByteImages | Callable[[int], Tensor] | Iterable


def _batches(source, n: int | None, batch_size: int):
    """Yield image batches from a tensor/array/:class:`ByteImages` (its first ``n`` rows, decoded a batch
    at a time), a sampler ``f(k) -> (k, C, H, W)`` (called until ``n`` images are produced), or an
    iterable of batches (or ``(images, labels)`` pairs; the first ``n`` images)."""
    if isinstance(source, (Tensor, np.ndarray, ByteImages)):
        x = source if isinstance(source, (Tensor, ByteImages)) else torch.as_tensor(source)
        stop = x.shape[0] if n is None else min(n, x.shape[0])
        for i in range(0, stop, batch_size):
            yield x[i:min(i + batch_size, stop)]
        return
    if callable(source):
        if n is None:
            raise ValueError("a sampler needs n, the number of images to draw")
        done = 0
        while done < n:
            batch = torch.as_tensor(source(min(batch_size, n - done)))
            if batch.ndim == 0 or batch.shape[0] == 0:
                raise ValueError("the sampler returned no images")
            batch = batch[:n - done]
            done += batch.shape[0]
            yield batch
        return
    done = 0
    for batch in source:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = torch.as_tensor(batch)
        if n is not None:
            batch = batch[:n - done]
        done += batch.shape[0]
        yield batch
        if n is not None and done >= n:
            return


def _run(extractor: Callable, source, n: int | None, batch_size: int, progress: bool):
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"features ({getattr(extractor, 'name', 'extractor')})", unit="img",
                   dynamic_ncols=True)
    try:
        for batch in _batches(source, n, batch_size):
            feats = extractor(batch, batch_size=batch_size) if isinstance(extractor, FeatureExtractor) \
                else extractor(batch)
            feats = torch.as_tensor(feats).detach().to("cpu", torch.float64).reshape(batch.shape[0], -1)
            if bar is not None:
                bar.update(batch.shape[0])
            yield feats
    finally:
        if bar is not None:
            bar.close()


def compute_features(extractor: Callable, images_or_sampler: ImageSource, n: int | None = None,
                     batch_size: int = 256, progress: bool = False) -> Tensor:
    """Features ``(n, F)`` (float64, CPU) of ``n`` images from a tensor, a sampler ``f(k)`` returning
    ``k`` images, or an iterable of batches (see :func:`compute_feature_stats`)."""
    out = list(_run(extractor, images_or_sampler, n, batch_size, progress))
    if not out:
        raise ValueError("no images to extract features from")
    features = torch.cat(out)
    _check_count(n, features.shape[0])
    return features


def _check_count(n: int | None, count: int) -> None:
    if n is not None and count < n:
        raise ValueError(f"asked for {n} images but the source gave only {count}")


def compute_feature_stats(extractor: Callable, images_or_sampler: ImageSource, n: int | None = None,
                          batch_size: int = 256, progress: bool = False) -> FeatureStats:
    """:class:`FeatureStats` of ``n`` images' features, streamed (memory ``O(F²)``, not ``O(n F)``).

    ``images_or_sampler`` is an image tensor/array ``(N, C, H, W)`` (its first ``n`` images, all if ``n`` is
    None; fewer than ``n`` is an error), a callable ``sampler(k) -> (k, C, H, W)`` called with ``k ≤ batch_size`` until ``n`` images are
    drawn, or an iterable of batches or ``(images, labels)`` pairs (e.g. a DataLoader). Moments are
    accumulated in float64 about the first batch's mean (no cancellation for features far from 0); the
    covariance is the unbiased one, as in :meth:`FeatureStats.from_features`. The result records the
    extractor's ``name`` and ``fingerprint``.
    """
    shift = s1 = s2 = None
    count = 0
    for feats in _run(extractor, images_or_sampler, n, batch_size, progress):
        if feats.shape[0] == 0:
            continue
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("features hold NaN or infinite values (non-finite images?)")
        if shift is None:
            shift = feats.mean(dim=0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(shift.shape[0], shift.shape[0], dtype=torch.float64)
        centred = feats - shift
        s1 += centred.sum(dim=0)
        s2 += centred.T @ centred
        count += feats.shape[0]
    _check_count(n, count)
    if count < 2:
        raise ValueError(f"feature statistics need at least 2 images, got {count}")
    mean = s1 / count
    cov = (s2 - count * torch.outer(mean, mean)) / (count - 1)
    return FeatureStats((shift + mean).numpy(), ((cov + cov.T) / 2).numpy(), count,
                        getattr(extractor, "name", ""), getattr(extractor, "fingerprint", ""))
