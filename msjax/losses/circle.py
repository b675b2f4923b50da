"""Circle loss in GPW form (Sun et al., CVPR 2020, Eq. 6 with pair-wise labels), per anchor.

    L = 1/m Σ_i softplus( log Σ_{k∈N_i} e^{γ a⁻_ik (S_ik − Δ⁻)} + log Σ_{k∈P_i} e^{−γ a⁺_ik (S_ik − Δ⁺)} )

with the optima ``O⁺ = 1 + m``, ``O⁻ = −m``, the decision margins ``Δ⁺ = 1 − m``,
``Δ⁻ = m`` and the self-paced factors ``a⁺_ik = [O⁺ − S_ik]_+``, ``a⁻_ik = [S_ik − O⁻]_+``:
a similarity far from its optimum is scaled up. ``softplus(x) = log(1 + e^x)`` makes the
anchor's term ``log(1 + Σ_N Σ_P e^{γ(a⁻(S_n−Δ⁻) − a⁺(S_p−Δ⁺))})``, the paper's form.

The factors are constants of the gradient (``detach_alpha=True``), as in the reference
implementations the paper's results came with; the pair weights are then, with
``z_i`` the softplus argument and ``σ`` the logistic function::

    w⁻_ij = σ(z_i) · softmax_{N_i}(γ a⁻ (S − Δ⁻))_j · γ a⁻_ij
    w⁺_ij = σ(z_i) · softmax_{P_i}(−γ a⁺ (S − Δ⁺))_j · γ a⁺_ij

so a weight depends on the pair's own similarity twice (S), on the other pairs of its
side (N, through the softmax) and on the other side (P, through ``σ(z_i)``): Circle reads
S, P and N like MS, with soft weights where MS mines. ``detach_alpha=False``
differentiates the factors too: the multipliers become ``γ(2 − 2S_ij)`` for a positive
below ``O⁺`` and ``2γS_ij`` for a negative above ``O⁻`` (negative for ``−m < S < 0``: the
loss then pushes such a negative's similarity *up*, which is why the factors are held
constant). An anchor without positives or without negatives contributes 0. Defaults
``m = 0.4``, ``γ = 80``: the paper's fine-grained retrieval setting (CUB, Cars, SOP).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _factors(s, m, detach_alpha):
  """``(a⁺, a⁻)``, the self-paced factors, held constant unless ``detach_alpha=False``."""
  if detach_alpha:
    s = jax.lax.stop_gradient(s)
  return jnp.maximum(1.0 + m - s, 0.0), jnp.maximum(s + m, 0.0)


def _logits(s, m, gamma, detach_alpha):
  a_pos, a_neg = _factors(s, m, detach_alpha)
  return -gamma * a_pos * (s - (1.0 - m)), gamma * a_neg * (s - m)


def circle_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None, m=0.4,
                gamma=80.0, detach_alpha=True, self_pair="value",
                self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Circle loss on a similarity block (formula in the module docstring).

  Arguments as ``ms_loss``; ``m`` is the relaxation margin, ``gamma`` the scale γ, and
  ``detach_alpha`` holds the self-paced factors constant (the reference behaviour).
  Returns the scalar loss, float32 (float64 for float64 inputs).
  """
  pairs = gpw.checked_pairs("circle_loss", sim, labels, ref_labels=ref_labels,
                            anchor_index=anchor_index, ref_valid=ref_valid,
                            batch_size=batch_size, self_pair=self_pair, gamma=gamma)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  x_pos, x_neg = _logits(pairs.sim, m, gamma, detach_alpha)
  z = (gpw.masked_log_sum_exp(x_pos, pos, plus_one=False)
       + gpw.masked_log_sum_exp(x_neg, neg, plus_one=False))
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  return jnp.sum(jnp.where(active, jax.nn.softplus(z), 0.0)) / pairs.batch_size


class _RowStats(NamedTuple):
  """Anchor i's softmax normalisers and outer factor; ``[Bq, 1]`` (or ``[1, B]``: Wᵀ)."""

  log_norm_pos: jax.Array
  log_norm_neg: jax.Array
  outer: jax.Array  # σ(z_i) where the anchor is active, else 0
  value: jax.Array  # softplus(z_i) where active, else 0


