"""Proxy-Anchor and Proxy-NCA (``msjax/losses/proxy.py``): analytic weights, embeddings
path, errors, dtypes, and the sharded loss on 8 virtual devices.

The similarity-level losses are checked against ``jax.grad`` of themselves (float64, on
the hypothesis batches of ``tests/batches.py`` against C proxies: random unit vectors,
some exactly a sample, classes without a sample, samples without a proxy, proxies masked
by ``ref_valid``, shuffled ``ref_labels``, sometimes two proxies of one class);
``proxy_loss_from_embeddings`` against plain autodiff of the formulas written again
below in ``jnp`` (normalise, matmul, loss), sharing nothing with msjax.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import msjax.losses as L
from batches import KINDS, batches, make_batch, unit
from scripts_run import run_json_script

NUM_PROXIES = 16  # one fixed C (and B = 10 or 12): few compiled shapes
VARIANTS = [("proxy_anchor", {}), ("proxy_anchor", dict(alpha=8.0, delta=0.0)),
            ("proxy_anchor", dict(alpha=64.0, delta=0.3)),
            ("proxy_nca", {}), ("proxy_nca", dict(positive_in_denominator=True)),
            ("proxy_nca", dict(scale=8.0, positive_in_denominator=True)),
            ("proxy_nca", dict(scale=1.0))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in VARIANTS]


def functions(name):
  return (getattr(L, f"{name}_loss"), getattr(L, f"{name}_weights"),
          getattr(L, f"{name}_value_and_weights"))


def test_the_registry_lists_the_proxy_losses_apart_from_the_pair_losses():
  assert L.PROXY_NAMES == ("proxy_anchor", "proxy_nca")
  assert not set(L.PROXY_NAMES) & set(L.NAMES)
  assert L.ALL_NAMES == L.NAMES + L.PROXY_NAMES
  for name in L.PROXY_NAMES:
    entry = L.get(name)
    assert L.is_proxy(name) and not entry.rectangular
    assert (entry.loss, entry.weights, entry.value_and_weights) == functions(name)
  assert not any(L.is_proxy(name) for name in L.NAMES)


# --- the similarity-level losses ----------------------------------------------------------


@st.composite
def proxy_blocks(draw):
  """``(kind, sim [B, C], labels, ref_labels, ref_valid)`` for a batch of ``batches()``.

  Proxies of classes ``0..C-1`` in shuffled order: the batches' labels are mostly below
  12, so classes 12-15 have no sample, and ``k1_mixed``'s fresh labels (>= 16) no proxy.
  """
  kind, emb, labels = draw(batches())
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  proxies = unit(rng.normal(size=(NUM_PROXIES, emb.shape[1])))
  exact = draw(st.integers(0, 3))  # proxies exactly along a sample: S = 1 (ties)
  proxies[rng.choice(NUM_PROXIES, exact, replace=False)] = emb[rng.choice(len(labels), exact)]
  ref_labels = rng.permutation(NUM_PROXIES).astype(np.int32)
  if draw(st.booleans()):  # two proxies of one class
    ref_labels[rng.integers(NUM_PROXIES)] = ref_labels[rng.integers(NUM_PROXIES)]
  ref_valid = rng.random(NUM_PROXIES) >= draw(st.sampled_from([0.0, 0.3]))
  return kind, emb @ proxies.T, labels, ref_labels, ref_valid


@functools.cache
def _jitted_forms(name, static_kw):
  """One compiled set of (grad, loss, weights, value_and_weights) per variant and shape."""
  loss, weights, value_and_weights = functions(name)
  kw = dict(static_kw)

  @jax.jit
  def forms(sim, labels, ref_labels, ref_valid):
    args = dict(ref_labels=ref_labels, ref_valid=ref_valid, **kw)
    value, grad = jax.value_and_grad(lambda s: loss(s, labels, **args))(sim)
    return value, grad, weights(sim, labels, **args), value_and_weights(sim, labels, **args)

  return forms


def forms(name, kw, *args):
  return _jitted_forms(name, tuple(sorted(kw.items())))(*args)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
@given(block=proxy_blocks())
def test_grad_equals_weights_and_the_weights_have_gpw_signs(name, kw, block):
  """``jax.grad`` of the loss is ``<name>_weights``; ``value_and_weights`` is both;
  masked proxies get weight 0; other classes' proxies ``w⁻ ≥ 0`` and own ``−w⁺ ≤ 0``.

  Proxy-NCA++ (``positive_in_denominator``) with two proxies of a class is the
  exception on positives, as SupCon: see the test below; its positive weights still sum
  to ≤ 0 per sample.
  """
  _, sim, labels, ref_labels, ref_valid = block
  value, grad, weights, (fused_value, fused_weights) = forms(
      name, kw, jnp.asarray(sim), labels, ref_labels, ref_valid)
  assert grad.dtype == jnp.float64 and value.dtype == jnp.float64
  assert np.isfinite(float(value))
  if name == "proxy_anchor" or kw.get("positive_in_denominator"):
    assert float(value) >= 0  # original Proxy-NCA (−z⁺ + log Σ_N e^z) can be negative
  chex.assert_trees_all_close(grad, weights, atol=1e-13, rtol=1e-11)
  chex.assert_trees_all_close((fused_value, fused_weights), (value, weights), atol=1e-13,
                              rtol=1e-11)
  weights = np.asarray(weights)
  same = labels[:, None] == ref_labels[None, :]
  assert not np.any(weights[:, ~ref_valid])
  neg, pos = ~same & ref_valid, same & ref_valid
  assert np.all(weights[neg] >= 0)
  positive_sums = np.sum(np.where(pos, weights, 0.0), axis=1)
  assert np.all(positive_sums <= 1e-12 * np.abs(weights).max(initial=0.0))
  one_proxy_per_class = len(set(ref_labels[ref_valid])) == ref_valid.sum()
  if name == "proxy_anchor" or not kw.get("positive_in_denominator") or one_proxy_per_class:
    assert np.all(weights[pos] <= 0)


def test_proxy_nca_pp_pushes_a_dominant_second_proxy_of_the_class_away():
  """With ``positive_in_denominator=True`` and two proxies of a sample's class, the closer
  one's ``∂L/∂S = 2σ²(q − 1/2)/m`` is positive once its softmax share q exceeds 1/2; the
  original form's pull is the constant ``−2σ²/|P_i|/m``."""
  sim = jnp.array([[0.9, -0.5, 0.0]])
  labels, ref_labels = np.array([0]), np.array([0, 0, 1])
  w_pp, w = jax.jit(lambda s: [L.proxy_nca_weights(s, labels, ref_labels=ref_labels,
                                                   positive_in_denominator=pid)
                               for pid in (True, False)])(sim)
  w_pp, w = np.asarray(w_pp), np.asarray(w)
  z = 18.0 * np.asarray(sim[0])
  q = np.exp(z) / np.exp(z).sum()
  assert q[0] > 0.5
  np.testing.assert_allclose(w_pp[0], 18.0 * (q - [0.5, 0.5, 0.0]), rtol=1e-12)
  assert w_pp[0, 0] > 0 > w_pp[0, 0] + w_pp[0, 1]
  np.testing.assert_allclose(w[0], [-9.0, -9.0, 18.0], rtol=1e-12)


