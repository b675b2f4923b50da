"""Contrastive loss in GPW form (Hadsell, Chopra & LeCun, CVPR 2006), on cosine similarities.

    L = 1/m Σ_i [ Σ_{j∈P_i} (1 − S_ij) + Σ_{j∈N_i} [S_ij − λ]_+ ]

Pair weights depend on the pair's own similarity only (Similarity-S, a hard rule):
``w⁺ = 1`` for every positive, ``w⁻ = 1`` for negatives with ``S_ij > λ``, else 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from msjax.losses import gpw


def _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, self_pair, name):
  return gpw.checked_pairs(name, sim, labels, ref_labels=ref_labels,
                           anchor_index=anchor_index, ref_valid=ref_valid,
                           batch_size=batch_size, self_pair=self_pair)


def contrastive_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                     lam=0.5, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                     batch_size=None):
  """Contrastive loss (formula in the module docstring); ``lam`` is the negative margin λ.

  Shapes and the shared keywords (``ref_labels``, ``anchor_index``, ``self_pair``,
  ``self_threshold``, ``batch_size``) are as in ``ms_loss``. Returns a scalar.
  """
  pairs = _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, self_pair,
                   "contrastive_loss")
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  s = pairs.sim
  # The hinge is a mask (strict S > λ) so that the gradient at S == λ is exactly 0.
  hinge = neg & (s > lam)
  total = jnp.sum(jnp.where(pos, 1.0 - s, 0.0)) + jnp.sum(jnp.where(hinge, s - lam, 0.0))
  return total / pairs.batch_size


def contrastive_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                        lam=0.5, self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                        batch_size=None):
  """Analytic ``∂contrastive_loss/∂S``: ``−1/m`` on positives, ``+1/m`` on negatives with S > λ."""
  pairs = _prepare(sim, labels, ref_labels, anchor_index, ref_valid, batch_size, self_pair,
                   "contrastive_weights")
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  w_neg = (neg & (pairs.sim > lam)).astype(pairs.sim.dtype)
  return (w_neg - pos.astype(pairs.sim.dtype)) / pairs.batch_size
