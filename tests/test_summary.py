"""GPW summaries against brute-force counting."""

import numpy as np
import pytest

import msjax.losses as L
import oracles
from batches import make_batch


def brute_force_ms_selection(sim, labels, epsilon=0.1):
  """Mined positives/negatives per anchor by the released rule, as Python sets."""
  pos_sel, neg_sel, pos_all, neg_all = set(), set(), set(), set()
  for i in range(len(labels)):
    pos = [j for j in range(len(labels)) if labels[j] == labels[i] and sim[i, j] < oracles.SELF]
    neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
    pos_all |= {(i, j) for j in pos}
    neg_all |= {(i, j) for j in neg}
    if pos and neg:
      min_pos = min(sim[i, j] for j in pos)
      max_neg = max(sim[i, j] for j in neg)
      neg_sel |= {(i, j) for j in neg if sim[i, j] + epsilon > min_pos}
      pos_sel |= {(i, j) for j in pos if sim[i, j] - epsilon < max_neg}
  return pos_sel, neg_sel, pos_all, neg_all


def test_ms_summary_matches_brute_force():
  emb, labels = make_batch("k1_mixed", 8, 4, 16, seed=3, spread=2.0)
  sim = emb @ emb.T
  summary = L.batch_gpw_summary(sim, labels)
  pos_sel, neg_sel, pos_all, neg_all = brute_force_ms_selection(sim, labels)
  assert float(summary["pos_mined_fraction"]) == pytest.approx(len(pos_sel) / len(pos_all))
  assert float(summary["neg_mined_fraction"]) == pytest.approx(len(neg_sel) / len(neg_all))
  empty = [i for i in range(len(labels))
           if not any(a == i for a, _ in pos_sel) or not any(a == i for a, _ in neg_sel)]
  assert float(summary["empty_anchor_fraction"]) == pytest.approx(len(empty) / len(labels))
  assert 0 < len(empty) < len(labels)  # the batch has single-image classes
  weights = np.asarray(L.ms_weights(sim, labels))
  w_pos = [-weights[p] for p in pos_sel if p[0] not in empty]
  w_neg = [weights[p] for p in neg_sel if p[0] not in empty]
  assert float(summary["pos_weight_max"]) == pytest.approx(max(w_pos))
  assert float(summary["neg_weight_max"]) == pytest.approx(max(w_neg))
  # Pairs of anchors with an empty set are mined but weigh 0: the mean covers all mined.
  assert float(summary["neg_weight_mean"]) == pytest.approx(sum(w_neg) / len(neg_sel))
  np.testing.assert_allclose(summary["neg_weight_per_anchor"],
                             np.where(weights > 0, weights, 0).sum(1), atol=1e-15)
  np.testing.assert_allclose(summary["pos_weight"], np.where(weights < 0, -weights, 0), atol=1e-15)


@pytest.mark.parametrize("name", ["contrastive", "triplet", "lifted", "binomial"])
def test_summary_of_other_losses_counts_nonzero_weights(name):
  emb, labels = make_batch("pk", 6, 4, 16, seed=4, spread=2.0)
  sim = emb @ emb.T
  summary = L.batch_gpw_summary(sim, labels, loss=name)
  weights = np.asarray(L.get(name).weights(sim, labels))
  same = labels[:, None] == labels[None, :]
  off_diag = ~np.eye(len(labels), dtype=bool)
  assert float(summary["neg_mined_fraction"]) == pytest.approx(
      np.count_nonzero(weights[~same]) / np.count_nonzero(~same))
  assert float(summary["pos_mined_fraction"]) == pytest.approx(
      np.count_nonzero(weights[same & off_diag]) / np.count_nonzero(same & off_diag))
