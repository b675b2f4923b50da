"""Pair-weight telemetry: what General Pair Weighting says the loss did with a batch.

At every logging step the training loop hands the step's embeddings (train mode, the very
ones the loss saw) and labels to the function ``make_telemetry_fn`` builds, and writes what
it returns, under ``gpw/``, to TensorBoard and ``metrics.jsonl``:

- ``pos_weight_mean`` / ``neg_weight_mean``, ``pos_weight_max`` / ``neg_weight_max``: the
  paper's per-anchor pair weights ``w⁺`` and ``w⁻`` (``∂L/∂S`` times the batch size, so
  they do not shrink with it) over the pairs the loss selected;
- ``pos_mined_fraction`` / ``neg_mined_fraction``: selected over candidate pairs (MS
  mining for ``ms``; a non-zero weight for the other losses);
- ``empty_anchor_fraction``: anchors whose selected positives or negatives are empty,
  which contribute nothing to the loss;
- ``{pos,neg}_sim_q{05,25,50,75,95}``: quantiles of the candidate pairs' similarities;
- ``{pos,neg}_weight_q{05,...,95}``: quantiles of the non-zero weights.

With a cross-batch memory (``msjax.memory``), ``make_memory_telemetry_fn`` gives the same
keys for the batch's pairs with the memory, written under ``gpw_memory/``: which memory
negatives carry weight, next to ``gpw/``'s batch negatives. A proxy loss is summarised
over its sample-to-proxy pairs instead (``make_proxy_telemetry_fn``), under ``gpw/``.

Beside these scalars it returns the histograms behind the quantiles, in coarser bins
(``HISTOGRAM_BINS``, edges from ``histogram_edges``), which the loop writes as TensorBoard
histograms: ``pos_sim`` and ``neg_sim`` (candidate pairs' similarities, bins of 1/32) and
``pos_weight_log10`` and ``neg_weight_log10`` (log10 of the non-zero weights, bins of
0.33 decades).

The computation is sharded like the loss: each device takes its anchors' ``[B/n, B]``
rows against the gathered embeddings, so no device holds the ``[B, B]`` matrix. Sums and
maxima are reduced over devices; quantiles come from histograms summed over devices, which
places each one within one bin of the exact order statistic (``SIM_BIN`` in similarity,
a factor ``WEIGHT_BIN_RATIO`` in weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from msjax import losses, sharding
from msjax.losses import gpw

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SIM_RANGE = (-1.0, 1.0)
SIM_BINS = 4096
LOG10_WEIGHT_RANGE = (-38.0, 4.0)  # float32's normal range; smaller weights count at 1e-38
WEIGHT_BINS = 8192
SIM_BIN = (SIM_RANGE[1] - SIM_RANGE[0]) / SIM_BINS
WEIGHT_BIN_RATIO = 10.0 ** ((LOG10_WEIGHT_RANGE[1] - LOG10_WEIGHT_RANGE[0]) / WEIGHT_BINS)

_SUMS = ("anchors", "empty_anchors", "pos_pairs", "neg_pairs", "pos_selected",
         "neg_selected", "pos_weight_sum", "neg_weight_sum")
_MAXES = ("pos_weight_max", "neg_weight_max")
_HISTOGRAMS = ("pos_sim", "neg_sim", "pos_weight", "neg_weight")


# TensorBoard histograms: the fine histograms above, HISTOGRAM_GROUP bins summed into one.
HISTOGRAM_GROUP = 64
_HISTOGRAM_NAMES = {"pos_sim": "pos_sim", "neg_sim": "neg_sim",
                    "pos_weight": "pos_weight_log10", "neg_weight": "neg_weight_log10"}
HISTOGRAM_BINS = {"pos_sim": SIM_BINS // HISTOGRAM_GROUP,
                  "neg_sim": SIM_BINS // HISTOGRAM_GROUP,
                  "pos_weight_log10": WEIGHT_BINS // HISTOGRAM_GROUP,
                  "neg_weight_log10": WEIGHT_BINS // HISTOGRAM_GROUP}


def histogram_edges(name: str) -> np.ndarray:
  """The ``HISTOGRAM_BINS[name] + 1`` bin edges of histogram ``name`` (similarity, or
  log10 of the weight); the end bins also count the values beyond them."""
  lo, hi = SIM_RANGE if name.endswith("_sim") else LOG10_WEIGHT_RANGE
  return np.linspace(lo, hi, HISTOGRAM_BINS[name] + 1)


def coarse_histograms(stats: dict) -> dict:
  """``partial_stats``' histograms summed into ``HISTOGRAM_BINS``: ``{name: counts}``."""
  return {name: stats[kind].reshape(-1, HISTOGRAM_GROUP).sum(axis=1)
          for kind, name in _HISTOGRAM_NAMES.items()}


