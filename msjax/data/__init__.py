"""Datasets and input pipelines for metric learning.

- Sources (``load_dataset``): CUB-200-2011, Cars-196, Stanford Online Products and
  In-Shop in their real layouts or from TFDS, any class-per-directory ``folder``, and the
  generated ``synthetic`` default; each split into the class-disjoint retrieval protocol.
- ``PKSampler``: batch ``i`` (P classes × K images) is a pure function of ``(seed, i)``.
- ``ImageTransform``/``normalize``: the released recipe's augmentation and the two input
  conventions (Caffe BGR for BN-Inception, ImageNet RGB for ResNet).
- ``train_batches``/``eval_batches``: grain pipelines from a ``config.data`` slice.
- ``python -m msjax.data check --config configs/cub.py --config.data.root=DIR``.
"""

from __future__ import annotations

from msjax.data.pipeline import GlobalBatches, eval_dataset, to_global, train_dataset
from msjax.data.records import (Dataset, DataError, ImageFiles, Split, make_split,
                                with_validation)
from msjax.data.sampler import SAMPLERS, PKSampler, RandomSampler, make_sampler
from msjax.data.sources import check_small_classes, load_dataset, small_classes
from msjax.data.transforms import ImageReadError, ImageTransform, decode, normalize


def image_transform(d, *, train: bool) -> ImageTransform:
  """``config.data``'s training or evaluation transform."""
  return ImageTransform(image_size=d.image_size, resize_to=d.resize_to or None, train=train,
                        crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio),
                        flip=d.flip, single_resize=d.single_resize)


def train_batches(split: Split, d, *, seed: int, num_steps: int, start_step: int = 0,
                  process_index=None, process_count=None):
  """This process's training batches from ``config.data`` (see ``train_dataset``): P×K
  batches, or ``d.sampler="random"`` shuffled ones of the same size.

  With P×K batches, classes with fewer than K images are refused unless
  ``d.pad_small_classes``.
  """
  sampler_name = d.get("sampler", "pk")
  if sampler_name == "pk":
    check_small_classes(split, d)
  sampler = make_sampler(sampler_name, split.labels, classes_per_batch=d.classes_per_batch,
                         images_per_class=d.images_per_class, seed=seed)
  return train_dataset(split, sampler, image_transform(d, train=True), num_steps=num_steps,
                       seed=seed, start_step=start_step, num_workers=d.num_workers,
                       num_threads=d.num_threads, prefetch=d.prefetch,
                       process_index=process_index, process_count=process_count)


def eval_batches(split: Split, d, *, process_index=None, process_count=None):
  """Every image of ``split`` once, in padded, masked batches (see ``eval_dataset``)."""
  return eval_dataset(split, image_transform(d, train=False), batch_size=d.eval_batch_size,
                      num_workers=d.num_workers, num_threads=d.num_threads,
                      prefetch=d.prefetch, process_index=process_index,
                      process_count=process_count)


__all__ = [
    "Dataset", "DataError", "GlobalBatches", "ImageFiles", "ImageReadError",
    "ImageTransform", "PKSampler", "RandomSampler", "SAMPLERS", "Split", "check_small_classes",
    "decode", "eval_batches", "eval_dataset", "image_transform", "load_dataset",
    "make_sampler", "make_split", "normalize", "small_classes", "to_global", "train_batches",
    "train_dataset", "with_validation",
]