def test_default_ref_labels_are_one_proxy_per_class_and_anchors_without_pairs_add_nothing():
  """``ref_labels=None`` is ``arange(C)``; a sample without a proxy of its class adds 0 to
  Proxy-NCA and has only negatives in Proxy-Anchor; a proxy without samples only its
  negative term."""
  emb, labels = make_batch("pk", 3, 4, 6, seed=1)
  proxies = unit(np.random.default_rng(1).normal(size=(5, 6)))
  orphan = labels.copy()
  orphan[:4] = 7  # class 0's four samples now have no proxy

  @jax.jit
  def values(sim):
    defaults = [(f(sim, labels), f(sim, labels, ref_labels=jnp.arange(5)))
                for f in (L.proxy_anchor_loss, L.proxy_nca_loss)]
    return (defaults, L.proxy_nca_loss(sim[4:], labels[4:], batch_size=12),
            L.proxy_nca_loss(sim, orphan), L.proxy_nca_loss(sim, labels),
            L.proxy_anchor_weights(sim, orphan), L.proxy_nca_weights(sim, orphan))

  defaults, nca_rest, nca_orphans, nca, w_anchor, w_nca = values(jnp.asarray(emb @ proxies.T))
  for default, explicit in defaults:
    assert float(default) == float(explicit)
  assert float(nca_orphans) == pytest.approx(float(nca_rest), rel=1e-14)
  assert float(nca) != pytest.approx(float(nca_rest))
  w_anchor = np.asarray(w_anchor)
  assert np.all(w_anchor[:4] >= 0) and np.all(w_anchor[:4, 0] > 0)  # negatives of all
  assert not np.any(np.asarray(w_nca)[:4])


