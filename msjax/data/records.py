"""What every dataset source produces: splits of (image reference, integer label).

A source (the four benchmarks in their real layouts or in TFDS, a class-per-directory
folder, the procedural synthetic set) returns a ``Dataset``: a training split and the
evaluation split(s) of the class-disjoint retrieval protocol. Images are not read here;
a split holds an ``ImageSource`` that the pipeline's workers read from, so a split is
small and pickles cheaply into worker processes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol, Sequence

import numpy as np


class DataError(ValueError):
  """Bad dataset input (a missing root, a malformed metadata file, unreadable images).

  The message names the file or value that is wrong and how to fix it.
  """


class ImageSource(Protocol):
  """Random access to a split's images (picklable: workers receive a copy)."""

  def __len__(self) -> int: ...

  def read(self, index: int) -> bytes | np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) or a decoded ``uint8 [H, W, 3]`` array."""

  def describe(self, index: int) -> str:
    """Where image ``index`` comes from (a path), for error messages."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
  """Images stored as files: ``paths`` relative to ``root``."""

  root: str
  paths: Sequence[str]

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, index: int) -> bytes:
    with open(self.describe(index), "rb") as f:
      return f.read()

  def describe(self, index: int) -> str:
    return os.path.join(self.root, self.paths[index])

  def subset(self, indices: np.ndarray) -> "ImageFiles":
    return ImageFiles(self.root, [self.paths[i] for i in indices])


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split: ``len(images)`` images, each with a label in ``0..num_classes-1``.

  Attributes:
    name: ``"train"``, ``"val"``, ``"test"``, or In-Shop's ``"query"``/``"gallery"``.
    images: random access to the images, in the order of ``labels``.
    labels: ``int32 [N]``; label ``c`` is the class named ``class_names[c]``.
    class_names: the dataset's own class identifiers (ids, folder paths, item ids).
  """

  name: str
  images: ImageSource
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    labels = np.asarray(self.labels)
    if len(labels) != len(self.images):
      raise ValueError(f"split {self.name!r}: {len(self.images)} images but "
                       f"{len(labels)} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
      raise ValueError(f"split {self.name!r}: labels must lie in [0, "
                       f"{len(self.class_names)}).")
    object.__setattr__(self, "labels", labels.astype(np.int32))

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def class_sizes(self) -> np.ndarray:
    return np.bincount(self.labels, minlength=self.num_classes)

  def summary(self) -> dict:
    """Images, classes and images per class (min/median/max), as ``check`` prints."""
    sizes = self.class_sizes()
    if not sizes.size:
      sizes = np.zeros(1, int)
    return {"images": int(len(self)), "classes": int(self.num_classes),
            "images_per_class": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                 "max": int(sizes.max())}}


def make_split(name: str, images: ImageSource, class_ids: Sequence, class_names=None) -> Split:
  """A split whose labels are ``class_ids`` renumbered to ``0..C-1`` in sorted id order."""
  class_ids = np.asarray(class_ids)
  names, labels = np.unique(class_ids, return_inverse=True)
  if class_names is None:
    class_names = tuple(str(n) for n in names)
  return Split(name, images, labels.reshape(-1), tuple(class_names))


@dataclasses.dataclass(frozen=True, eq=False)
class SubsetImages:
  """The images ``indices`` of another source (for splits cut from a bigger one)."""

  source: ImageSource
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, index: int):
    return self.source.read(int(self.indices[index]))

  def describe(self, index: int) -> str:
    return self.source.describe(int(self.indices[index]))


def select_classes(split: Split, classes: np.ndarray, name: str) -> Split:
  """The images of ``split`` whose label is in ``classes``, relabelled ``0..len-1``."""
  classes = np.asarray(sorted(classes))
  keep = np.flatnonzero(np.isin(split.labels, classes))
  images = (split.images.subset(keep) if isinstance(split.images, ImageFiles)
            else SubsetImages(split.images, keep))
  labels = np.searchsorted(classes, split.labels[keep])
  return Split(name, images, labels, tuple(split.class_names[c] for c in classes))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A retrieval benchmark's splits.

  Attributes:
    name: the source (``"cub"``, ``"cars"``, ``"sop"``, ``"inshop"``, ``"folder"``,
      ``"synthetic"``).
    train: the training classes.
    test: the evaluation queries; they search each other (a query never finds itself)
      unless ``gallery`` is set.
    gallery: In-Shop's gallery, which the queries search instead of each other.
    val: validation classes carved out of the training classes (``with_validation``),
      evaluated like ``test`` without a gallery, for model selection without test data.
  """

  name: str
  train: Split
  test: Split
  gallery: Split | None = None
  val: Split | None = None

  def splits(self) -> dict[str, Split]:
    out = {"train": self.train}
    if self.val is not None:
      out["val"] = self.val
    if self.gallery is None:
      out["test"] = self.test
    else:
      out["query"], out["gallery"] = self.test, self.gallery
    return out


def with_validation(dataset: Dataset, fraction: float) -> Dataset:
  """Moves the last ``fraction`` of the training classes (in class order) to ``val``.

  Model selection on the test classes overstates results ("A Metric Learning Reality
  Check", Musgrave et al. 2020); a class-disjoint validation split avoids it. The choice
  is by class order, so it is the same on every run and every process.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"data.val_fraction must lie in [0, 1); got {fraction}.")
  if fraction == 0.0:
    return dataclasses.replace(dataset, val=None)
  c = dataset.train.num_classes
  n_val = int(round(c * fraction))
  if n_val < 2 or c - n_val < 2:
    raise DataError(f"data.val_fraction={fraction} of {c} training classes leaves "
                    f"{c - n_val} to train on and {n_val} to validate on; both need at "
                    "least 2. Change data.val_fraction.")
  train = select_classes(dataset.train, np.arange(c - n_val), "train")
  val = select_classes(dataset.train, np.arange(c - n_val, c), "val")
  return dataclasses.replace(dataset, train=train, val=val)
