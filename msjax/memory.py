"""Cross-batch memory (XBM) for every pair loss (Wang, Zhang, Huang & Scott, CVPR 2020).

The released algorithm, at every training step after a warm-up of ``start_step`` steps:

1. enqueue the current global batch's embeddings (no gradient) and labels into a ring
   buffer of the last ``M`` entries, dropping the oldest;
2. ``loss = L(batch, batch) + weight · L(batch anchors, memory)``, where the memory term
   is the rectangular form of the same pair loss (anchors are the batch, references the
   memory) and its gradient flows through the anchors only.

The batch's own, freshly enqueued copies are in the memory, so each anchor meets itself
there. The released code drops that pair by value (a positive with ``S >= 1 − 1e-5``);
msjax drops it by index as well (``self_pair="both"``; the anchor's slot is known), which
is the same pair in float32 and stays right when the memory stores bfloat16 copies, whose
similarity to their anchor is only ``1 ± 4e-3``. A loss configured with
``self_pair="index"`` drops it by index only. Before the memory is full only the filled
slots count: an empty slot is neither a positive nor a negative (``ref_valid``).

Where msjax and the released code differ, and why:

- The ring buffer wraps slot by slot and always holds exactly the last ``M`` entries. The
  released queue writes a batch that does not fit before the end into the *last* ``B``
  slots, overwriting part of the previous batch, and restarts at slot 0. It also leaves
  its pointer at ``M`` after a batch that ends at the last slot, so the next batch
  overwrites that newest batch instead of the oldest: from the first wrap on it is not a
  first-in-first-out queue, even when ``M`` is a multiple of the batch.
- The fill level is a counter. The released ``is_full`` tests whether the last slot's
  label is non-zero, which is wrong for a dataset whose class 0 lands there.

``Memory`` is a pytree of arrays, so it lives in the train state and is checkpointed and
resumed with it. In sharded training (``global_xbm_loss`` inside ``jax.shard_map``) every
device holds the same memory: each device computes only its own anchors' ``[B/n, M]``
rows against it, and the enqueue writes the gathered global batch, so the memories stay
identical by construction.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from msjax import losses
from msjax.losses import embeddings as embeddings_lib

DTYPES = ("float32", "bfloat16")


class Memory(NamedTuple):
  """The last ``M`` embeddings and labels seen in training, as a ring buffer."""

  embeddings: jax.Array  # [M, D] in the storage dtype (float32 or bfloat16)
  labels: jax.Array  # [M] int32
  pointer: jax.Array  # int32 scalar: the slot the next entry goes to
  filled: jax.Array  # int32 scalar: slots holding an entry (M once full)

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]


def create(size: int, dim: int, dtype=jnp.float32) -> Memory:
  """An empty memory of ``size`` slots of ``dim``-dimensional embeddings."""
  if not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(f"msjax.memory.create: `size` must be a positive int, got {size!r}.")
  return Memory(jnp.zeros((size, dim), dtype), jnp.zeros((size,), jnp.int32),
                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def valid(memory: Memory) -> jax.Array:
  """``[M]`` booleans: which slots hold an entry."""
  return jnp.arange(memory.size) < memory.filled


def slots(memory: Memory, count: int) -> jax.Array:
  """The slots the next ``count`` entries are written to, in order."""
  return (memory.pointer + jnp.arange(count, dtype=jnp.int32)) % memory.size


def enqueue(memory: Memory, emb, labels) -> Memory:
  """Writes ``emb`` ``[B, D]`` and ``labels`` ``[B]`` over the oldest ``B`` entries.

  ``B`` may not exceed the memory size (a batch would overwrite itself). The embeddings
  are stored in the memory's dtype, with no gradient.
  """
  emb, labels = jnp.asarray(emb), jnp.asarray(labels)
  count = emb.shape[0]
  if count > memory.size:
    raise ValueError(f"msjax.memory.enqueue: a batch of {count} does not fit in a memory "
                     f"of {memory.size}; the memory must hold at least one global batch.")
  if emb.shape[1:] != memory.embeddings.shape[1:] or labels.shape != (count,):
    raise ValueError(f"msjax.memory.enqueue: got embeddings {emb.shape} and labels "
                     f"{labels.shape} for a memory of {memory.embeddings.shape}.")
  index = slots(memory, count)
  stored = jax.lax.stop_gradient(emb).astype(memory.embeddings.dtype)
  return Memory(memory.embeddings.at[index].set(stored, unique_indices=True),
                memory.labels.at[index].set(labels.astype(jnp.int32), unique_indices=True),
                (memory.pointer + count) % memory.size,
                jnp.minimum(memory.filled + count, memory.size))


def memory_self_pair(self_pair: str | None, loss: str = "ms") -> str:
  """The self-pair rule of the memory term for ``loss`` configured with ``self_pair``
  (``None``: the loss's own default, ``"index"`` for SupCon, ``"value"`` for the rest)."""
  if self_pair is None:
    self_pair = losses.hparam_defaults(loss).get("self_pair", "value")
  return "index" if self_pair == "index" else "both"


def memory_loss(emb, labels, memory: Memory, *, anchor_slots, loss="ms", batch_size=None,
                block_size=None, precision=jax.lax.Precision.HIGHEST, **hparams):
  """``L(anchors, memory)``: the pair loss of ``emb`` against the memory's filled slots.

  Args:
    emb: ``[Bq, D]`` anchor embeddings; the gradient flows through them only.
    labels: ``[Bq]`` their labels.
    memory: the memory, with the anchors' own copies already enqueued.
    anchor_slots: ``[Bq]`` the slot holding each anchor's own copy (``-1`` for none).
    loss, batch_size, block_size, precision, **hparams: as in
      ``msjax.losses.pair_loss_from_embeddings``; ``block_size`` evaluates the anchors
      in row blocks of that many rows (peak O(block_size × M)), which is what lets a
      memory of 1,000,000 × 512 train on one host.

  Returns:
    The scalar memory term (divided by ``batch_size``, default ``Bq``).
  """
  hparams["self_pair"] = memory_self_pair(hparams.get("self_pair"), loss)
  return embeddings_lib.pair_loss_from_embeddings(
      emb, labels, loss=loss, ref_emb=memory.embeddings, ref_labels=memory.labels,
      anchor_index=jnp.asarray(anchor_slots, jnp.int32), ref_valid=valid(memory),
      ref_grad=False, block_size=block_size, batch_size=batch_size, precision=precision,
      **hparams)


class XBMLoss(NamedTuple):
  """What one step's XBM loss returns besides its gradient."""

  total: jax.Array  # batch + weight · memory, the value that is differentiated
  batch: jax.Array  # L(batch, batch)
  memory: jax.Array  # L(batch anchors, memory); 0 before start
  new_memory: Memory  # after this step's enqueue (unchanged before start)


def global_xbm_loss(emb, labels, memory: Memory, active, *, axis_name, weight=1.0,
                    loss="ms", block_size=None, memory_block_size=None,
                    precision=jax.lax.Precision.HIGHEST, **hparams) -> XBMLoss:
  """One XBM step's loss over the global batch, from one device's shard (in ``shard_map``).

  Args:
    emb: ``[B/n, D]`` this device's embeddings (its contiguous slice of the batch).
    labels: ``[B/n]`` their labels.
    memory: the memory before this step, the same on every device (replicated).
    active: boolean scalar; False (the warm-up) leaves the memory alone and adds nothing.
    axis_name: the mesh axis the batch is sharded over.
    weight: the memory term's weight.
    loss, block_size, precision, **hparams: the pair loss, as in ``global_batch_loss``;
      ``memory_block_size`` is the row block of the memory term.

  Returns:
    ``XBMLoss``; every field is the same on every device.
  """
  local = emb.shape[0]
  all_emb = jax.lax.all_gather(emb, axis_name, tiled=True)
  all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  anchor_index = jax.lax.axis_index(axis_name) * local + jnp.arange(local, dtype=jnp.int32)
  batch_size = all_emb.shape[0]
  batch_share = embeddings_lib.pair_loss_from_embeddings(
      emb, labels, loss=loss, ref_emb=all_emb, ref_labels=all_labels,
      anchor_index=anchor_index, block_size=block_size, batch_size=batch_size,
      precision=precision, **hparams)
  dtype = batch_share.dtype
  # The enqueued copies carry no gradient, and every device writes the same ones: an
  # invariant gather, so the memory provably stays replicated.
  enqueued = [jax.lax.all_gather(jax.lax.stop_gradient(x), axis_name, tiled=True,
                                 to="invarying") for x in (emb, labels)]

  def with_memory(memory):
    updated = enqueue(memory, *enqueued)
    own_slots = slots(memory, batch_size)[anchor_index]
    share = memory_loss(emb, labels, updated, anchor_slots=own_slots, loss=loss,
                        batch_size=batch_size, block_size=memory_block_size,
                        precision=precision, **hparams)
    return jax.lax.psum(share.astype(dtype), axis_name), updated

  def warm_up(memory):
    return jnp.zeros((), dtype), memory

  memory_value, new_memory = jax.lax.cond(active, with_memory, warm_up, memory)
  batch_value = jax.lax.psum(batch_share, axis_name)
  return XBMLoss(batch_value + weight * memory_value, batch_value, memory_value, new_memory)


def sharded_xbm_loss(mesh, axis_name, **kwargs):
  """``global_xbm_loss`` under ``jax.shard_map`` over ``mesh``: ``(emb, labels, memory,
  active) -> XBMLoss``, the embeddings and labels sharded over ``axis_name``, the memory
  and the switch replicated in, every field of ``XBMLoss`` replicated out. ``kwargs``
  are ``global_xbm_loss``'s (the loss, its hyper-parameters, ``weight``, block sizes)."""
  batch, replicated = PartitionSpec(axis_name), PartitionSpec()
  return jax.shard_map(functools.partial(global_xbm_loss, axis_name=axis_name, **kwargs),
                       mesh=mesh, in_specs=(batch, batch, replicated, replicated),
                       out_specs=replicated)


def check_config(size: int, start_step: int, weight: float, dtype: str, block_size: int, *,
                 global_batch: int, num_steps: int) -> list[str]:
  """What is wrong with an XBM configuration, as messages naming ``config.xbm`` fields."""
  problems = []
  if not isinstance(size, numbers.Integral) or size < global_batch:
    problems.append(
        f"config.xbm.size={size} is smaller than the global batch of {global_batch}; the "
        "memory must hold at least one batch (the XBM paper's SOP recipe keeps 55,000).")
  if not isinstance(start_step, numbers.Integral) or not 0 <= start_step < num_steps:
    problems.append(
        f"config.xbm.start_step={start_step} must be in [0, config.train.num_steps="
        f"{num_steps}): the memory starts after that many steps, so a later start never "
        "uses it.")
  if not float(weight) > 0:
    problems.append(f"config.xbm.weight={weight} must be > 0 (disable the memory with "
                    "config.xbm.enabled=False instead).")
  if dtype not in DTYPES:
    problems.append(f"config.xbm.dtype={dtype!r}; choose one of {DTYPES}.")
  if int(block_size) < 0:
    problems.append(f"config.xbm.block_size={block_size} must be ≥ 0 (0: one block).")
  return problems
