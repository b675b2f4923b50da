"""Binomial deviance loss in GPW form (Yi et al., ICPR 2014), per-anchor means.

    L = 1/m Σ_i [ 1/|P_i| Σ_{j∈P_i} 1/α log(1 + e^{−α(S_ij−λ)})
                + 1/|N_i| Σ_{j∈N_i} 1/β log(1 + e^{β(S_ij−λ)}) ]

Weights depend on the pair's own similarity (Similarity-S):
``w⁺_ij = 1/(e^{α(S_ij−λ)} + 1) / |P_i|`` and ``w⁻_ij = 1/(e^{β(λ−S_ij)} + 1) / |N_i|``.
An empty P_i or N_i contributes 0 for its half. Defaults α=2, λ=0.5 as Yi et al.;
β=50 is their scale α times the negative cost C=25.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, alpha, beta,
             self_pair, name):
  return gpw.checked_pairs(name, sim, labels, ref_labels=ref_labels,
                           anchor_index=anchor_index, ref_valid=ref_valid,
                           batch_size=batch_size, self_pair=self_pair, alpha=alpha,
                           beta=beta)


def _per_anchor_mean(x, mask):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.maximum(gpw.row_count(mask), 1)


def binomial_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                  alpha=2.0, beta=50.0, lam=0.5, self_pair="value",
                  self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Binomial deviance loss (formula in the module docstring). Returns a scalar."""
  pairs = _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, alpha,
                   beta, self_pair, "binomial_loss")
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  s = pairs.sim
  per_anchor = (_per_anchor_mean(jax.nn.softplus(-alpha * (s - lam)), pos) / alpha
                + _per_anchor_mean(jax.nn.softplus(beta * (s - lam)), neg) / beta)
  return jnp.sum(per_anchor) / pairs.batch_size


def binomial_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                     alpha=2.0, beta=50.0, lam=0.5, self_pair="value",
                     self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Analytic ``∂binomial_loss/∂S``: ``w⁻`` on negatives, ``−w⁺`` on positives, each /m."""
  pairs = _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, alpha,
                   beta, self_pair, "binomial_weights")
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  s = pairs.sim
  w_pos = 1.0 / (jnp.exp(alpha * (s - lam)) + 1.0)
  w_neg = 1.0 / (jnp.exp(beta * (lam - s)) + 1.0)
  n_pos = jnp.maximum(gpw.row_count(pos), 1)[:, None]
  n_neg = jnp.maximum(gpw.row_count(neg), 1)[:, None]
  weights = jnp.where(neg, w_neg / n_neg, 0.0) - jnp.where(pos, w_pos / n_pos, 0.0)
  return weights / pairs.batch_size
