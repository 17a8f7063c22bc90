"""Data in and out of the models: image folders and the built-in sample set (:mod:`.datasets`), image
files and grids (:mod:`.images`), and code folders for generator training (:mod:`.codes`).

Nothing here knows a model: :func:`~fqgan.data.codes.extract_codes` takes any module with ``encode``.
"""

from .datasets import (
    IMAGE_EXTENSIONS,
    SAMPLE_PHOTOS,
    ImageFolder,
    SampleImages,
    build_dataset,
    center_crop_arr,
    collate,
    load_sample_photo,
    random_crop_arr,
    sample_photo_dir,
)

__all__ = ["IMAGE_EXTENSIONS", "SAMPLE_PHOTOS", "ImageFolder", "SampleImages", "build_dataset", "center_crop_arr",
           "collate", "load_sample_photo", "random_crop_arr", "sample_photo_dir"]
