"""Sample-quality metrics: :mod:`~flowmaps.metrics.points` (vectors) and :mod:`~flowmaps.metrics.images`."""

from .points import (checkerboard_kl, checkerboard_log_density, energy_distance, gaussian_w2,
                     histogram_kl, mean_map_error, wasserstein2)

__all__ = ["wasserstein2", "energy_distance", "histogram_kl", "checkerboard_kl",
           "checkerboard_log_density", "mean_map_error", "gaussian_w2"]
