"""Reference statistics and quality metrics for image runs: Fréchet distance (and k-NN precision/recall)
of generated images against the dataset, on the features of a small classifier trained on the dataset
(offline, the CPU default) or of Inception-v3 (standard FID; local weights, optional ``fid`` extra).

A *reference folder* (``flowmaps fid-stats``, or made on the fly inside an evaluation folder) holds

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import Config, ConfigError

__all__ = ["ImageReference", "build_reference", "load_reference", "reference_files"]

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
        return ClassifierFeatures(load_feature_classifier(files["classifier"])), {}
    if bundle.labels is None:
        raise ConfigError(f"eval.features: {cfg.data.name} has no labels to train the feature "
                          "classifier; use eval.features=inception")
    if progress:
        print(f"training the feature classifier on {cfg.data.name} ({e.classifier_steps} steps) ...",
              flush=True)
    model, accuracy = train_feature_classifier(
        bundle.train, bundle.labels, bundle.num_classes, steps=e.classifier_steps, seed=e.seed,
        validation=(bundle.held_out, bundle.held_out_labels), progress=progress)
    save_feature_classifier(model, files["classifier"], {"data": cfg.data.name, "accuracy": accuracy,
                                                         "steps": e.classifier_steps})
    return ClassifierFeatures(model), {"classifier_accuracy": accuracy}


def build_reference(cfg: Config, bundle, folder: Path, progress: bool = True) -> ImageReference:
    """Train/load the extractor and write the dataset's reference statistics into ``folder``."""
    from ..metrics.features import compute_features
    from ..metrics.images import FeatureStats

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extractor, info = _extractor(cfg, folder, bundle, progress)
    images = torch.cat([bundle.train, bundle.held_out])
    feats = compute_features(extractor, images, batch_size=cfg.eval.batch_size)
    stats = FeatureStats.from_features(feats, extractor.name, extractor.fingerprint)
    g = torch.Generator().manual_seed(cfg.eval.seed)
    sample = feats[torch.randperm(feats.shape[0], generator=g)[:PR_SAMPLES]]
    files = reference_files(folder, cfg.eval.features)
    stats.save(files["stats"])
    np.save(files["sample"], sample.numpy())
    info = dict(info, data=cfg.data.name, features=cfg.eval.features, extractor=extractor.name,
                fingerprint=extractor.fingerprint, images=int(images.shape[0]),
                shape=list(images.shape[1:]))
    files["info"].write_text(json.dumps(info, indent=2))
    if progress:
        print(f"wrote reference statistics of {images.shape[0]} {cfg.data.name} images "
              f"({extractor.name}) to {folder}", flush=True)
    return ImageReference(extractor, stats, sample, info, cfg.eval.seed)


def load_reference(cfg: Config, folder: Path) -> ImageReference:
    """Read a reference folder made by :func:`build_reference` (``flowmaps fid-stats``)."""
    from ..metrics.images import FeatureStats

    files = reference_files(folder, cfg.eval.features)
    for key in ("stats", "sample", "info"):
        if not files[key].is_file():
            raise ConfigError(f"eval.fid_stats: {files[key]} not found (make it with `flowmaps fid-stats "
                              f"--preset {cfg.preset} --out {folder}`)")
    info = json.loads(files["info"].read_text())
    if info.get("data") != cfg.data.name:
        raise ConfigError(f"eval.fid_stats: {folder} holds statistics of {info.get('data')!r}, not "
                          f"{cfg.data.name!r}")
    extractor, _ = _extractor(cfg, folder)
    stats = FeatureStats.load(files["stats"])
    if stats.fingerprint and stats.fingerprint != extractor.fingerprint:
        raise ConfigError(f"eval.fid_stats: {files['stats']} was computed with other feature weights")
    sample = torch.from_numpy(np.load(files["sample"], allow_pickle=False))
    return ImageReference(extractor, stats, sample, info, cfg.eval.seed)
