"""Data: :mod:`~flowmaps.data.points` (2-D generators, user arrays, standardisation),
:mod:`~flowmaps.data.images` (image datasets in memory, flip augmentation),
:mod:`~flowmaps.data.image_readers` (image datasets from local files) and :mod:`~flowmaps.data.grids`
(PNG grids of images). Nothing downloads and nothing is unpickled."""

from .grids import make_grid, save_image_grid, save_labeled_grids, to_uint8
from .image_readers import (IMAGE_DATASETS, load_digits, load_image_dataset, read_cifar10, read_idx,
                            read_image_folder, read_imagenet32)
from .images import AugmentedImages, ByteImages, ImageDataError, ImageDataset, random_hflip
from .points import (DATASETS, Standardizer, checkerboard, eight_gaussians, load_array, make_dataset,
                     moons, spirals)

__all__ = ["checkerboard", "eight_gaussians", "moons", "spirals", "DATASETS", "make_dataset",
           "load_array", "Standardizer", "ByteImages", "ImageDataset", "ImageDataError",
           "IMAGE_DATASETS", "load_image_dataset", "load_digits", "read_idx", "read_cifar10",
           "read_imagenet32", "read_image_folder", "random_hflip", "AugmentedImages", "to_uint8",
           "make_grid", "save_image_grid", "save_labeled_grids"]