def quantile_key(kind: str, q: float) -> str:
  """``("pos_sim", 0.05) -> "pos_sim_q05"``."""
  return f"{kind}_q{round(100 * q):02d}"


KEYS = ("pos_weight_mean", "pos_weight_max", "neg_weight_mean", "neg_weight_max",
        "pos_mined_fraction", "neg_mined_fraction", "empty_anchor_fraction",
        *(quantile_key(k, q) for k in _HISTOGRAMS for q in QUANTILES))


def _histogram(x, mask, lo: float, hi: float, bins: int):
  """Counts of ``x[mask]`` in ``bins`` equal bins over [lo, hi]; values outside count in
  the end bins."""
  index = jnp.floor((x - lo) * (bins / (hi - lo)))
  index = jnp.clip(index, 0, bins - 1).astype(jnp.int32)
  return jnp.zeros((bins,), jnp.int32).at[index.ravel()].add(mask.ravel().astype(jnp.int32))


def histogram_quantiles(hist, lo: float, hi: float, qs=QUANTILES):
  """Quantiles of the values binned in ``hist`` (equal bins over [lo, hi]).

  The ``q`` quantile is taken as the value of rank ``ceil(q·N)`` (NumPy's
  ``method="inverted_cdf"``); the result lies in that value's bin, interpolated linearly
  inside it, so it is within one bin width of the exact one. NaN when ``hist`` is empty.
  """
  hist = hist.astype(jnp.float32)
  cdf = jnp.cumsum(hist)
  total = cdf[-1]
  width = (hi - lo) / hist.shape[0]
  out = []
  for q in qs:
    target = jnp.maximum(q * total, 0.5)  # rank ceil(q·N) ≥ 1
    b = jnp.clip(jnp.searchsorted(cdf, target, side="left"), 0, hist.shape[0] - 1)
    below = cdf[b] - hist[b]
    inside = jnp.clip((target - below) / jnp.maximum(hist[b], 1.0), 0.0, 1.0)
    out.append(jnp.where(total > 0, lo + (b + inside) * width, jnp.nan))
  return out


def partial_stats(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                  loss="ms", **hparams):
  """Additive (sums, histograms) and max statistics of one block of anchor rows.

  Blocks of disjoint anchors combine by adding the sums and histograms and taking the
  maximum of the maxima; ``finalize`` turns the result into ``KEYS``.
  """
  s = losses.pair_selection(sim, labels, loss=loss, ref_labels=ref_labels,
                            anchor_index=anchor_index, ref_valid=ref_valid, batch_size=1,
                            **hparams)
  return _summary_stats(sim, s.weights, s.pos, s.neg, s.selected)


