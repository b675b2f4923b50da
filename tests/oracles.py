"""Independent float64 NumPy transcriptions of the losses, written from the formulas.

These loop over anchors (and pairs, and triplets) the way the released PyTorch code and
the papers state them, sharing nothing with msjax's vectorised implementation.
"""

import numpy as np

SELF = 1.0 - 1e-5


def released_ms_loss(sim, labels, alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1):
  """Per-anchor loop of the released MS loss.

  Returns ``(loss, would_crash)``: the released loop raises on ``min()``/``max()`` of
  an empty sequence when an anchor has no positive (after the by-value self drop) or no
  negative; here such an anchor is skipped and ``would_crash`` is set.
  """
  sim = np.asarray(sim, np.float64)
  labels = np.asarray(labels)
  batch = len(labels)
  total = 0.0
  would_crash = False
  for i in range(batch):
    pos_ = sim[i][labels == labels[i]]
    pos_ = pos_[pos_ < SELF]
    neg_ = sim[i][labels != labels[i]]
    if len(pos_) == 0 or len(neg_) == 0:
      would_crash = True
      continue
    neg = neg_[neg_ + epsilon > min(pos_)]
    pos = pos_[pos_ - epsilon < max(neg_)]
    if len(neg) < 1 or len(pos) < 1:
      continue
    pos_loss = 1.0 / alpha * np.log(1 + np.sum(np.exp(-alpha * (pos - lam))))
    neg_loss = 1.0 / beta * np.log(1 + np.sum(np.exp(beta * (neg - lam))))
    total += pos_loss + neg_loss
  return total / batch, would_crash


def _rows(sim, labels, ref_labels, anchor_index, self_pair):
  """Yields (i, positives, negatives) similarity lists per anchor row."""
  for i in range(sim.shape[0]):
    pos, neg = [], []
    for j in range(sim.shape[1]):
      if ref_labels[j] == labels[i]:
        is_self = sim[i, j] >= SELF if self_pair == "value" else j == anchor_index[i]
        if not is_self:
          pos.append(sim[i, j])
      else:
        neg.append(sim[i, j])
    yield i, np.array(pos), np.array(neg)


def contrastive_loss(sim, labels, ref_labels, anchor_index, lam=0.5, self_pair="value"):
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    total += sum(1.0 - p for p in pos) + sum(max(n - lam, 0.0) for n in neg)
  return total / sim.shape[0]


def triplet_loss(sim, labels, ref_labels, anchor_index, margin=0.1, self_pair="value"):
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    for p in pos:
      for n in neg:
        total += max(n - p + margin, 0.0)
  return total / sim.shape[0]


def lifted_loss(sim, labels, ref_labels, anchor_index, lam=1.0, scale=1.0, self_pair="value"):
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    if len(pos) and len(neg):
      inner = (lam + np.log(np.sum(np.exp(-scale * pos))) / scale
               + np.log(np.sum(np.exp(scale * neg))) / scale)
      total += max(inner, 0.0)
  return total / sim.shape[0]


def binomial_loss(sim, labels, ref_labels, anchor_index, alpha=2.0, beta=50.0, lam=0.5,
                  self_pair="value"):
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    if len(pos):
      total += np.mean(np.log1p(np.exp(-alpha * (pos - lam)))) / alpha
    if len(neg):
      total += np.mean(np.log1p(np.exp(beta * (neg - lam)))) / beta
  return total / sim.shape[0]


def ms_loss(sim, labels, ref_labels, anchor_index, alpha=2.0, beta=40.0, lam=0.5,
            epsilon=0.1, self_pair="value"):
  """The MS loss with released semantics, generalised to a rectangular block."""
  total = 0.0
  for _, pos_, neg_ in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    if len(pos_) == 0 or len(neg_) == 0:
      continue
    neg = neg_[neg_ + epsilon > pos_.min()]
    pos = pos_[pos_ - epsilon < neg_.max()]
    if len(neg) and len(pos):
      total += (np.log(1 + np.sum(np.exp(-alpha * (pos - lam)))) / alpha
                + np.log(1 + np.sum(np.exp(beta * (neg - lam)))) / beta)
  return total / sim.shape[0]


LOSSES = {
    "ms": ms_loss,
    "contrastive": contrastive_loss,
    "triplet": triplet_loss,
    "lifted": lifted_loss,
    "binomial": binomial_loss,
}
