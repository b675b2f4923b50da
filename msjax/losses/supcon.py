"""Supervised contrastive loss in GPW form (Khosla et al., NeurIPS 2020; the "out" form).

    L = 1/m Σ_i (τ/τ_b) [ log Σ_{k∈A_i} e^{S_ik/τ} − 1/|P_i| Σ_{p∈P_i} S_ip/τ ],   A_i = P_i ∪ N_i

the positives' log-likelihoods averaged outside the log (the paper's ``L^sup_out``),
every other reference in the denominator, temperature τ and the released code's
``base_temperature`` τ_b. With ``p_ij = softmax_{A_i}(S/τ)_j`` the pair weights are::

    w⁻_ij = p_ij / τ_b            w⁺_ij = (1/|P_i| − p_ij) / τ_b

SupCon reads N through the softmax and S through the pair's own term, and — unlike every
other loss here — a positive's weight can change sign: a positive whose share of the
softmax exceeds ``1/|P_i|`` (one positive much closer than the others) is pushed *away*
from the anchor, towards the other positives' level. The sum of an anchor's positive
weights, ``(1 − Σ_{P_i} p)/τ_b``, is never negative.

Defaults follow the released code (HobbitLong/SupContrast): τ = τ_b = 0.07, and the self
pair dropped by index (``self_pair="index"``). An anchor without positives contributes 0
(the first release divides 0 by 0 there); the sum is divided by the batch size m.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _check(name, sim, labels, ref_labels, anchor_index, ref_valid, batch_size, temperature,
           base_temperature, self_pair):
  return gpw.checked_pairs(name, sim, labels, ref_labels=ref_labels,
                           anchor_index=anchor_index, ref_valid=ref_valid,
                           batch_size=batch_size, self_pair=self_pair,
                           temperature=temperature, base_temperature=base_temperature)


def supcon_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                temperature=0.07, base_temperature=0.07, self_pair="index",
                self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Supervised contrastive loss on a similarity block (formula in the module docstring).

  Arguments as ``ms_loss``; ``temperature`` is τ, ``base_temperature`` τ_b (the loss is
  scaled by τ/τ_b). ``self_pair`` also decides which columns join the denominator A_i:
  the anchor's own column never does. Returns the scalar loss.
  """
  pairs = _check("supcon_loss", sim, labels, ref_labels, anchor_index, ref_valid, batch_size,
                 temperature, base_temperature, self_pair)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  logits = pairs.sim / temperature
  n_pos = gpw.row_count(pos)
  mean_pos = jnp.sum(jnp.where(pos, logits, 0.0), axis=-1) / jnp.maximum(n_pos, 1)
  per_anchor = gpw.masked_log_sum_exp(logits, pos | neg, plus_one=False) - mean_pos
  scale = temperature / base_temperature
  return scale * jnp.sum(jnp.where(n_pos > 0, per_anchor, 0.0)) / pairs.batch_size


class _RowStats(NamedTuple):
  """Anchor i's softmax normaliser and positive count; ``[Bq, 1]`` (or ``[1, B]``: Wᵀ)."""

  log_norm: jax.Array
  inv_pos: jax.Array  # 1/|P_i|, 0 for an anchor without positives (it contributes 0)
  value: jax.Array


def _pair_weights(logits, pos, neg, stats, base_temperature):
  p = jnp.exp(jnp.where(pos | neg, logits - stats.log_norm, -jnp.inf))
  w = jnp.where(pos, p - stats.inv_pos, p)
  return jnp.where(stats.inv_pos > 0, w, 0.0) / base_temperature


def _fused(name, sim, labels, *, ref_labels, anchor_index, ref_valid, temperature,
           base_temperature, self_pair, self_threshold, batch_size, symmetric):
  """``(loss, W)``, or ``(loss, W + Wᵀ)`` for a symmetric square S, from one row pass."""
  pairs = _check(name, sim, labels, ref_labels, anchor_index, ref_valid, batch_size,
                 temperature, base_temperature, self_pair)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  logits = jax.lax.stop_gradient(pairs.sim) / temperature
  n_pos = gpw.row_count(pos)[:, None]
  inv_pos = jnp.where(n_pos > 0, 1.0 / jnp.maximum(n_pos, 1), 0.0).astype(logits.dtype)
  log_norm = gpw.masked_log_sum_exp(logits, pos | neg, plus_one=False)[:, None]
  mean_pos = jnp.sum(jnp.where(pos, logits, 0.0), axis=-1, keepdims=True) * inv_pos
  value = jnp.where(n_pos > 0, log_norm - mean_pos, 0.0) * (temperature / base_temperature)
  stats = _RowStats(log_norm, inv_pos, value)
  weights = _pair_weights(logits, pos, neg, stats, base_temperature)
  if symmetric:  # W_ji from anchor j's statistics: S, the labels and the masks are symmetric
    weights += _pair_weights(logits, pos, neg, _RowStats(*(x.T for x in stats)),
                             base_temperature)
  return jnp.sum(value) / pairs.batch_size, weights / pairs.batch_size


def supcon_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                   temperature=0.07, base_temperature=0.07, self_pair="index",
                   self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Analytic ``∂supcon_loss/∂S``: ``+w⁻/m`` on negatives, ``−w⁺/m`` on positives."""
  return supcon_value_and_weights(
      sim, labels, ref_labels=ref_labels, anchor_index=anchor_index, ref_valid=ref_valid,
      temperature=temperature, base_temperature=base_temperature, self_pair=self_pair,
      self_threshold=self_threshold, batch_size=batch_size)[1]


def supcon_value_and_weights(sim, labels, *, ref_labels=None, anchor_index=None,
                             ref_valid=None, temperature=0.07, base_temperature=0.07,
                             self_pair="index", self_threshold=gpw.SELF_THRESHOLD,
                             batch_size=None):
  """``(supcon_loss, supcon_weights)`` from one set of row statistics."""
  return _fused("supcon_weights", sim, labels, ref_labels=ref_labels,
                anchor_index=anchor_index, ref_valid=ref_valid, temperature=temperature,
                base_temperature=base_temperature, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=False)


def supcon_value_and_symmetric_weights(sim, labels, *, anchor_index=None, temperature=0.07,
                                       base_temperature=0.07, self_pair="index",
                                       self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """``(supcon_loss, W + Wᵀ)`` for a square, symmetric S, with no B×B transpose."""
  return _fused("supcon_value_and_symmetric_weights", sim, labels, ref_labels=None,
                anchor_index=anchor_index, ref_valid=None, temperature=temperature,
                base_temperature=base_temperature, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=True)