def _row_stats(x_pos, x_neg, pos, neg):
  log_norm_pos = gpw.masked_log_sum_exp(x_pos, pos, plus_one=False)[:, None]
  log_norm_neg = gpw.masked_log_sum_exp(x_neg, neg, plus_one=False)[:, None]
  active = jnp.any(pos, axis=-1, keepdims=True) & jnp.any(neg, axis=-1, keepdims=True)
  z = log_norm_pos + log_norm_neg
  return _RowStats(log_norm_pos, log_norm_neg, jnp.where(active, jax.nn.sigmoid(z), 0.0),
                   jnp.where(active, jax.nn.softplus(z), 0.0))


def _multipliers(s, m, gamma, detach_alpha):
  """``|∂x/∂S|`` of each side's logit: ``γa⁺`` and ``γa⁻`` with constant factors."""
  if detach_alpha:
    a_pos, a_neg = _factors(s, m, True)
    return gamma * a_pos, gamma * a_neg
  return (gamma * jnp.where(s < 1.0 + m, 2.0 - 2.0 * s, 0.0),
          gamma * jnp.where(s > -m, 2.0 * s, 0.0))


def _pair_weights(x_pos, x_neg, d_pos, d_neg, pos, neg, stats):
  w_pos = stats.outer * jnp.exp(jnp.where(pos, x_pos - stats.log_norm_pos, -jnp.inf)) * d_pos
  w_neg = stats.outer * jnp.exp(jnp.where(neg, x_neg - stats.log_norm_neg, -jnp.inf)) * d_neg
  return jnp.where(neg, w_neg, 0.0) - jnp.where(pos, w_pos, 0.0)


def _fused(name, sim, labels, *, ref_labels, anchor_index, ref_valid, m, gamma,
           detach_alpha, self_pair, self_threshold, batch_size, symmetric):
  """``(loss, W)``, or ``(loss, W + Wᵀ)`` for a symmetric square S, from one row pass."""
  pairs = gpw.checked_pairs(name, sim, labels, ref_labels=ref_labels,
                            anchor_index=anchor_index, ref_valid=ref_valid,
                            batch_size=batch_size, self_pair=self_pair, gamma=gamma)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  s = jax.lax.stop_gradient(pairs.sim)
  x_pos, x_neg = _logits(s, m, gamma, True)
  d_pos, d_neg = _multipliers(s, m, gamma, detach_alpha)
  stats = _row_stats(x_pos, x_neg, pos, neg)
  weights = _pair_weights(x_pos, x_neg, d_pos, d_neg, pos, neg, stats)
  if symmetric:  # W_ji from anchor j's statistics: S, the labels and the masks are symmetric
    weights += _pair_weights(x_pos, x_neg, d_pos, d_neg, pos, neg,
                             _RowStats(*(x.T for x in stats)))
  return jnp.sum(stats.value) / pairs.batch_size, weights / pairs.batch_size


def circle_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                   m=0.4, gamma=80.0, detach_alpha=True, self_pair="value",
                   self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Analytic ``∂circle_loss/∂S``: ``+w⁻/m`` on negatives, ``−w⁺/m`` on positives."""
  return circle_value_and_weights(
      sim, labels, ref_labels=ref_labels, anchor_index=anchor_index, ref_valid=ref_valid,
      m=m, gamma=gamma, detach_alpha=detach_alpha, self_pair=self_pair,
      self_threshold=self_threshold, batch_size=batch_size)[1]


def circle_value_and_weights(sim, labels, *, ref_labels=None, anchor_index=None,
                             ref_valid=None, m=0.4, gamma=80.0, detach_alpha=True,
                             self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                             batch_size=None):
  """``(circle_loss, circle_weights)`` from one set of row statistics."""
  return _fused("circle_weights", sim, labels, ref_labels=ref_labels,
                anchor_index=anchor_index, ref_valid=ref_valid, m=m, gamma=gamma,
                detach_alpha=detach_alpha, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=False)


def circle_value_and_symmetric_weights(sim, labels, *, anchor_index=None, m=0.4, gamma=80.0,
                                       detach_alpha=True, self_pair="value",
                                       self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """``(circle_loss, W + Wᵀ)`` for a square, symmetric S, with no B×B transpose."""
  return _fused("circle_value_and_symmetric_weights", sim, labels, ref_labels=None,
                anchor_index=anchor_index, ref_valid=None, m=m, gamma=gamma,
                detach_alpha=detach_alpha, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=True)
