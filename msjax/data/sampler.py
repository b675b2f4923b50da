"""Training samplers: batch ``i`` of a training run is a pure function of ``(seed, i)``.

``PKSampler`` (the pair losses' default, ``config.data.sampler="pk"``):

A batch holds ``P`` classes, none twice, with ``K`` images each, class after class
(``[c0 × K, c1 × K, ...]``). Classes are dealt in epochs: epoch ``e`` is a permutation
of all training classes (drawn from ``(seed, e)``) cut into ``C // P`` batches of ``P``;
the ``C mod P`` classes left at its end sit that epoch out, different ones each epoch.
So every class appears once per epoch but for that remainder, and no bookkeeping
carries over from one batch to the next: resuming at step ``i`` gives exactly the
batches an uninterrupted run would, on any number of processes.

Within a class, ``K`` images are drawn without replacement (from ``(seed, i)``); a class
with fewer than ``K`` images is drawn with replacement, as the released MS sampler pads.

``RandomSampler`` (``config.data.sampler="random"``; proxy losses need no P×K structure,
and the Proxy-Anchor release trains on plain shuffled batches): epoch ``e`` is a
permutation of every image (drawn from ``(seed, e)``) cut into batches of ``B``; the
``N mod B`` images left at its end sit that epoch out (PyTorch's ``drop_last``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msjax.data.records import DataError

# Distinct streams of the seed: class permutations, image draws, augmentation.
CLASS_STREAM, IMAGE_STREAM, AUGMENT_STREAM = 0, 1, 2


def stream_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  """A NumPy generator that is a pure function of ``(seed, stream, *keys)``."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, stream, *map(int, keys)])


class _ProcessSlices:
  """What every sampler shares: each process's contiguous slice of the global batch."""

  batch_size: int

  def batch(self, step: int) -> np.ndarray:
    raise NotImplementedError

  def process_batch(self, step: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous slice of batch ``step``.

    The processes' slices are disjoint and, concatenated in process order, form the
    global batch exactly (the layout ``jax.make_array_from_process_local_data`` expects).
    """
    b = self.batch_size
    if b % process_count:
      raise DataError(f"the batch of {b} images does not split evenly over "
                      f"{process_count} processes; choose a batch size divisible by "
                      f"{process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    per = b // process_count
    return self.batch(step)[process_index * per:(process_index + 1) * per]


def _check_step(step: int):
  if step < 0:
    raise ValueError(f"step must be ≥ 0; got {step}.")


@dataclasses.dataclass(frozen=True, eq=False)
class PKSampler(_ProcessSlices):
  """Deterministic P×K batches of image indices into a split.

  Attributes:
    labels: the split's labels, ``int [N]`` in ``0..C-1``.
    classes_per_batch: ``P``; at most the number of classes.
    images_per_class: ``K``.
    seed: the run's data seed.
  """

  labels: np.ndarray
  classes_per_batch: int
  images_per_class: int
  seed: int = 0

  def __post_init__(self):
    labels = np.asarray(self.labels)
    p, k = self.classes_per_batch, self.images_per_class
    if p < 1 or k < 1:
      raise DataError(f"a P×K batch needs P ≥ 1 classes and K ≥ 1 images per class; got "
                      f"P={p}, K={k} (data.classes_per_batch, data.images_per_class).")
    classes = np.unique(labels)
    if len(classes) < p:
      raise DataError(f"data.classes_per_batch={p} but the training split has only "
                      f"{len(classes)} classes; lower data.classes_per_batch.")
    # Image indices of each class, in index order, as one array plus offsets.
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=labels.max(initial=-1) + 1)
    object.__setattr__(self, "_classes", classes)
    object.__setattr__(self, "_order", order)
    object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(counts)]))
    object.__setattr__(self, "_cache", {})

  @property
  def batch_size(self) -> int:
    return self.classes_per_batch * self.images_per_class

  @property
  def batches_per_epoch(self) -> int:
    """Batches per pass over the classes; each class appears at most once per epoch."""
    return len(self._classes) // self.classes_per_batch

  def epoch_classes(self, epoch: int) -> np.ndarray:
    """The class order of ``epoch`` (the last one is cached: consecutive steps share it)."""
    cached = self._cache.get("epoch")
    if cached is not None and cached[0] == epoch:
      return cached[1]
    perm = stream_rng(self.seed, CLASS_STREAM, epoch).permutation(self._classes)
    self._cache["epoch"] = (epoch, perm)
    return perm

  def batch_classes(self, step: int) -> np.ndarray:
    """The ``P`` distinct classes of batch ``step``."""
    _check_step(step)
    epoch, j = divmod(step, self.batches_per_epoch)
    p = self.classes_per_batch
    return self.epoch_classes(epoch)[j * p:(j + 1) * p]

  def batch(self, step: int) -> np.ndarray:
    """Image indices ``int64 [P*K]`` of batch ``step``: class-major, ``K`` per class."""
    cached = self._cache.get("batch")
    if cached is not None and cached[0] == step:
      return cached[1]
    rng = stream_rng(self.seed, IMAGE_STREAM, step)
    k = self.images_per_class
    out = np.empty(self.batch_size, np.int64)
    for n, c in enumerate(self.batch_classes(step)):
      members = self._order[self._starts[c]:self._starts[c + 1]]
      out[n * k:(n + 1) * k] = rng.choice(members, size=k, replace=len(members) < k)
    self._cache["batch"] = (step, out)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class RandomSampler(_ProcessSlices):
  """Deterministic batches of ``batch_size`` images drawn without replacement per epoch.

  Attributes:
    labels: the split's labels (only their number matters).
    batch_size: ``B``; at most the number of images.
    seed: the run's data seed.
  """

  labels: np.ndarray
  batch_size: int
  seed: int = 0

  def __post_init__(self):
    n = len(np.asarray(self.labels))
    if not 1 <= self.batch_size <= n:
      raise DataError(f"a random batch of {self.batch_size} images needs 1 ≤ B ≤ {n}, the "
                      "training split's size; lower data.classes_per_batch × "
                      "data.images_per_class.")
    object.__setattr__(self, "_cache", {})

  @property
  def batches_per_epoch(self) -> int:
    return len(self.labels) // self.batch_size

  def batch(self, step: int) -> np.ndarray:
    """Image indices ``int64 [B]`` of batch ``step``."""
    _check_step(step)
    epoch, j = divmod(step, self.batches_per_epoch)
    cached = self._cache.get("epoch")
    if cached is None or cached[0] != epoch:
      cached = (epoch, stream_rng(self.seed, CLASS_STREAM, epoch).permutation(
          len(self.labels)).astype(np.int64))
      self._cache["epoch"] = cached
    return cached[1][j * self.batch_size:(j + 1) * self.batch_size]


SAMPLERS = ("pk", "random")


def make_sampler(name: str, labels, *, classes_per_batch: int, images_per_class: int,
                 seed: int):
  """``config.data.sampler``'s sampler; the batch holds P×K images either way."""
  if name == "pk":
    return PKSampler(labels, classes_per_batch, images_per_class, seed=seed)
  if name == "random":
    return RandomSampler(labels, classes_per_batch * images_per_class, seed=seed)
  raise DataError(f"config.data.sampler={name!r}; choose one of {SAMPLERS}.")
