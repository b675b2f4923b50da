"""GPW summaries of a batch under any registry loss, for telemetry and plots."""

from __future__ import annotations

from msjax.losses import gpw, ms, registry


def batch_gpw_summary(sim, labels, *, loss="ms", ref_labels=None, anchor_index=None, **hparams):
  """``gpw_summary`` of one batch: the loss's weights, candidate pairs and selection.

  For ``loss="ms"`` the selection is the MS mining (step 1), so the mined fractions are
  those of the released algorithm; for the other losses a pair is selected when its
  weight is non-zero. ``hparams`` are the loss's keywords. See ``gpw.gpw_summary`` for
  the keys.
  """
  weights = registry.get(loss).weights(sim, labels, ref_labels=ref_labels,
                                       anchor_index=anchor_index, **hparams)
  pairs = gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                            loss_name="batch_gpw_summary")
  mask_kw = {k: hparams[k] for k in ("self_pair", "self_threshold") if k in hparams}
  pos, neg = gpw.pair_masks(pairs, **mask_kw)
  selected = None
  if loss == "ms":
    mining_kw = {k: hparams[k] for k in ("epsilon", "mining") if k in hparams}
    pos_mined, neg_mined, _ = ms.ms_mining(sim, labels, ref_labels=ref_labels,
                                           anchor_index=anchor_index, **mask_kw, **mining_kw)
    selected = pos_mined | neg_mined
  return gpw.gpw_summary(weights, pos, neg, selected)
