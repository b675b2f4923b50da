"""The loss over the global batch, computed where the batch is sharded across devices.

Inside ``jax.shard_map`` over a batch axis of n devices, each device holds ``B/n``
embeddings. It gathers every embedding and label of the global batch, and computes the
similarity rows of its own anchors only (``[B/n, B]``, never a replicated ``[B, B]``)
with the rectangular form of the loss, normalised by the global ``B``. The shares add up
(``psum``) to the single-device loss of the whole batch. Gradients flow through the
gathered copies as well (the transpose of the gather sums every device's column
gradients back onto the rows' owners), so the sharded gradient equals the single-device
one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.losses.embeddings import pair_loss_from_embeddings


def global_batch_loss(emb, labels, *, axis_name, loss="ms", block_size=None,
                      precision=jax.lax.Precision.HIGHEST, **hparams):
  """The global-batch pair loss from one device's shard, for use inside ``shard_map``.

  Args:
    emb: ``[B/n, D]`` this device's embeddings (its contiguous slice of the batch).
    labels: ``[B/n]`` their labels.
    axis_name: the mesh axis the batch is sharded over (a name or a tuple of names).
    loss, block_size, precision, **hparams: as in ``pair_loss_from_embeddings``.

  Returns:
    The loss of the whole global batch (the ``psum`` of every device's share), the same
    value on every device.
  """
  local = emb.shape[0]
  all_emb = jax.lax.all_gather(emb, axis_name, tiled=True)
  all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  anchor_index = jax.lax.axis_index(axis_name) * local + jnp.arange(local, dtype=jnp.int32)
  share = pair_loss_from_embeddings(
      emb, labels, loss=loss, ref_emb=all_emb, ref_labels=all_labels,
      anchor_index=anchor_index, block_size=block_size, batch_size=all_emb.shape[0],
      precision=precision, **hparams)
  return jax.lax.psum(share, axis_name)
