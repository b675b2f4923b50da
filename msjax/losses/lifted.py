"""Lifted structure loss in the GPW per-anchor form (Song et al., CVPR 2016; GPW form of Wang et al. 2019).

    L = 1/m Σ_i [ λ + 1/s·log Σ_{k∈P_i} e^{−s·S_ik} + 1/s·log Σ_{k∈N_i} e^{s·S_ik} ]_+

Weights depend on the negatives relative to each other (Similarity-N): on an anchor with
an active hinge, ``w⁻_ij = softmax_{N_i}(s·S)_j`` and ``w⁺_ij = softmax_{P_i}(−s·S)_j``.
An anchor without positives or without negatives contributes 0. ``lam`` is the margin λ
(1 as in Song et al.), ``scale`` the inverse temperature s (1 in the paper's form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _terms(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, lam, scale,
           self_pair, self_threshold, name):
  pairs = gpw.checked_pairs(name, sim, labels, ref_labels=ref_labels,
                            anchor_index=anchor_index, ref_valid=ref_valid,
                            batch_size=batch_size, self_pair=self_pair, scale=scale)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  s = pairs.sim
  inner = (lam + gpw.masked_log_sum_exp(-scale * s, pos, plus_one=False) / scale
           + gpw.masked_log_sum_exp(scale * s, neg, plus_one=False) / scale)
  has_both = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  # The hinge is decided on a stop-gradient copy so the gradient at exactly 0 is 0.
  active = has_both & (jax.lax.stop_gradient(inner) > 0)
  return pairs, pos, neg, inner, active


def lifted_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None, lam=1.0,
                scale=1.0, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                batch_size=None):
  """Lifted structure loss (formula in the module docstring). Returns a scalar."""
  pairs, _, _, inner, active = _terms(sim, labels, ref_labels, anchor_index, ref_valid,
                                      batch_size, lam, scale, self_pair, self_threshold,
                                      "lifted_loss")
  return jnp.sum(jnp.where(active, inner, 0.0)) / pairs.batch_size


def lifted_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                   lam=1.0, scale=1.0, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                   batch_size=None):
  """Analytic ``∂lifted_loss/∂S``: softmax weights on anchors whose hinge is active, /m."""
  pairs, pos, neg, _, active = _terms(sim, labels, ref_labels, anchor_index, ref_valid,
                                      batch_size, lam, scale, self_pair, self_threshold,
                                      "lifted_weights")
  s = pairs.sim
  w_neg = gpw.masked_softmax(scale * s, neg, plus_one=False)
  w_pos = gpw.masked_softmax(-scale * s, pos, plus_one=False)
  return jnp.where(active[:, None], w_neg - w_pos, 0.0) / pairs.batch_size
