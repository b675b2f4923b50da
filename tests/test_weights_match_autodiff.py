"""jax.grad of every loss equals its analytic GPW weights, on random and nasty batches."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import msjax.losses as L
from batches import batches

# Loss variants: every registry loss with its defaults and with non-default options,
# and every MS ablation of the paper's component study under both presets.
VARIANTS = [(name, {}) for name in L.NAMES]
VARIANTS += [(name, {"self_pair": "index"}) for name in L.NAMES]
VARIANTS += [("ms", dict(**L.MS_ABLATIONS[a], **L.ms_preset(p)))
             for a in L.MS_ABLATIONS for p in L.MS_PRESETS]
VARIANTS += [("ms", dict(alpha=3.0, beta=100.0, lam=0.7, epsilon=0.0)),
             ("contrastive", dict(lam=0.2)), ("triplet", dict(margin=0.0)),
             ("triplet", dict(margin=0.5)), ("lifted", dict(lam=0.1, scale=8.0)),
             ("binomial", dict(alpha=1.0, beta=10.0, lam=0.2)),
             # Circle's face-recognition setting, and its differentiated self-paced factors.
             ("circle", dict(m=0.25, gamma=256.0)), ("circle", dict(detach_alpha=False)),
             ("circle", dict(m=0.1, gamma=32.0, detach_alpha=False)),
             # SupCon drops the self pair by index by default: "value" is its variant.
             ("supcon", dict(self_pair="value")),
             ("supcon", dict(temperature=0.5, base_temperature=0.07)),
             ("supcon", dict(temperature=0.1, base_temperature=1.0, self_pair="both"))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in VARIANTS]
# Each loss with its defaults and with the other self-pair rule, on rectangular blocks.
RECT = [i for i, (n, kw) in enumerate(VARIANTS)
        if i < 2 * len(L.NAMES) or kw == {"self_pair": "value"}]


@functools.cache
def _jitted_grad_and_weights(name, static_kw):
  """One compiled (grad, weights) per loss variant and shape: hypothesis's examples then
  run in milliseconds. Hyper-parameters stay Python values, as in training."""
  loss, weights = L.get(name)
  kw = dict(static_kw)

  def both(sim, labels, arrays):
    return (jax.grad(lambda s: loss(s, labels, **kw, **arrays))(sim),
            weights(sim, labels, **kw, **arrays))

  return jax.jit(both)


def grad_and_weights(name, sim, labels, **kw):
  arrays = {k: kw.pop(k) for k in ("ref_labels", "anchor_index") if k in kw}
  return _jitted_grad_and_weights(name, tuple(sorted(kw.items())))(sim, labels, arrays)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
@given(batch=batches())
def test_grad_equals_weights(name, kw, batch):
  _, emb, labels = batch
  sim = jnp.asarray(emb @ emb.T)
  grad, weights = grad_and_weights(name, sim, labels, **kw)
  assert grad.dtype == jnp.float64
  if kw.get("detach_alpha") is False:
    # Circle's differentiated factor [S + m]_+ has a kink at S = −m (reachable on the
    # "ties" lattice): the weights take the one-sided derivative 0 there (circle.py:
    # "2γS for a negative above O⁻"), autodiff of jnp.maximum half of the other side.
    # Both are subgradients; only that pair's own entry differs.
    grad = jnp.where(sim == -kw.get("m", 0.4), weights, grad)
  chex.assert_trees_all_close(grad, weights, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("name,kw", [VARIANTS[i] for i in RECT], ids=[IDS[i] for i in RECT])
@given(batch=batches(), data=st.data())
def test_grad_equals_weights_rectangular(name, kw, batch, data):
  """Anchor rows against reference columns, with anchor_index and a global batch size."""
  _, emb, labels = batch
  rows = np.asarray(data.draw(st.lists(st.integers(0, len(labels) - 1), min_size=5, max_size=5)))
  sim = jnp.asarray(emb[rows] @ emb.T)
  kw = dict(kw, ref_labels=labels, anchor_index=rows, batch_size=len(labels))
  grad, weights = grad_and_weights(name, sim, labels[rows], **kw)
  chex.assert_trees_all_close(grad, weights, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("name", L.NAMES)
def test_weights_have_gpw_signs(name):
  """w⁻ >= 0 on negatives, −w⁺ <= 0 on positives, 0 on the self pair and elsewhere.

  SupCon is the exception on positives (``msjax/losses/supcon.py``): a single positive's
  weight may be positive, but each anchor's positive weights sum to ``−(1 − Σ_P p)/τ_b
  ≤ 0``, which is what is asserted for it.
  """
  from batches import make_batch
  emb, labels = make_batch("pk", 6, 4, 16, seed=3)
  sim = jnp.asarray(emb @ emb.T)
  weights = np.asarray(L.get(name).weights(sim, labels))
  same = labels[:, None] == labels[None, :]
  assert np.all(weights[~same] >= 0)
  if name == "supcon":
    assert np.all(np.sum(np.where(same, weights, 0.0), axis=1) <= 0)
  else:
    assert np.all(weights[same] <= 0)
  assert np.all(np.diag(weights) == 0)
  assert np.abs(weights).sum() > 0


def test_supcon_pushes_a_dominant_positive_away():
  """SupCon's documented sign change: anchor 0 has one positive far closer than its other
  (p_01 > 1/|P_0|), so ∂L/∂S_01 > 0 (autodiff and the weights agree), while the anchor's
  positive weights still sum to ≤ 0 and its negative's weight is ≥ 0."""
  from batches import unit
  emb = unit(np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
  labels = np.array([0, 0, 0, 1], np.int32)
  sim = jnp.asarray(emb @ emb.T)
  weights = np.asarray(L.supcon_weights(sim, labels))
  grad = np.asarray(jax.grad(lambda s: L.supcon_loss(s, labels))(sim))
  chex.assert_trees_all_close(grad, weights, atol=1e-13, rtol=1e-11)
  assert weights[0, 1] > 0 > weights[0, 2]
  assert weights[0, 1] + weights[0, 2] <= 0 <= weights[0, 3]
  # Closed form: p_01 = softmax over {1, 2, 3} of S_0·/τ; w_01 = (p_01 − 1/2)/τ_b / m.
  logits = np.asarray(sim)[0, 1:] / 0.07
  p_01 = np.exp(logits[0]) / np.exp(logits).sum()
  assert p_01 > 0.5
  assert weights[0, 1] == pytest.approx((p_01 - 0.5) / 0.07 / 4, rel=1e-12)


def test_every_pair_mined_out_gives_zero_loss_and_weights():
  from batches import make_batch
  emb, labels = make_batch("mined_out", 4, 3, 8, seed=0)
  sim = jnp.asarray(emb @ emb.T)
  assert float(L.ms_loss(sim, labels)) == 0.0
  assert not np.any(np.asarray(L.ms_weights(sim, labels)))
  assert not np.any(np.asarray(jax.grad(lambda s: L.ms_loss(s, labels))(sim)))
  pos, neg, active = L.ms_mining(sim, labels)
  assert not np.any(pos) and not np.any(neg) and not np.any(active)


MS_VARIANTS = [(a, p) for a in L.MS_ABLATIONS for p in ("released", "paper")]


@functools.cache
def _jitted_fused(static_kw):
  kw = dict(static_kw)

  @jax.jit
  def forms(sim, labels):
    value, grad = jax.value_and_grad(lambda s: L.ms_loss(s, labels, **kw))(sim)
    return (value, grad, L.ms_value_and_weights(sim, labels, **kw),
            L.ms_value_and_symmetric_weights(sim, labels, **kw))

  return forms


@pytest.mark.parametrize("ablation,preset", MS_VARIANTS)
@given(batch=batches(), self_pair=st.sampled_from(["value", "index"]))
def test_fused_ms_value_and_symmetric_weights(ablation, preset, batch, self_pair):
  """The fused forms used by the embeddings path: (loss, W) and (loss, W + Wᵀ)."""
  _, emb, labels = batch
  sim = jnp.asarray(emb @ emb.T)
  kw = dict(**L.MS_ABLATIONS[ablation], **L.ms_preset(preset), self_pair=self_pair)
  value, grad, (fused_value, weights), (sym_value, sym_weights) = _jitted_fused(
      tuple(sorted(kw.items())))(sim, labels)
  chex.assert_trees_all_close((fused_value, weights), (value, grad), atol=1e-13, rtol=1e-11)
  chex.assert_trees_all_close((sym_value, sym_weights), (value, grad + grad.T), atol=1e-13,
                              rtol=1e-11)
