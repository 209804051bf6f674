"""Sample-quality metrics: :mod:`~flowmaps.metrics.points` (vectors: exact W2, energy distance,
histogram KL, map error), :mod:`~flowmaps.metrics.images` (Fréchet distance and feature statistics,
precision/recall, density/coverage), :mod:`~flowmaps.metrics.features` (Inception and classifier
feature extractors) and :mod:`~flowmaps.metrics.classifier` (the offline feature classifier)."""

from .classifier import (FeatureClassifier, FeatureClassifierError, load_feature_classifier,
                         save_feature_classifier, train_feature_classifier)
from .features import (ClassifierFeatures, FeatureExtractor, InceptionFeatures,
                       InceptionUnavailableError, compute_feature_stats, compute_features)
from .images import (DensityCoverage, FeatureStats, FeatureStatsError, PrecisionRecall,
                     density_coverage, frechet_distance, precision_recall)
from .points import (checkerboard_kl, checkerboard_log_density, energy_distance, gaussian_w2,
                     histogram_kl, mean_map_error, wasserstein2)

__all__ = ["wasserstein2", "energy_distance", "histogram_kl", "checkerboard_kl",
           "checkerboard_log_density", "mean_map_error", "gaussian_w2", "frechet_distance",
           "FeatureStats", "FeatureStatsError", "precision_recall", "density_coverage",
           "PrecisionRecall", "DensityCoverage", "FeatureClassifier", "train_feature_classifier",
           "save_feature_classifier", "load_feature_classifier", "FeatureClassifierError",
           "FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "InceptionUnavailableError",
           "compute_features", "compute_feature_stats"]
