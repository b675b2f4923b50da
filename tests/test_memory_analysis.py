"""``analysis.memory_weights`` and ``plot.memory_figure``: a batch's pair weights with a
cross-batch memory are the memory term's, split into the batch's copies and the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax import analysis, losses, memory, plot
from batches import make_batch

MS = analysis.DEFAULT_HPARAMS["ms"]


def _batch_and_memory(batches=3, seed=0, spread=2.0):
  """``(emb [24, 16], labels, old [24·batches, 16], old_labels)``: a batch of 24 of 48
  images of 12 classes, and ``batches`` earlier batches of 24 drawn from the same images,
  slightly moved (an embedding that drifts), oldest first; so the memory holds positives
  and negatives of every anchor."""
  emb, labels = make_batch("pk", 12, 4, 16, seed=seed, spread=spread)
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(48)[:24] for _ in range(batches + 1)]
  old = emb[np.concatenate(rows[1:] + [rows[0][:0]])]
  old = old + 0.05 * rng.normal(size=old.shape)
  old /= np.linalg.norm(old, axis=1, keepdims=True)
  return emb[rows[0]], labels[rows[0]], old, labels[np.concatenate(rows[1:] + [rows[0][:0]])]


def test_memory_term_is_the_rectangular_ms_weights_with_numpy_masks():
  emb, labels, old, old_labels = _batch_and_memory()
  b, n = len(labels), len(old_labels)
  got = analysis.memory_weights(emb, labels, (old, old_labels), "ms")
  # The memory as training fills it: the older entries, then the batch's own copies.
  refs, ref_labels = np.concatenate([old, emb]), np.concatenate([old_labels, labels])
  sim = emb @ refs.T
  own = n + np.arange(b)
  same = labels[:, None] == ref_labels[None, :]
  is_self = (np.arange(n + b)[None, :] == own[:, None]) | (same & (sim >= losses.SELF_THRESHOLD))
  pos, neg = same & ~is_self, ~same
  with jax.enable_x64(True):
    want = np.asarray(losses.ms_weights(jnp.asarray(sim), jnp.asarray(labels),
                                        ref_labels=jnp.asarray(ref_labels),
                                        anchor_index=jnp.asarray(own), self_pair="both",
                                        batch_size=1, **MS))
  assert got.memory_size == n and np.array_equal(got.memory_labels, old_labels)
  for part, cols in ((got.memory_part, slice(0, n)), (got.batch_part, slice(n, None))):
    np.testing.assert_allclose(part.sim, sim[:, cols], rtol=0, atol=1e-12)
    np.testing.assert_allclose(part.weights, want[:, cols], rtol=1e-12, atol=1e-15)
    assert np.array_equal(part.pos, pos[:, cols]) and np.array_equal(part.neg, neg[:, cols])
    assert not part.weights[~(part.pos | part.neg)].any()
  # Both parts share each anchor's normaliser: w⁻_ij = e^{β(S_ij−λ)} / (1 + Σ_Ñi e^{β(S−λ)}).
  w_neg = np.concatenate([got.memory_part.w_neg, got.batch_part.w_neg], axis=1)
  mined = np.concatenate([got.memory_part.neg & got.memory_part.selected,
                          got.batch_part.neg & got.batch_part.selected], axis=1)
  active = (w_neg > 0).any(axis=1)
  assert active.sum() > b // 2 and (got.memory_part.w_neg > 0).any()
  e = np.where(mined, np.exp(MS["beta"] * (sim - MS["lam"])), 0.0)
  np.testing.assert_allclose(w_neg[active], (e / (1 + e.sum(1, keepdims=True)))[active],
                             rtol=1e-10)


@pytest.mark.parametrize("loss", losses.NAMES)
def test_an_empty_memory_gives_the_batch_alone(loss):
  emb, labels, _, _ = _batch_and_memory(batches=0)
  got = analysis.memory_weights(emb, labels, (np.zeros((0, 16)), np.zeros(0, np.int32)), loss)
  alone = analysis.pair_weights(emb, labels, loss)
  for name in ("sim", "weights", "pos", "neg", "selected"):
    np.testing.assert_allclose(getattr(got.batch_part, name), getattr(alone, name),
                               rtol=1e-12, atol=1e-15, err_msg=name)
    np.testing.assert_array_equal(getattr(got.batch, name), getattr(alone, name))
  assert got.memory_part.weights.shape == (len(labels), 0) and got.memory_size == 0
  assert got.memory_neg_weight_share() == 0.0
  assert not got.mined_negatives()["memory_part"].any()


def test_a_bfloat16_ring_buffer_drops_the_self_copies_and_empty_slots():
  """A run's checkpointed memory: bfloat16, wrapped and not yet full in turn."""
  emb, labels, old, old_labels = _batch_and_memory(batches=4)
  b = len(labels)
  # 4.5 batches of slots: this batch wraps past the end, over half the oldest batch.
  full = memory.create(4 * b + b // 2, 16, jnp.bfloat16)
  for k in range(4):
    full = memory.enqueue(full, old[k * b:(k + 1) * b], old_labels[k * b:(k + 1) * b])
  got = analysis.memory_weights(emb, labels, full, "ms")
  kept = slice(b // 2, None)  # what is left of the older entries, oldest first
  stored = np.asarray(jnp.asarray(old[kept], jnp.bfloat16).astype(jnp.float32), np.float64)
  assert got.memory_size == 3 * b + b // 2
  np.testing.assert_array_equal(got.memory_labels, old_labels[kept])
  np.testing.assert_allclose(got.memory_part.sim, emb @ stored.T, atol=1e-12)
  diag = np.eye(b, dtype=bool)
  copies = got.batch_part
  assert (copies.sim[diag] < losses.SELF_THRESHOLD).any()  # bfloat16: the value rule misses
  assert not (copies.pos | copies.neg | copies.selected)[diag].any()
  assert not copies.weights[diag].any()
  np.testing.assert_array_equal(copies.pos, (labels[:, None] == labels) & ~diag)
  # Half full: the empty slots are no reference at all.
  half = memory.enqueue(memory.create(4 * b, 16, jnp.bfloat16), old[:b], old_labels[:b])
  got = analysis.memory_weights(emb, labels, half, "ms")
  assert got.memory_size == b and got.memory_part.neg.sum() == (
      labels[:, None] != old_labels[None, :b]).sum()


def test_the_memory_takes_the_batch_negatives_weight():
  """The memory term's normaliser holds the memory's negatives too, so a negative the
  batch alone weighs gets at most its weight there, and most of the w⁻ goes to the
  memory."""
  emb, labels, old, old_labels = _batch_and_memory(batches=8)
  got = analysis.memory_weights(emb, labels, (old, old_labels), "ms")
  weighed = got.batch.w_neg > 0
  assert weighed.sum() > 20
  assert np.all(got.batch_part.w_neg[weighed] <= got.batch.w_neg[weighed] * (1 + 1e-12))
  assert got.batch_part.w_neg.sum() < 0.5 * got.batch.w_neg.sum()
  assert got.memory_neg_weight_share() > 0.5
  mined = got.mined_negatives()
  np.testing.assert_array_equal(mined["memory_part"],
                                (got.memory_part.neg & got.memory_part.selected).sum(1))
  sums = got.neg_weight_sums()
  np.testing.assert_allclose(sums["batch"], got.batch.w_neg.sum(1))


def test_memory_weights_names_a_mismatched_memory():
  emb, labels, old, old_labels = _batch_and_memory(batches=1)
  with pytest.raises(ValueError, match="do not match a batch of 16-d"):
    analysis.memory_weights(emb, labels, (old[:, :8], old_labels), "ms")


def _offsets(ax, label_start):
  for coll in ax.collections:
    if coll.get_label().startswith(label_start):
      return np.asarray(coll.get_offsets())
  raise AssertionError(f"no {label_start!r} in {[c.get_label() for c in ax.collections]}")


def test_memory_figure_draws_each_weighted_pair_and_each_anchors_sum():
  emb, labels, old, old_labels = _batch_and_memory(batches=8)
  got = analysis.memory_weights(emb, labels, (old, old_labels), "ms")
  fig = plot.memory_figure(got, title="memory")
  assert len(fig.axes) == 3
  neg_ax, pos_ax, sum_ax = fig.axes
  for ax, side in ((neg_ax, "neg"), (pos_ax, "pos")):
    for label, part in (("batch alone", got.batch), ("with memory: its", got.memory_part),
                        ("with memory: the batch", got.batch_part)):
      w = part.w_neg if side == "neg" else part.w_pos
      drawn = (part.neg if side == "neg" else part.pos) & (w > 0)
      points = _offsets(ax, label)
      want = np.stack([part.sim[drawn], w[drawn]], axis=1)
      np.testing.assert_allclose(points[np.lexsort(points.T)], want[np.lexsort(want.T)])
  sums = got.neg_weight_sums()
  memory_bars, batch_bars = sum_ax.containers
  heights = np.array([r.get_height() for r in memory_bars])
  np.testing.assert_allclose(np.sort(heights), np.sort(sums["memory_part"]))
  tops = heights + np.array([r.get_height() for r in batch_bars])
  np.testing.assert_allclose(np.sort(tops), np.sort(sums["memory_part"] + sums["batch_part"]))
  plot._pyplot().close(fig)
