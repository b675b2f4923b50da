"""The training and evaluation input pipelines (grain).

Training: step ``i`` → this process's slice of batch ``i`` (``PKSampler``, ``RandomSampler``),
decoded and augmented in worker processes, prefetched, and assembled into one global
``jax.Array`` sharded over the mesh's batch axis. Augmentation randomness is a pure
function of ``(seed, step, position in the global batch)``, so a batch does not depend
on the number of processes or workers, and resuming (from the iterator's state or from
a step) reproduces an uninterrupted run.

Evaluation: every image of a split exactly once, in order; the last batch is padded
with blank images whose ``mask`` is False.

With ``skip_unreadable`` (``python -m msjax.embed``), an image that cannot be read,
decoded or cropped does not stop the pipeline: it is left blank with ``mask`` False, like
padding, and ``unreadable_reason`` says why.

Batches are dicts of NumPy arrays per process: ``image`` ``uint8 [b, S, S, 3]`` (RGB;
``transforms.normalize`` applies the backbone's convention on the device), ``label``
``int32 [b]``, ``index`` ``int64 [b]`` (the image's index in the split; -1 on padding)
and, for evaluation, ``mask`` ``bool [b]`` (False on padding and skipped images, whose
label is -1).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from absl import flags
import grain
import jax
import numpy as np
from jax.sharding import Mesh

from msjax.data.records import DataError, Split
from msjax.data.sampler import AUGMENT_STREAM, PKSampler, RandomSampler, stream_rng
from msjax.data.transforms import ImageReadError, ImageTransform
from msjax.sharding import batch_sharded


def _load(split: Split, transform: ImageTransform, index: int, rng=None) -> np.ndarray:
  """Image ``index`` of ``split``, transformed; a missing file is named, not traced."""
  where = split.images.describe(index)
  try:
    data = split.images.read(index)
  except OSError as e:
    raise ImageReadError(f"cannot read image {where}: {e.strerror or e}. Restore the file "
                         "or run python -m msjax.data check to list every missing "
                         "image.",
                         reason=f"cannot read the file: {e.strerror or e}") from None
  return transform(data, where, rng)


def unreadable_reason(split: Split, transform: ImageTransform, index: int) -> str | None:
  """Why image ``index`` of ``split`` cannot go through ``transform``; None if it can.

  The reason names what is wrong with the file, not its path: it cannot be read, it is
  not an image PIL decodes (a text file named ``.png``, a truncated JPEG), or it is
  smaller than the center crop of a config without a resize.
  """
  try:
    _load(split, transform, index)
  except ImageReadError as e:
    return e.reason
  except DataError as e:  # the crop does not fit the image
    return str(e)
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
  """Step → this process's part of the P×K batch (runs in the workers)."""

  split: Split
  sampler: PKSampler | RandomSampler
  transform: ImageTransform
  seed: int
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict:
    step = int(step)
    indices = self.sampler.process_batch(step, self.process_index, self.process_count)
    offset = self.process_index * len(indices)  # position in the global batch
    images = np.stack([
        _load(self.split, self.transform, int(i),
              stream_rng(self.seed, AUGMENT_STREAM, step, offset + n))
        for n, i in enumerate(indices)])
    return {"image": images, "label": self.split.labels[indices], "index": indices}


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatch:
  """Batch number → this process's part of it, padded past the end of the split."""

  split: Split
  transform: ImageTransform
  global_batch_size: int
  process_index: int
  process_count: int
  skip_unreadable: bool = False

  def __call__(self, b: int) -> dict:
    local = self.global_batch_size // self.process_count
    start = int(b) * self.global_batch_size + self.process_index * local
    indices = np.arange(start, start + local)
    present = indices < len(self.split)
    mask = present.copy()
    s = self.transform.image_size
    images = np.zeros((local, s, s, 3), np.uint8)
    for n in np.flatnonzero(present):
      try:
        images[n] = _load(self.split, self.transform, int(indices[n]))
      except DataError:
        if not self.skip_unreadable:
          raise
        mask[n] = False  # unreadable_reason(...) says why, outside the workers
    labels = np.where(mask, self.split.labels[np.minimum(indices, len(self.split) - 1)], -1)
    return {"image": images, "label": labels.astype(np.int32),
            "index": np.where(present, indices, -1), "mask": mask}


