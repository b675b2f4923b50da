"""Batch-all triplet loss in GPW form (Hoffer & Ailon 2015; Schroff et al. 2015), on cosine similarities.

    L = 1/m Σ_i Σ_{p∈P_i} Σ_{n∈N_i} [S_in − S_ip + margin]_+

A pair's weight is the number of active triplets it belongs to (Similarity-P: relative to
the positives): ``w⁻_in = #{p ∈ P_i : S_in > S_ip − margin}``,
``w⁺_ip = #{n ∈ N_i : S_in > S_ip − margin}``, each /m. A triplet is active when
``S_in > S_ip − margin`` (strict; at equality its gradient is 0).

Nothing of size B³ is built: per anchor, the negatives are sorted once and each positive
finds its active negatives and their sum by binary search, O(B² log B) in all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _pairs(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, margin, self_pair,
           self_threshold, name):
  """Checks inputs: ``(pairs, pos, neg, neg_sorted, threshold)``.

  ``neg_sorted`` holds each row's negatives in ascending order, non-negatives first as
  ``-inf`` (never above a finite threshold); ``threshold = S − margin`` per column.
  """
  gpw.check_choice(name, "self_pair", self_pair, gpw.SELF_PAIR_MODES)
  gpw.check_non_negative(name, margin=margin)
  pairs = gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                            ref_valid=ref_valid, batch_size=batch_size, loss_name=name)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  neg_sorted = jnp.sort(jnp.where(neg, pairs.sim, -jnp.inf), axis=-1)
  return pairs, pos, neg, neg_sorted, pairs.sim - margin


# Row-wise binary searches; module-level so that eager calls hit the compilation cache.
_rows_searchsorted_right = jax.vmap(functools.partial(jnp.searchsorted, side="right"))
_rows_searchsorted_left = jax.vmap(functools.partial(jnp.searchsorted, side="left"))


def _count_greater(sorted_values, queries):
  """Row-wise ``#{j : sorted_values[j] > q}`` for each query (rows sorted ascending).

  Also returns the index of the first such value (``Br`` when there is none).
  """
  below_or_equal = _rows_searchsorted_right(sorted_values, queries)
  return sorted_values.shape[-1] - below_or_equal, below_or_equal


def triplet_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                 margin=0.1, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                 batch_size=None):
  """Batch-all triplet loss (formula in the module docstring). Returns a scalar."""
  pairs, pos, _, neg_sorted, threshold = _pairs(sim, labels, ref_labels, anchor_index,
                                                ref_valid, batch_size, margin, self_pair,
                                                self_threshold, "triplet_loss")
  finite = jnp.where(jnp.isfinite(neg_sorted), neg_sorted, 0.0)
  # suffix[k] = Σ_{j >= k} neg_sorted[j], with suffix[Br] = 0.
  suffix = jnp.concatenate(
      [jnp.cumsum(finite[:, ::-1], axis=-1)[:, ::-1], jnp.zeros_like(finite[:, :1])], axis=-1)
  count, first = _count_greater(jax.lax.stop_gradient(neg_sorted),
                                jax.lax.stop_gradient(threshold))
  active_sum = jnp.take_along_axis(suffix, first, axis=-1)
  per_positive = active_sum - count * threshold
  return jnp.sum(jnp.where(pos, per_positive, 0.0)) / pairs.batch_size


def triplet_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                    margin=0.1, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                    batch_size=None):
  """Analytic ``∂triplet_loss/∂S``: active-triplet counts, ``+`` on negatives, ``−`` on positives, /m."""
  pairs, pos, neg, neg_sorted, threshold = _pairs(sim, labels, ref_labels, anchor_index,
                                                  ref_valid, batch_size, margin, self_pair,
                                                  self_threshold, "triplet_weights")
  s = pairs.sim
  # w⁺_ip: negatives above the positive's threshold.
  w_pos, _ = _count_greater(neg_sorted, threshold)
  # w⁻_in: positives whose threshold lies below S_in (thresholds of non-positives = +inf).
  thr_sorted = jnp.sort(jnp.where(pos, threshold, jnp.inf), axis=-1)
  w_neg = _rows_searchsorted_left(thr_sorted, s)
  weights = jnp.where(neg, w_neg, 0) - jnp.where(pos, w_pos, 0)
  return weights.astype(s.dtype) / pairs.batch_size