def test_proxy_nca_divides_by_batch_size_and_proxy_anchor_ignores_it():
  emb, labels = make_batch("pk", 3, 4, 6, seed=2)
  sim = jnp.asarray(emb @ unit(np.random.default_rng(2).normal(size=(3, 6))).T)
  nca, nca_24, anchor, anchor_24 = jax.jit(lambda s: (
      L.proxy_nca_loss(s, labels), L.proxy_nca_loss(s, labels, batch_size=24),
      L.proxy_anchor_loss(s, labels), L.proxy_anchor_loss(s, labels, batch_size=24)))(sim)
  assert float(nca_24) == pytest.approx(float(nca) / 2, rel=1e-14)
  assert float(anchor_24) == float(anchor)


# --- from embeddings, against autodiff of the formulas written again ---------------------


def reference_loss(emb, labels, proxies, proxy_labels, proxy_valid, name, kw):
  """The loss written directly in jnp (float64, no stabilisation needed for these scales)."""
  unit_proxies = proxies / jnp.sqrt(jnp.sum(proxies ** 2, axis=1, keepdims=True) + 1e-12)
  s = emb @ unit_proxies.T
  valid = (jnp.ones(proxies.shape[0], bool) if proxy_valid is None
           else jnp.asarray(proxy_valid))
  same = labels[:, None] == proxy_labels[None, :]
  pos, neg = same & valid, ~same & valid
  if name == "proxy_anchor":
    alpha, delta = kw.get("alpha", 32.0), kw.get("delta", 0.1)
    # Per proxy p: log(1 + Σ_{x∈X⁺_p} e^{−α(S_xp−δ)}) and log(1 + Σ_{x∈X⁻_p} e^{α(S_xp+δ)}).
    pos_terms = jnp.log1p(jnp.sum(jnp.where(pos, jnp.exp(-alpha * (s - delta)), 0.0), 0))
    neg_terms = jnp.log1p(jnp.sum(jnp.where(neg, jnp.exp(alpha * (s + delta)), 0.0), 0))
    proxies_with_positives = jnp.sum(jnp.any(pos, axis=0))
    return (jnp.sum(pos_terms) / jnp.maximum(proxies_with_positives, 1)
            + jnp.sum(neg_terms) / jnp.sum(valid))
  scale = kw.get("scale", 3.0)
  z = 2.0 * scale ** 2 * s
  denominator = (pos | neg) if kw.get("positive_in_denominator", False) else neg
  n_pos = jnp.sum(pos, axis=1)
  active = (n_pos > 0) & jnp.any(denominator, axis=1)
  total = jnp.sum(jnp.where(denominator, jnp.exp(z), 0.0), axis=1)
  log_denominator = jnp.log(jnp.where(active, total, 1.0))
  mean_pos = jnp.sum(jnp.where(pos, z, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  return jnp.sum(jnp.where(active, log_denominator - mean_pos, 0.0)) / emb.shape[0]


@functools.cache
def _jitted_embedding_grads(name, static_kw):
  kw = dict(static_kw)

  @jax.jit
  def both(emb, labels, proxies, proxy_labels, proxy_valid):
    got = jax.value_and_grad(
        lambda e, p: L.proxy_loss_from_embeddings(
            e, labels, p, loss=name, proxy_labels=proxy_labels, proxy_valid=proxy_valid,
            **kw), argnums=(0, 1))(emb, proxies)
    want = jax.value_and_grad(
        lambda e, p: reference_loss(e, labels, p, proxy_labels, proxy_valid, name, kw),
        argnums=(0, 1))(emb, proxies)
    return got, want

  return both


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_embeddings_path_gradients_equal_autodiff_of_the_formula(name, kw):
  """Gradients w.r.t. the embeddings AND the raw proxies (any norm, some along a sample,
  two of one class, some classes without samples, masked ones), on every batch kind."""
  for k, kind in enumerate(KINDS):
    emb, labels = make_batch(kind, 3, 4, 8, seed=k)
    rng = np.random.default_rng(k)
    proxies = rng.normal(size=(NUM_PROXIES, 8)) * rng.uniform(0.05, 4.0, (NUM_PROXIES, 1))
    proxies[[2, 9]] = 3.0 * emb[[0, 5]]
    proxy_labels = rng.permutation(NUM_PROXIES).astype(np.int32)
    proxy_labels[11] = proxy_labels[4]
    masked = k % 2 == 1  # else every proxy exists (None: see the test below)
    valid = (rng.random(NUM_PROXIES) > 0.25) | (not masked)
    (value, (d_emb, d_proxies)), (want, (want_emb, want_proxies)) = _jitted_embedding_grads(
        name, tuple(sorted(kw.items())))(emb, labels, proxies, proxy_labels, valid)
    where = f"{name} {kw} {kind}"
    assert float(value) == pytest.approx(float(want), rel=1e-12), where
    chex.assert_trees_all_close((d_emb, d_proxies), (want_emb, want_proxies), atol=1e-12,
                                rtol=1e-10, custom_message=where)
    assert np.abs(np.asarray(d_proxies)).max() > 0, where
    if masked:
      assert not np.any(np.asarray(d_proxies)[~valid]), where


def test_embeddings_path_defaults_are_one_valid_proxy_per_class():
  """``proxy_labels=None`` is ``arange(C)`` and ``proxy_valid=None`` every proxy."""
  emb, labels = make_batch("k1_mixed", 3, 4, 8, seed=0)
  proxies = np.random.default_rng(0).normal(size=(NUM_PROXIES, 8))

  @jax.jit
  def both(emb, proxies):
    grad = jax.value_and_grad(L.proxy_loss_from_embeddings, argnums=(0, 2))
    return (grad(emb, labels, proxies, loss="proxy_nca"),
            grad(emb, labels, proxies, loss="proxy_nca", proxy_labels=np.arange(NUM_PROXIES),
                 proxy_valid=np.ones(NUM_PROXIES, bool)))

  defaults, explicit = both(emb, proxies)
  chex.assert_trees_all_equal(defaults, explicit)


# --- errors and dtypes --------------------------------------------------------------------


def _inputs():
  emb, labels = make_batch("pk", 2, 3, 4, seed=0)
  return emb, labels, np.random.default_rng(0).normal(size=(3, 4))


@pytest.mark.parametrize("name", L.PROXY_NAMES)
def test_anchor_index_is_refused_with_a_message_that_names_it(name):
  emb, labels, proxies = _inputs()
  sim = jnp.asarray(emb @ proxies.T)
  for fn in functions(name):
    with pytest.raises(ValueError, match=r"no self pairs; `anchor_index` must be None"):
      fn(sim, labels, anchor_index=np.arange(6))
  with pytest.raises(ValueError, match=r"takes no \['anchor_index'\]"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, loss=name, anchor_index=np.arange(6))


def test_embeddings_path_errors_name_the_problem():
  emb, labels, proxies = _inputs()
  with pytest.raises(ValueError, match=r"must share D; got \(6, 4\) and \(3, 5\)"):
    L.proxy_loss_from_embeddings(emb, labels, np.ones((3, 5)))
  with pytest.raises(ValueError, match=r"'ms' is not a proxy loss; choose one of "
                                       r"\('proxy_anchor', 'proxy_nca'\)"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, loss="ms")
  with pytest.raises(ValueError, match=r"'proxy_ancor' is not a proxy loss"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, loss="proxy_ancor")
  with pytest.raises(ValueError, match=r"Unknown loss 'proxy_ancor'.*'proxy_anchor'"):
    L.get("proxy_ancor")
  with pytest.raises(ValueError, match=r"`alpha` must be > 0, got -1.0"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, alpha=-1.0)
  with pytest.raises(ValueError, match=r"`scale` must be > 0, got 0.0"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, loss="proxy_nca", scale=0.0)
  with pytest.raises(ValueError, match=r"`labels` has shape \(5,\) but `sim` has 6"):
    L.proxy_loss_from_embeddings(emb, labels[:5], proxies)
  # The proxies' labels and mask are checked under the names the caller used.
  with pytest.raises(ValueError, match=r"`proxy_labels` must hold one entry per proxy, "
                                       r"shape \(3,\); got \(2,\)"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, proxy_labels=np.arange(2))
  with pytest.raises(ValueError, match=r"`ref_valid` must be a boolean array of shape \(3,\)"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, proxy_valid=np.ones(3))
  with pytest.raises(ValueError, match=r"proxy_anchor takes no \['beta'\]; its "
                                       r"hyper-parameters are \('alpha', 'delta'\)"):
    L.proxy_loss_from_embeddings(emb, labels, proxies, beta=3.0)


@pytest.mark.parametrize("name", L.PROXY_NAMES)
def test_bfloat16_similarities_are_computed_in_float32(name):
  emb, labels, proxies = _inputs()
  loss, weights, value_and_weights = functions(name)

  @jax.jit
  def run(sim16, emb16, proxies16):
    sim32 = sim16.astype(jnp.float32)  # the same (rounded) similarities, in float32
    from_embeddings = jax.value_and_grad(
        lambda e, p: L.proxy_loss_from_embeddings(e, labels, p, loss=name),
        argnums=(0, 1))(emb16, proxies16)
    return (loss(sim16, labels), weights(sim16, labels), value_and_weights(sim16, labels),
            loss(sim32, labels), weights(sim32, labels), from_embeddings)

  sim = emb @ unit(proxies).T
  value, w, (fused_value, fused_w), value32, w32, (emb_value, (d_emb, d_proxies)) = run(
      jnp.asarray(sim, jnp.bfloat16), jnp.asarray(emb, jnp.bfloat16),
      jnp.asarray(proxies, jnp.bfloat16))
  assert value.dtype == w.dtype == fused_value.dtype == fused_w.dtype == jnp.float32
  # Exactly the float32 computation: nothing is evaluated in bfloat16.
  assert float(value) == float(fused_value) == float(value32)
  np.testing.assert_array_equal(w, w32)
  np.testing.assert_array_equal(fused_w, w32)
  exact = float(jax.jit(loss)(jnp.asarray(sim), labels))
  assert float(value) == pytest.approx(exact, rel=3e-2)
  # From bfloat16 embeddings and proxies: a float32 value, gradients in the inputs' dtype.
  assert emb_value.dtype == jnp.float32
  assert d_emb.dtype == jnp.bfloat16 and d_proxies.dtype == jnp.bfloat16
  assert float(emb_value) == pytest.approx(exact, rel=3e-2)


# --- sharded over 8 virtual devices -------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_report():
  return run_json_script("proxy_sharding_check.py")


def test_sharded_value_and_gradients_equal_single_device(sharded_report):
  """Both losses, with and without masked proxies: classes on one device only, proxies
  without positives, a sample without a positive; the gradient of the shard_map (as
  ``msjax.train`` takes it) and the per-device gradient inside it."""
  assert sharded_report["devices"] == 8
  results = sharded_report["results"]
  assert {r["name"] for r in results} == set(L.PROXY_NAMES) and len(results) == 6
  for r in results:
    for how in ("outer", "inner"):
      got = r[how]
      assert "error" not in got, (r["name"], how, got.get("error"))
      assert got["value"] == pytest.approx(r["ref_value"], rel=1e-12), r
      assert got["emb_err"] <= 1e-12 * r["emb_scale"], r
      assert got["proxies_err"] <= 1e-12 * r["proxies_scale"], r
      assert got["emb_sharding"] == "P('batch', None)", r
      if not r["masked"]:  # each device forms its rows' [4, C] block, never [32, C]
        assert "4x12" in got["dot_shapes"] and "32x12" not in got["dot_shapes"], r
    assert r["emb_scale"] > 0 and r["proxies_scale"] > 0, r
    if r["masked"]:
      assert r["masked_proxies_grad"] == 0.0, r


def test_pair_selection_gives_a_proxy_loss_one_proxy_per_class_by_default():
  """A square [B, C] block (B == C) must not be read as the batch's own pairs: the masks
  are the proxies' classes arange(C), as the loss's weights are."""
  emb, labels = make_batch("pk", 3, 2, 8, seed=4)             # 6 samples of classes 0..2
  proxies = unit(np.random.default_rng(5).normal(size=(6, 8)))  # 6 proxies: C == B
  sim = jnp.asarray(emb @ proxies.T)
  for name in L.PROXY_NAMES:
    s = L.pair_selection(sim, labels, loss=name)
    np.testing.assert_array_equal(s.pos, labels[:, None] == np.arange(6)[None, :])
    np.testing.assert_array_equal(s.neg, labels[:, None] != np.arange(6)[None, :])
    np.testing.assert_allclose(s.weights, L.get(name).weights(sim, labels))
    assert np.all(np.asarray(s.weights)[np.asarray(s.pos)] <= 0)


def test_the_memory_term_keeps_supcons_own_self_pair_rule():
  """Without an explicit ``self_pair`` the memory term drops SupCon's self pair by index,
  its released rule, not by value as for the MS family."""
  from msjax import memory
  assert memory.memory_self_pair(None, "supcon") == "index"
  assert memory.memory_self_pair(None, "ms") == "both"
  emb, labels = make_batch("pk", 4, 3, 8, seed=6)
  emb[1] = emb[0]  # an exact duplicate of anchor 0 in its own class
  assert labels[0] == labels[1]
  mem = memory.enqueue(memory.create(24, 8, jnp.float64), jnp.asarray(emb), jnp.asarray(labels))
  slots = memory.slots(memory.create(24, 8, jnp.float64), len(labels))
  kw = dict(anchor_slots=slots, loss="supcon")
  default = memory.memory_loss(jnp.asarray(emb), jnp.asarray(labels), mem, **kw)
  by_index = memory.memory_loss(jnp.asarray(emb), jnp.asarray(labels), mem, self_pair="index",
                                **kw)
  by_both = memory.memory_loss(jnp.asarray(emb), jnp.asarray(labels), mem, self_pair="value",
                               **kw)
  assert float(default) == pytest.approx(float(by_index), rel=1e-12)
  assert float(default) != pytest.approx(float(by_both), rel=1e-6)  # the duplicate counts