def _summary_stats(sim, weights, pos, neg, selected):
  """``partial_stats`` from a block's weights (per anchor), candidate pairs and selection."""
  sim = jnp.asarray(sim, jnp.promote_types(jnp.asarray(sim).dtype, jnp.float32))
  w_pos, w_neg, pos_sel, neg_sel, empty = gpw.select_weights(weights, pos, neg, selected)

  def count(mask):
    return jnp.sum(mask, dtype=jnp.int32)

  def log10(w):
    return jnp.log10(jnp.where(w > 0, w, 1.0))

  return {
      "anchors": jnp.asarray(sim.shape[0], jnp.int32),
      "empty_anchors": count(empty),
      "pos_pairs": count(pos), "neg_pairs": count(neg),
      "pos_selected": count(pos_sel), "neg_selected": count(neg_sel),
      "pos_weight_sum": jnp.sum(jnp.where(pos_sel, w_pos, 0.0)),
      "neg_weight_sum": jnp.sum(jnp.where(neg_sel, w_neg, 0.0)),
      "pos_weight_max": jnp.max(jnp.where(pos_sel, w_pos, 0.0)),
      "neg_weight_max": jnp.max(jnp.where(neg_sel, w_neg, 0.0)),
      "pos_sim": _histogram(sim, pos, *SIM_RANGE, SIM_BINS),
      "neg_sim": _histogram(sim, neg, *SIM_RANGE, SIM_BINS),
      "pos_weight": _histogram(log10(w_pos), pos & (w_pos > 0), *LOG10_WEIGHT_RANGE,
                               WEIGHT_BINS),
      "neg_weight": _histogram(log10(w_neg), neg & (w_neg > 0), *LOG10_WEIGHT_RANGE,
                               WEIGHT_BINS),
  }


def finalize(stats: dict) -> dict:
  """``partial_stats`` of the whole batch → the scalars named in ``KEYS``, in the
  weights' dtype (float32, or float64 for float64 similarities)."""
  dtype = jnp.promote_types(jnp.result_type(stats["pos_weight_sum"]), jnp.float32)
  f = {k: jnp.asarray(v, dtype) for k, v in stats.items() if k not in _HISTOGRAMS}

  def ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.nan)

  out = {
      "pos_weight_mean": ratio(f["pos_weight_sum"], f["pos_selected"]),
      "pos_weight_max": f["pos_weight_max"],
      "neg_weight_mean": ratio(f["neg_weight_sum"], f["neg_selected"]),
      "neg_weight_max": f["neg_weight_max"],
      "pos_mined_fraction": ratio(f["pos_selected"], f["pos_pairs"]),
      "neg_mined_fraction": ratio(f["neg_selected"], f["neg_pairs"]),
      "empty_anchor_fraction": ratio(f["empty_anchors"], f["anchors"]),
  }
  for kind in ("pos_sim", "neg_sim"):
    for q, v in zip(QUANTILES, histogram_quantiles(stats[kind], *SIM_RANGE)):
      out[quantile_key(kind, q)] = v
  for kind in ("pos_weight", "neg_weight"):
    for q, v in zip(QUANTILES, histogram_quantiles(stats[kind], *LOG10_WEIGHT_RANGE)):
      # Interpolating inside the top bin may overshoot the largest weight, known exactly.
      out[quantile_key(kind, q)] = jnp.minimum(10.0 ** v, f[f"{kind}_max"])
  return out


def batch_telemetry(sim, labels, *, loss="ms", **hparams) -> dict:
  """``KEYS`` of one square batch on one device (the notebook's and the tests' entry)."""
  return finalize(partial_stats(sim, labels, loss=loss, **hparams))


def _sharded_summary(local_stats, mesh, *, replicated: int = 0):
  """Jitted ``(embeddings, labels, *replicated args) -> (scalars, histograms)``:
  ``local_stats`` (one device's ``partial_stats``) under ``shard_map``, the embeddings
  and labels sharded over the batch axis, then combined over devices and finalised."""
  axis = sharding.BATCH_AXIS

  def local(*args):
    stats = {k: (jax.lax.pmax if k in _MAXES else jax.lax.psum)(v, axis)
             for k, v in local_stats(*args).items()}
    return finalize(stats), coarse_histograms(stats)

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(PartitionSpec(axis),) * 2 + (PartitionSpec(),) * replicated,
                     out_specs=(PartitionSpec(), PartitionSpec()))
  return jax.jit(fn)


