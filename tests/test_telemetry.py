"""Pair-weight telemetry against a float64 loop oracle, and sharded against one device."""

import functools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import msjax.losses as L
from msjax import telemetry
from batches import make_batch
from scripts_run import run_json_script

SELF = 1.0 - 1e-5
MS = dict(alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1)


def loop_ms_telemetry(sim, labels, alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1):
  """The released mining and the paper's weights, one anchor and one pair at a time."""
  sim = np.asarray(sim, np.float64)
  pos_sims, neg_sims, pos_w, neg_w = [], [], [], []
  n_pos = n_neg = sel_pos = sel_neg = empty = 0
  for i in range(len(labels)):
    pos = [j for j in range(len(labels)) if labels[j] == labels[i] and sim[i, j] < SELF]
    neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
    n_pos, n_neg = n_pos + len(pos), n_neg + len(neg)
    pos_sims += [sim[i, j] for j in pos]
    neg_sims += [sim[i, j] for j in neg]
    mined_pos, mined_neg = [], []
    if pos and neg:
      hardest_pos = min(sim[i, j] for j in pos)
      hardest_neg = max(sim[i, j] for j in neg)
      mined_neg = [j for j in neg if sim[i, j] + epsilon > hardest_pos]
      mined_pos = [j for j in pos if sim[i, j] - epsilon < hardest_neg]
    sel_pos, sel_neg = sel_pos + len(mined_pos), sel_neg + len(mined_neg)
    active = bool(mined_pos) and bool(mined_neg)
    empty += not active
    pos_norm = 1 + sum(math.exp(-alpha * (sim[i, k] - lam)) for k in mined_pos)
    neg_norm = 1 + sum(math.exp(beta * (sim[i, k] - lam)) for k in mined_neg)
    pos_w += [math.exp(-alpha * (sim[i, j] - lam)) / pos_norm if active else 0.0
              for j in mined_pos]
    neg_w += [math.exp(beta * (sim[i, j] - lam)) / neg_norm if active else 0.0
              for j in mined_neg]
  return {"n_pos": n_pos, "n_neg": n_neg, "sel_pos": sel_pos, "sel_neg": sel_neg,
          "empty": empty / len(labels), "pos_sims": pos_sims, "neg_sims": neg_sims,
          "pos_w": pos_w, "neg_w": neg_w}


def _quantile(values, q):
  return np.quantile(values, q, method="inverted_cdf") if len(values) else math.nan


def check_against_oracle(got, o, *, rtol):
  """``got`` (telemetry KEYS) against ``loop_ms_telemetry``'s ``o``."""
  def close(key, want, tol=rtol):
    value = got[key]
    if want is None or (isinstance(want, float) and math.isnan(want)):
      assert value is None or math.isnan(value), (key, value)
    else:
      assert value == pytest.approx(want, rel=tol, abs=1e-9), key

  close("pos_mined_fraction", o["sel_pos"] / o["n_pos"] if o["n_pos"] else None)
  close("neg_mined_fraction", o["sel_neg"] / o["n_neg"] if o["n_neg"] else None)
  close("empty_anchor_fraction", o["empty"])
  for side in ("pos", "neg"):
    w = np.asarray(o[f"{side}_w"])
    close(f"{side}_weight_mean", w.mean() if len(w) else None)
    close(f"{side}_weight_max", w.max() if len(w) else 0.0)
    positive = w[w > 0]
    for q in telemetry.QUANTILES:
      key = telemetry.quantile_key(f"{side}_weight", q)
      want, value = _quantile(positive, q), got[key]
      if math.isnan(want):
        assert value is None or math.isnan(value), key
      else:  # within one log-spaced bin
        assert want / telemetry.WEIGHT_BIN_RATIO * (1 - 1e-5) <= value, key
        assert value <= want * telemetry.WEIGHT_BIN_RATIO * (1 + 1e-5), key
      key = telemetry.quantile_key(f"{side}_sim", q)
      want, value = _quantile(o[f"{side}_sims"], q), got[key]
      if math.isnan(want):
        assert value is None or math.isnan(value), key
      else:  # within one bin, plus float32 rounding of the similarity
        assert abs(value - want) <= telemetry.SIM_BIN + 1e-6, key


def check_histograms(got, o, *, tol=0.0):
  """The TensorBoard histograms against the oracle's similarities and weights, each
  value's bin counted one at a time (bin ``floor((x - lo) / width)``, the end bins also
  counting what lies beyond them; ``x - lo`` rounds as the float64 telemetry's does, so a
  value within rounding of an edge, as tied similarities of 0 are, lands alike).

  With ``tol`` (float32 telemetry against the float64 oracle) a value within ``tol`` of
  an edge may fall on either side of it: the counts below each edge may differ by at most
  the number of such values, and the totals must agree."""
  assert set(got) == set(telemetry.HISTOGRAM_BINS)
  for name in got:
    side, what = name.split("_", 1)
    edges = telemetry.histogram_edges(name)
    lo, hi, bins = edges[0], edges[-1], len(edges) - 1
    if what == "sim":
      values = o[f"{side}_sims"]
    else:
      values = [math.log10(w) for w in o[f"{side}_w"] if w > 0]
    want = [0] * bins
    for x in values:
      want[min(max(math.floor((x - lo) / (hi - lo) * bins), 0), bins - 1)] += 1
    if not tol:
      np.testing.assert_array_equal(got[name], want, err_msg=name)
      continue
    below_got, below_want = np.cumsum(got[name]), np.cumsum(want)
    assert below_got[-1] == below_want[-1], name
    for b, edge in enumerate(edges[1:-1]):
      near = sum(abs(x - edge) <= tol for x in values)
      assert abs(below_got[b] - below_want[b]) <= near, (name, edge)