def _check_processes(batch_size: int, process_index: int | None, process_count: int | None):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise DataError(f"the global batch of {batch_size} images does not split evenly over "
                    f"{process_count} processes; choose a multiple of {process_count}.")
  return process_index, process_count


def _iterate(dataset: grain.MapDataset, num_workers: int, num_threads: int,
             prefetch: int) -> grain.IterDataset:
  # Threads build batches in parallel within a process (PIL releases the GIL while
  # decoding and resizing); worker processes take whole batches round-robin, so the
  # order of batches is the dataset's order for any number of workers.
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(num_threads, 1),
                                                 prefetch_buffer_size=max(prefetch, 1)))
  if num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks) nothing
    # has parsed them, so their defaults are taken as parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(prefetch, 1)))
  return ds


def train_dataset(split: Split, sampler: PKSampler | RandomSampler, transform: ImageTransform, *,
                  num_steps: int, seed: int, start_step: int = 0, num_workers: int = 0,
                  num_threads: int = 2, prefetch: int = 2, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """This process's training batches for steps ``start_step .. num_steps-1``.

  Iterating it yields dicts (``image``, ``label``, ``index``) of ``P*K / process_count``
  images: this process's contiguous slice of each global P×K batch. The iterator's
  ``get_state``/``set_state`` checkpoint its position; starting at ``start_step`` gives
  the same batches as iterating from 0 and skipping ``start_step``.

  Args:
    split: the training split.
    sampler: the P×K (or random) sampler over ``split.labels``.
    transform: the training transform (``ImageTransform(train=True)``).
    num_steps: the training run's length (the dataset ends there).
    seed: the augmentation seed (the sampler has its own).
    num_workers: worker processes decoding and augmenting (0: in this process).
    num_threads: threads per worker, each building a batch.
    prefetch: batches buffered per worker.
  """
  if len(sampler.labels) != len(split):
    raise ValueError("the sampler was built for another split.")
  if not 0 <= start_step <= num_steps:
    raise ValueError(f"start_step {start_step} not in [0, num_steps={num_steps}].")
  process_index, process_count = _check_processes(sampler.batch_size, process_index,
                                                  process_count)
  load = _TrainBatch(split, sampler, transform, seed, process_index, process_count)
  return _iterate(grain.MapDataset.range(start_step, num_steps).map(load),
                  num_workers, num_threads, prefetch)


def eval_dataset(split: Split, transform: ImageTransform, *, batch_size: int,
                 num_workers: int = 0, num_threads: int = 2, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_unreadable: bool = False) -> grain.IterDataset:
  """Every image of ``split`` once, in order, in global batches of ``batch_size``.

  Each process gets its contiguous slice of every global batch; the last batch is
  padded (blank images, label -1, ``mask`` False), so every batch has the same shape
  and compiles once. An image that cannot be loaded raises ``ImageReadError`` (or the
  crop's ``DataError``), unless ``skip_unreadable``: then it is blank with label -1 and
  ``mask`` False, its ``index`` kept, so a caller can tell it from padding and list it.
  """
  if transform.train:
    raise ValueError("evaluation takes a deterministic transform (train=False).")
  if batch_size < 1:
    raise DataError(f"the eval batch size must be positive; got {batch_size}.")
  process_index, process_count = _check_processes(batch_size, process_index, process_count)
  num_batches = -(-len(split) // batch_size)
  load = _EvalBatch(split, transform, batch_size, process_index, process_count,
                    skip_unreadable)
  return _iterate(grain.MapDataset.range(num_batches).map(load),
                  num_workers, num_threads, prefetch)


def to_global(batch: dict, mesh: Mesh, batch_axis=None) -> dict:
  """This process's slice of a batch → global ``jax.Array``s sharded over the batch axis.

  Every process passes its own slice (in process order they form the global batch);
  ``index`` stays on the host.
  """
  sharding = batch_sharded(mesh, batch_axis)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if k != "index"}


class GlobalBatches:
  """Iterates a pipeline as global sharded batches; checkpointable like its iterator.

  ``get_state()``/``set_state()`` are the grain iterator's (a small dict, JSON-able), so
  an orbax checkpoint can store where the input stream stands.
  """

  def __init__(self, dataset: grain.IterDataset, mesh: Mesh, batch_axis=None):
    self._iterator = iter(dataset)
    self._mesh, self._axis = mesh, batch_axis

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return to_global(next(self._iterator), self._mesh, self._axis)

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)

  def close(self):
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
