"""float32 stability, bfloat16 inputs, and clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msjax.losses as L
from batches import make_batch


def near_one_batch():
  """Similarities within 0.02 of 1: e^{β(S−λ)} overflows float32 for β = 100, λ = 0."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 4).astype(np.int32)
  sim = 0.98 + 0.0199 * rng.random((16, 16))
  sim = (sim + sim.T) / 2
  np.fill_diagonal(sim, 1.0)
  return sim, labels


@pytest.mark.parametrize("name,kw", [
    ("ms", dict(alpha=2.0, beta=100.0, lam=0.0)),
    ("ms", dict(alpha=100.0, beta=100.0, lam=1.0, mining=False)),
    ("ms", dict(beta=100.0, lam=0.0, weighting="lifted", mining=False)),
    ("ms", dict(beta=100.0, lam=0.0, weighting="binlifted")),
    ("binomial", dict(alpha=100.0, beta=100.0, lam=0.0)),
    ("lifted", dict(scale=100.0)),
])
def test_float32_is_stable_for_large_scales_near_one(name, kw):
  sim64, labels = near_one_batch()
  loss, weights = L.get(name)
  expected = float(loss(sim64, labels, **kw))
  expected_w = np.asarray(weights(sim64, labels, **kw))
  sim32 = jnp.asarray(sim64, jnp.float32)
  value = loss(sim32, labels, **kw)
  grad = jax.grad(lambda s: loss(s, labels, **kw))(sim32)
  w = weights(sim32, labels, **kw)
  assert value.dtype == jnp.float32
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(w))
  assert float(value) == pytest.approx(expected, rel=1e-4)
  # float32 rounding of S (~6e-8) times β = 100 bounds the relative error of weights.
  np.testing.assert_allclose(w, expected_w, rtol=2e-4, atol=1e-6 * np.abs(expected_w).max())
  np.testing.assert_allclose(grad, w, rtol=1e-5, atol=1e-7 * np.abs(expected_w).max())


@pytest.mark.parametrize("name", L.NAMES)
def test_bfloat16_similarities_are_computed_in_float32(name):
  emb, labels = make_batch("pk", 4, 4, 16, seed=1, spread=2.0)
  sim16 = jnp.asarray(emb @ emb.T, jnp.bfloat16)
  loss, weights = L.get(name)
  value = loss(sim16, labels)
  assert value.dtype == jnp.float32
  assert float(value) == float(loss(sim16.astype(jnp.float32), labels))
  grad = jax.grad(lambda s: loss(s, labels))(sim16)
  assert grad.dtype == jnp.bfloat16
  assert weights(sim16, labels).dtype == jnp.float32


def test_embeddings_path_accepts_bfloat16_embeddings():
  emb, labels = make_batch("pk", 8, 4, 32, seed=1, spread=2.0)
  emb16 = jnp.asarray(emb, jnp.bfloat16)
  value, grad = jax.value_and_grad(lambda e: L.ms_loss_from_embeddings(e, labels))(emb16)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  expected = L.ms_loss(jnp.asarray(emb16, jnp.float32) @ jnp.asarray(emb16, jnp.float32).T, labels)
  assert float(value) == pytest.approx(float(expected), rel=1e-5)


SIM = np.eye(6)
LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)


@pytest.mark.parametrize("call,match", [
    (lambda f: f(SIM, LABELS[:5]), r"`labels` has shape \(5,\) but `sim` has 6 anchor rows"),
    (lambda f: f(SIM[:4, :4], LABELS[:4]), None),  # a square sub-batch is fine
    (lambda f: f(SIM[:4], LABELS[:4], ref_labels=LABELS[:5]), r"`ref_labels` has shape \(5,\)"),
    (lambda f: f(SIM[:3], LABELS[:3]), r"not square, and no `ref_labels`"),
    (lambda f: f(SIM[0], LABELS), r"2-D \[anchors, references\]"),
    (lambda f: f(SIM.astype(np.int32), LABELS), r"must be a float array"),
    (lambda f: f(SIM[:2], LABELS[:2], ref_labels=LABELS, anchor_index=np.zeros(3, np.int32)),
     r"`anchor_index` must be an integer array of shape \(2,\)"),
    (lambda f: f(SIM, LABELS, batch_size=0), r"`batch_size` must be a positive"),
    (lambda f: f(SIM, LABELS, self_pair="diagonal"), r"`self_pair` must be one of"),
])
@pytest.mark.parametrize("name", L.NAMES)
def test_shape_errors_name_the_argument(name, call, match):
  for fn in L.get(name):
    if match is None:
      call(fn)
    else:
      with pytest.raises(ValueError, match=match):
        call(fn)


@pytest.mark.parametrize("name,kw,match", [
    ("ms", dict(alpha=-2.0), r"`alpha` must be > 0"),
    ("ms", dict(beta=0.0), r"`beta` must be > 0"),
    ("ms", dict(epsilon=-0.1), r"`epsilon` must be >= 0"),
    ("ms", dict(weighting="softmax"), r"`weighting` must be one of"),
    ("binomial", dict(beta=-1.0), r"`beta` must be > 0"),
    ("lifted", dict(scale=-1.0), r"`scale` must be > 0"),
    ("triplet", dict(margin=-0.1), r"`margin` must be >= 0"),
])
def test_bad_hyper_parameters_are_rejected(name, kw, match):
  for fn in L.get(name):
    with pytest.raises(ValueError, match=match):
      fn(SIM, LABELS, **kw)


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="anchor rows"):
    jax.jit(lambda s: L.ms_loss(s, LABELS[:4]))(SIM)


def test_traced_hyper_parameters_are_allowed():
  value = jax.jit(lambda a, b: L.ms_loss(SIM, LABELS, alpha=a, beta=b))(2.0, 40.0)
  assert float(value) == float(L.ms_loss(SIM, LABELS))


def test_unknown_names_and_embedding_shapes():
  with pytest.raises(ValueError, match=r"Unknown loss 'npair'; choose one of"):
    L.get("npair")
  with pytest.raises(ValueError, match=r"Unknown loss"):
    L.pair_loss_from_embeddings(np.eye(4), np.arange(4), loss="npair")
  with pytest.raises(ValueError, match=r"`labels` has shape \(3,\) but `emb` has 4 rows"):
    L.ms_loss_from_embeddings(np.eye(4), np.arange(3))
  with pytest.raises(ValueError, match=r"`ref_emb` must be \[Br, D\]"):
    L.ms_loss_from_embeddings(np.eye(4), np.arange(4), ref_emb=np.eye(3), ref_labels=np.arange(3))
  with pytest.raises(ValueError, match=r"`ref_emb` given without `ref_labels`"):
    L.ms_loss_from_embeddings(np.eye(4), np.arange(4), ref_emb=np.eye(4))
  with pytest.raises(ValueError, match=r"`block_size` must be a positive int"):
    L.ms_loss_from_embeddings(np.eye(4), np.arange(4), block_size=0)
  with pytest.raises(ValueError, match=r"`alpha` must be > 0"):
    L.ms_loss_from_embeddings(np.eye(4), np.arange(4), alpha=-1.0)
  with pytest.raises(ValueError, match=r"msjax.losses.ms_preset: `name` must be one of"):
    L.ms_preset("torch")