KINDS = ["pk", "k1_mixed", "duplicates", "ties", "singletons", "one_class", "mined_out"]


@pytest.mark.parametrize("kind", KINDS)
def test_ms_telemetry_matches_a_loop_oracle(kind):
  emb, labels = make_batch(kind, 8, 4, 16, seed=5, spread=2.0)
  sim = emb @ emb.T
  got = {k: float(v) for k, v in telemetry.batch_telemetry(sim, labels, **MS).items()}
  oracle = loop_ms_telemetry(sim, labels, **MS)
  check_against_oracle(got, oracle, rtol=1e-9)
  stats = telemetry.partial_stats(sim, labels, **MS)
  check_histograms({k: np.asarray(v) for k, v in telemetry.coarse_histograms(stats).items()},
                   oracle)
  if kind == "mined_out":
    assert got["empty_anchor_fraction"] == 1.0 and math.isnan(got["pos_weight_mean"])
  if kind == "k1_mixed":  # single-image classes: anchors without a positive are empty
    assert 0 < got["empty_anchor_fraction"] < 1


@pytest.mark.parametrize("loss", ["binomial", "lifted", "contrastive", "triplet"])
def test_other_losses_match_their_gpw_summary(loss):
  emb, labels = make_batch("k1_mixed", 8, 4, 16, seed=6, spread=2.0)
  sim = emb @ emb.T
  got = telemetry.batch_telemetry(sim, labels, loss=loss)
  want = L.batch_gpw_summary(sim, labels, loss=loss, batch_size=1)
  for key in ("pos_mined_fraction", "neg_mined_fraction", "empty_anchor_fraction",
              "pos_weight_max", "neg_weight_max"):
    assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12, abs=1e-15), key
  # The summary's mean divides by selected pairs too.
  w = -np.asarray(L.get(loss).weights(sim, labels, batch_size=1))
  same = labels[:, None] == labels[None, :]
  pos = same & (sim < SELF)
  assert float(got["pos_weight_mean"]) == pytest.approx(w[pos & (w != 0)].mean(), rel=1e-12)


@functools.cache
def _masked_quantiles():
  import jax

  @jax.jit  # one shape (values padded to 900, the padding masked out): one compile
  def quantiles(x, mask):
    hist = telemetry._histogram(x, mask, -1.0, 1.0, telemetry.SIM_BINS)
    return telemetry.histogram_quantiles(hist, -1.0, 1.0)

  return quantiles


@given(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=1, max_size=300),
       st.booleans())
def test_histogram_quantiles_are_within_one_bin(values, repeat):
  x = np.asarray(values * (3 if repeat else 1), np.float64)  # repeats: ties
  padded = np.zeros(900)
  padded[:len(x)] = x
  got = _masked_quantiles()(padded, np.arange(900) < len(x))
  for q, value in zip(telemetry.QUANTILES, got):
    want = np.quantile(x, q, method="inverted_cdf")
    assert abs(float(value) - want) <= telemetry.SIM_BIN * (1 + 1e-6), (q, float(value), want)


def test_empty_histogram_gives_nan():
  import jax.numpy as jnp
  hist = jnp.zeros((telemetry.SIM_BINS,), jnp.int32)
  assert all(math.isnan(float(v)) for v in telemetry.histogram_quantiles(hist, -1.0, 1.0))


def test_sharded_telemetry_equals_one_device_and_the_oracle():
  """8 virtual devices, each with its anchors' [B/8, B] rows: the same numbers as one
  device and as the loop oracle, on nasty batches too, and no [B, B] array."""
  r = run_json_script("telemetry_sharding_check.py", timeout=600)
  assert r["devices"] == 8 and not r["square_in_hlo"]
  assert {(c["kind"], c["loss"]) for c in r["cases"]} >= {(k, "ms") for k in KINDS}
  assert {c["loss"] for c in r["cases"]} >= {"ms", "triplet", "proxy_anchor", "proxy_nca"}
  for case in r["cases"]:
    sharded, single = case["sharded"], case["single"]
    assert sharded.keys() == single.keys() == set(telemetry.KEYS)
    for key in telemetry.KEYS:
      if single[key] is None:
        assert sharded[key] is None, (case["kind"], case["loss"], key)
      else:
        assert sharded[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), (
            case["kind"], case["loss"], key)
    assert case["sharded_histograms"] == case["single_histograms"], (
        case["kind"], case["loss"])
    if case["loss"] == "ms":
      emb = np.asarray(case["emb"], np.float32).astype(np.float64)
      oracle = loop_ms_telemetry(emb @ emb.T, np.asarray(case["labels"]), **MS)
      check_against_oracle(sharded, oracle, rtol=1e-5)
      check_histograms(case["sharded_histograms"], oracle, tol=1e-5)
