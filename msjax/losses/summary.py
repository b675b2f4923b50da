"""GPW summaries of a batch under any registry loss, for telemetry and plots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msjax.losses import gpw, ms, registry


class PairSelection(NamedTuple):
  """One batch as GPW reads it: the weights and which pairs the loss looks at."""

  weights: jax.Array  # [Bq, Br] ∂L/∂S: +w⁻ on negatives, −w⁺ on positives
  pos: jax.Array  # [Bq, Br] bool, candidate positive pairs (the anchor itself excluded)
  neg: jax.Array  # [Bq, Br] bool, candidate negative pairs
  selected: jax.Array  # [Bq, Br] bool, pairs the loss's mining keeps


def pair_selection(sim, labels, *, loss="ms", ref_labels=None, anchor_index=None,
                   ref_valid=None, **hparams) -> PairSelection:
  """The loss's weights, its candidate pairs and its selection for one similarity block.

  For ``loss="ms"`` the selection is the MS mining (step 1 of the released algorithm), so
  it includes mined pairs of anchors that end up contributing nothing (an empty mined
  side); for the other losses a pair is selected when its weight is non-zero. For a
  proxy loss ``sim`` is the samples' block against the proxies, whose classes are
  ``ref_labels``.
  ``hparams`` are the loss's keywords (``batch_size=1`` gives the per-anchor weights
  ``w`` of the paper instead of ``w/m``).
  """
  if registry.is_proxy(loss) and ref_labels is None:  # one proxy per class, as the loss
    ref_labels = jnp.arange(jnp.shape(sim)[1], dtype=jnp.int32)
  weights = registry.get(loss).weights(sim, labels, ref_labels=ref_labels,
                                       anchor_index=anchor_index, ref_valid=ref_valid,
                                       **hparams)
  pairs = gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                            ref_valid=ref_valid, loss_name="pair_selection")
  mask_kw = {k: hparams[k] for k in ("self_pair", "self_threshold") if k in hparams}
  if registry.is_proxy(loss):  # a proxy is never its sample's self pair
    mask_kw = {"self_pair": "index"}
  pos, neg = gpw.pair_masks(pairs, **mask_kw)
  if loss == "ms":
    mining_kw = {k: hparams[k] for k in ("epsilon", "mining") if k in hparams}
    pos_mined, neg_mined, _ = ms.ms_mining(sim, labels, ref_labels=ref_labels,
                                           anchor_index=anchor_index, ref_valid=ref_valid,
                                           **mask_kw, **mining_kw)
    selected = pos_mined | neg_mined
  else:
    selected = weights != 0
  return PairSelection(weights, pos, neg, selected)


def batch_gpw_summary(sim, labels, *, loss="ms", ref_labels=None, anchor_index=None,
                      ref_valid=None, **hparams):
  """``gpw_summary`` of one batch: the loss's weights, candidate pairs and selection.

  See ``pair_selection`` for the selection and ``gpw.gpw_summary`` for the keys.
  """
  s = pair_selection(sim, labels, loss=loss, ref_labels=ref_labels,
                     anchor_index=anchor_index, ref_valid=ref_valid, **hparams)
  return gpw.gpw_summary(s.weights, s.pos, s.neg, s.selected)
