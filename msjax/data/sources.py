"""``config.data`` → the dataset's splits, from whichever source the config names."""

from __future__ import annotations

from msjax import config as config_lib
from msjax.data.records import Dataset, DataError, with_validation


def load_dataset(d) -> Dataset:
  """Loads ``config.data``'s dataset: records only; no image is read.

  ``d.dataset`` picks the source: a benchmark (``cub``, ``cars``, ``sop``, ``inshop``)
  in its real layout under ``d.root`` (``d.format="files"``) or from the TFDS
  ``data_dir`` ``d.root`` (``d.format="tfds"``); ``folder`` (a directory per class under
  ``d.root``); or ``synthetic`` (generated, no files). ``d.val_fraction`` moves the last
  training classes to a validation split.
  """
  config_lib.check_data_config(d)
  if d.dataset == "synthetic":
    from msjax.data.synthetic import load_synthetic
    dataset = load_synthetic(**d.synthetic.to_dict())
  elif d.dataset == "folder":
    from msjax.data.folder import load_folder
    dataset = load_folder(d.root, train_fraction=d.train_fraction)
  elif d.format == "tfds":
    from msjax.data.tfds_source import load_tfds
    dataset = load_tfds(d.dataset, d.root)
  else:
    from msjax.data.benchmarks import LOADERS
    dataset = LOADERS[d.dataset](d.root)
  return with_validation(dataset, d.val_fraction)


def small_classes(split, k: int):
  """Classes of ``split`` with fewer than ``k`` images: ``[(class name, count), ...]``."""
  sizes = split.class_sizes()
  return [(split.class_names[c], int(sizes[c])) for c in range(len(sizes)) if sizes[c] < k]


def check_small_classes(split, d):
  """Refuses classes with fewer than K images unless ``d.pad_small_classes``."""
  small = small_classes(split, d.images_per_class)
  if small and not d.pad_small_classes:
    listed = ", ".join(f"{name} ({n})" for name, n in small[:5])
    raise DataError(
        f"{len(small)} training classes have fewer than data.images_per_class="
        f"{d.images_per_class} images (first: {listed}). Lower data.images_per_class, "
        "or set data.pad_small_classes=True to draw their images with replacement (as the "
        "released MS sampler does).")
  return small


__all__ = ["load_dataset", "small_classes", "check_small_classes", "DataError"]