def make_telemetry_fn(mesh, loss: str, hparams: dict):
  """Jitted ``(embeddings [B, D], labels [B]) -> ({KEYS: scalar}, {name: counts})``, the
  inputs batch-sharded: the scalars and the ``coarse_histograms``.

  ``loss`` and ``hparams`` are the training loss's name and keywords
  (``train.loss_kwargs(config.loss)``), so the weights are the ones training used.
  """
  axis = sharding.BATCH_AXIS

  def local(emb, labels):
    emb = emb.astype(jnp.float32)
    local_count = emb.shape[0]
    all_emb = jax.lax.all_gather(emb, axis, tiled=True)
    all_labels = jax.lax.all_gather(labels, axis, tiled=True)
    anchor_index = (jax.lax.axis_index(axis) * local_count
                    + jnp.arange(local_count, dtype=jnp.int32))
    sim = jnp.matmul(emb, all_emb.T, precision=jax.lax.Precision.HIGHEST)
    return partial_stats(sim, labels, ref_labels=all_labels, anchor_index=anchor_index,
                         loss=loss, **hparams)

  return _sharded_summary(local, mesh)


def make_proxy_telemetry_fn(mesh, loss: str, hparams: dict):
  """Jitted ``(embeddings [B, D], labels [B], proxies [C, D]) -> (scalars, histograms)``
  for a proxy loss: the same ``KEYS`` over the sample-to-proxy pairs (a positive is a
  sample's own class proxy). Each device takes its samples' ``[B/n, C]`` rows; the
  weights are per sample (``batch_size=1``), and Proxy-Anchor's per-proxy sums run over
  the whole batch (``axis_name``), as in training.
  """
  axis = sharding.BATCH_AXIS

  def local(emb, labels, proxies):
    unit = losses.normalize_proxies(proxies.astype(jnp.float32))
    sim = jnp.matmul(emb.astype(jnp.float32), unit.T, precision=jax.lax.Precision.HIGHEST)
    s = losses.pair_selection(sim, labels, loss=loss,
                              ref_labels=jnp.arange(proxies.shape[0], dtype=jnp.int32),
                              **{**hparams, "batch_size": 1, "axis_name": axis})
    return _summary_stats(sim, s.weights, s.pos, s.neg, s.selected)

  return _sharded_summary(local, mesh, replicated=1)


def make_memory_telemetry_fn(mesh, loss: str, hparams: dict):
  """Jitted ``(embeddings [B, D], labels [B], memory) -> (scalars, histograms)``: the same
  ``KEYS`` and histograms as ``make_telemetry_fn``, for the batch's pairs with the
  cross-batch memory (``msjax.memory``) as the memory term sees them.

  ``memory`` is the state's memory after the step, so it holds the batch's own copies in
  the ``B`` slots before its pointer; those are the anchors' self pairs and are dropped
  as in training. Only filled slots count. Each device takes its anchors' ``[B/n, M]``
  rows against the replicated memory.
  """
  from msjax import memory as memory_lib
  axis = sharding.BATCH_AXIS
  hparams = dict(hparams, self_pair=memory_lib.memory_self_pair(
      hparams.get("self_pair"), loss))

  def local(emb, labels, mem):
    emb = emb.astype(jnp.float32)
    local_count = emb.shape[0]
    batch = local_count * jax.lax.axis_size(axis)
    first = (mem.pointer - batch) % mem.size  # where this batch was written
    own = jax.lax.axis_index(axis) * local_count + jnp.arange(local_count, dtype=jnp.int32)
    sim = jnp.matmul(emb, mem.embeddings.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
    return partial_stats(sim, labels, ref_labels=mem.labels,
                         anchor_index=(first + own) % mem.size,
                         ref_valid=memory_lib.valid(mem), loss=loss, **hparams)

  return _sharded_summary(local, mesh, replicated=1)

