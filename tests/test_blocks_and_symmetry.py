"""Rectangular == square, blocked == unblocked, permutation invariance, embeddings path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msjax.losses as L
from batches import make_batch


@pytest.fixture(scope="module")
def batch():
  emb, labels = make_batch("k1_mixed", 9, 4, 16, seed=11, spread=2.0)
  emb[5] = emb[2]  # an exact duplicate inside a class
  return emb, labels


@pytest.mark.parametrize("name", L.NAMES)
@pytest.mark.parametrize("self_pair", ["value", "index"])
def test_row_chunks_of_the_rectangular_form_add_up_to_the_square_loss(batch, name, self_pair):
  """What each device of a sharded step computes: its anchors' rows against all columns."""
  emb, labels = batch
  sim = jnp.asarray(emb @ emb.T)
  loss, weights = L.get(name)
  square = loss(sim, labels, self_pair=self_pair)
  square_w = weights(sim, labels, self_pair=self_pair)
  total, rows_w = 0.0, []
  for rows in np.array_split(np.arange(len(labels)), 4):
    kw = dict(ref_labels=labels, anchor_index=rows, batch_size=len(labels), self_pair=self_pair)
    total += loss(sim[rows], labels[rows], **kw)
    rows_w.append(weights(sim[rows], labels[rows], **kw))
  assert float(total) == pytest.approx(float(square), rel=1e-12)
  chex.assert_trees_all_close(jnp.concatenate(rows_w), square_w, atol=1e-15)


@pytest.mark.parametrize("name", L.NAMES)
def test_permuting_the_batch_leaves_the_loss_unchanged(batch, name):
  emb, labels = batch
  perm = np.random.default_rng(0).permutation(len(labels))
  loss, weights = L.get(name)
  sim = emb @ emb.T
  permuted = emb[perm] @ emb[perm].T
  assert float(loss(permuted, labels[perm])) == pytest.approx(float(loss(sim, labels)), rel=1e-12)
  chex.assert_trees_all_close(weights(permuted, labels[perm]),
                              weights(sim, labels)[perm][:, perm], atol=1e-15)


def reference_value_and_grad(name, emb, labels, **kw):
  """Autodiff through the similarity-level loss: the oracle for the embeddings path."""
  return jax.value_and_grad(lambda e: L.get(name).loss(e @ e.T, labels, **kw))(emb)


@pytest.mark.parametrize("name", L.NAMES)
@pytest.mark.parametrize("block_size", [None, 1, 5, 16, 36, 100])
def test_embeddings_path_dense_and_blocked_equals_autodiff(batch, name, block_size):
  emb, labels = batch
  expected_value, expected_grad = reference_value_and_grad(name, emb, labels)
  fn = jax.jit(lambda e: L.pair_loss_from_embeddings(e, labels, loss=name, block_size=block_size))
  value, grad = jax.jit(jax.value_and_grad(fn))(emb)
  assert float(value) == pytest.approx(float(expected_value), rel=1e-12)
  assert float(fn(emb)) == pytest.approx(float(expected_value), rel=1e-12)  # primal only
  chex.assert_trees_all_close(grad, expected_grad, atol=1e-14)


@pytest.mark.parametrize("block_size", [None, 4, 7])
def test_rectangular_embeddings_path_with_cross_batch_memory(batch, block_size):
  """Anchors against a reference memory that holds them (anchor_index) and older entries."""
  emb, labels = batch
  memory_emb = np.concatenate([emb, make_batch("pk", 5, 3, 16, seed=4)[0]])
  memory_labels = np.concatenate([labels, np.repeat(np.arange(5), 3) + 100]).astype(np.int32)
  rows = np.arange(0, len(labels), 2)
  kw = dict(ref_labels=memory_labels, anchor_index=rows, batch_size=len(labels),
            self_pair="index", beta=50.0)

  def reference(q, r):
    return L.ms_loss(q @ r.T, labels[rows], **kw)

  def fast(q, r):
    return L.ms_loss_from_embeddings(q, labels[rows], ref_emb=r, block_size=block_size, **kw)

  expected = jax.value_and_grad(reference, argnums=(0, 1))(emb[rows], memory_emb)
  got = jax.value_and_grad(fast, argnums=(0, 1))(emb[rows], memory_emb)
  chex.assert_trees_all_close(got, expected, atol=1e-14, rtol=1e-12)


def test_blocked_square_matches_dense_in_float32_at_a_larger_batch():
  emb, labels = make_batch("pk", 60, 5, 64, seed=2)
  emb = jnp.asarray(emb, jnp.float32)
  dense = jax.jit(jax.value_and_grad(lambda e: L.ms_loss_from_embeddings(e, labels)))(emb)
  blocked = jax.jit(jax.value_and_grad(
      lambda e: L.ms_loss_from_embeddings(e, labels, block_size=64)))(emb)
  assert dense[1].dtype == jnp.float32
  chex.assert_trees_all_close(blocked, dense, rtol=2e-5, atol=1e-8)


FUSED = [n for n in L.NAMES if L.get(n).value_and_weights is not None]


def test_the_registry_declares_the_fused_forms_the_fast_paths_use():
  """MS, Circle and SupCon have both fused forms (one pass of row statistics); a loss
  without them falls back to loss + weights."""
  assert FUSED == ["ms", "circle", "supcon"]
  assert all(L.get(n).value_and_symmetric_weights is not None for n in FUSED)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("self_pair", ["value", "index"])
def test_fused_forms_equal_the_loss_and_its_weights(batch, name, self_pair):
  """``value_and_weights`` (square and rectangular, with empty columns) and
  ``value_and_symmetric_weights`` give the loss's value and ``weights``, ``W + Wᵀ``."""
  emb, labels = batch
  entry = L.get(name)
  sim = jnp.asarray(emb @ emb.T)
  value, w = entry.value_and_weights(sim, labels, self_pair=self_pair)
  assert float(value) == pytest.approx(float(entry.loss(sim, labels, self_pair=self_pair)),
                                       rel=1e-12)
  chex.assert_trees_all_close(w, entry.weights(sim, labels, self_pair=self_pair), atol=1e-15)
  value, sym = entry.value_and_symmetric_weights(sim, labels, self_pair=self_pair)
  chex.assert_trees_all_close(sym, w + w.T, atol=1e-15)
  rows, valid = np.arange(0, len(labels), 3), np.arange(len(labels)) % 4 != 1
  kw = dict(ref_labels=labels, anchor_index=rows, ref_valid=valid, self_pair=self_pair)
  value, w = entry.value_and_weights(sim[rows], labels[rows], **kw)
  assert float(value) == pytest.approx(float(entry.loss(sim[rows], labels[rows], **kw)),
                                       rel=1e-12)
  chex.assert_trees_all_close(w, entry.weights(sim[rows], labels[rows], **kw), atol=1e-15)
  assert np.all(np.asarray(w)[:, ~valid] == 0)
