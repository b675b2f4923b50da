"""The P×K sampler: batch ``i`` of a training run is a pure function of ``(seed, i)``.

A batch holds ``P`` classes, none twice, with ``K`` images each, class after class
(``[c0 × K, c1 × K, ...]``). Classes are dealt in epochs: epoch ``e`` is a permutation
of all training classes (drawn from ``(seed, e)``) cut into ``C // P`` batches of ``P``;
the ``C mod P`` classes left at its end sit that epoch out, different ones each epoch.
So every class appears once per epoch but for that remainder, and no bookkeeping
carries over from one batch to the next: resuming at step ``i`` gives exactly the
batches an uninterrupted run would, on any number of processes.

Within a class, ``K`` images are drawn without replacement (from ``(seed, i)``); a class
with fewer than ``K`` images is drawn with replacement, as the released MS sampler pads.
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


@dataclasses.dataclass(frozen=True, eq=False)
class PKSampler:
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
    if step < 0:
      raise ValueError(f"step must be ≥ 0; got {step}.")
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

  def process_batch(self, step: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous slice of batch ``step``.

    The processes' slices are disjoint and, concatenated in process order, form the
    global batch exactly (the layout ``jax.make_array_from_process_local_data`` expects).
    """
    b = self.batch_size
    if b % process_count:
      raise DataError(f"the batch of P×K = {b} images does not split evenly over "
                      f"{process_count} processes; choose P×K divisible by "
                      f"{process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    per = b // process_count
    return self.batch(step)[process_index * per:(process_index + 1) * per]
