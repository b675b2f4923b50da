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


def circle_loss(sim, labels, ref_labels, anchor_index, m=0.4, gamma=80.0, self_pair="value"):
  """Circle loss (Sun et al. 2020, Eq. 6 with the self-paced factors of Eq. 4), per anchor:
  ``log(1 + Σ_n Σ_p e^{γ(a_n (s_n − m) − a_p (s_p − (1 − m)))})``, ``a_p = [1 + m − s_p]_+``,
  ``a_n = [s_n + m]_+``; an anchor without positives or negatives adds 0."""
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    if len(pos) == 0 or len(neg) == 0:
      continue
    terms = []  # every (negative, positive) pair's exponent, summed in one log-sum-exp
    for n in neg:
      for p in pos:
        a_n, a_p = max(n + m, 0.0), max(1.0 + m - p, 0.0)
        terms.append(gamma * (a_n * (n - m) - a_p * (p - (1.0 - m))))
    total += np.logaddexp.reduce([0.0] + terms)
  return total / sim.shape[0]


def supcon_loss(sim, labels, ref_labels, anchor_index, temperature=0.07, base_temperature=0.07,
                self_pair="index"):
  """SupCon's ``L^sup_out`` (Khosla et al. 2020, Eq. 2), per anchor: the mean over its
  positives p of ``−log(e^{s_p/τ} / Σ_{a∈A} e^{s_a/τ})`` times τ/τ_b, with A every reference
  but the anchor itself (its positives and negatives); an anchor without positives adds 0."""
  total = 0.0
  for _, pos, neg in _rows(sim, labels, ref_labels, anchor_index, self_pair):
    if len(pos) == 0:
      continue
    log_denominator = np.logaddexp.reduce(np.concatenate([pos, neg]) / temperature)
    per_positive = [log_denominator - p / temperature for p in pos]
    total += temperature / base_temperature * sum(per_positive) / len(pos)
  return total / sim.shape[0]


LOSSES = {
    "ms": ms_loss,
    "contrastive": contrastive_loss,
    "triplet": triplet_loss,
    "lifted": lifted_loss,
    "binomial": binomial_loss,
    "circle": circle_loss,
    "supcon": supcon_loss,
}


def retrieval(query, query_labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8)):
  """Per-query loop over a full float64 ranking (stable sort: similarity desc, index asc).

  Returns ``(metrics, per_query)`` where ``per_query`` has, for each query, its first
  positive position (-1 without positives), R, the hits among the first R and AP@R.
  """
  symmetric = gallery is None
  if symmetric:
    gallery, gallery_labels = query, query_labels
  query = np.asarray(query, np.float64)
  gallery = np.asarray(gallery, np.float64)
  query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
  first, num, hits, aps = [], [], [], []
  for i in range(len(query)):
    index = np.arange(len(gallery))
    sims = np.array([float(np.dot(query[i], g)) for g in gallery])
    if symmetric:
      sims, index = sims[index != i], index[index != i]
    order = sorted(range(len(index)), key=lambda j: (-sims[j], index[j]))
    rel = [bool(gallery_labels[index[j]] == query_labels[i]) for j in order]
    r = sum(rel)
    num.append(r)
    if r == 0:
      first.append(-1), hits.append(0), aps.append(0.0)
      continue
    first.append(rel.index(True))
    found, ap = 0, 0.0
    for pos in range(r):
      if rel[pos]:
        found += 1
        ap += found / (pos + 1)
    hits.append(found)
    aps.append(ap / r)
  first, num, hits, aps = map(np.array, (first, num, hits, aps))
  has = num > 0
  metrics = {f"recall@{k}": float(np.mean(first[has] < k)) for k in ks}
  metrics["precision@1"] = float(np.mean(first[has] == 0))
  metrics["r_precision"] = float(np.mean(hits[has] / num[has]))
  metrics["map@r"] = float(np.mean(aps[has]))
  metrics["num_queries"] = int(has.sum())
  metrics["queries_without_positives"] = int((~has).sum())
  return metrics, dict(first_positive=first, num_positives=num, hits_in_top_r=hits,
                       ap_at_r=aps)


def nmi(labels_true, labels_pred):
  """NMI from the contingency table, by loops: I(U;V) / mean(H(U), H(V))."""
  n = len(labels_true)
  us, vs = sorted(set(labels_true)), sorted(set(labels_pred))
  count = {(u, v): 0 for u in us for v in vs}
  for u, v in zip(labels_true, labels_pred):
    count[(u, v)] += 1
  pu = {u: sum(count[(u, v)] for v in vs) / n for u in us}
  pv = {v: sum(count[(u, v)] for u in us) / n for v in vs}
  mi = sum(c / n * np.log((c / n) / (pu[u] * pv[v])) for (u, v), c in count.items() if c)
  hu = -sum(p * np.log(p) for p in pu.values())
  hv = -sum(p * np.log(p) for p in pv.values())
  if hu == 0 and hv == 0:
    return 1.0
  return mi / ((hu + hv) / 2)


def lloyd(x, centres, max_iters):
  """Plain Lloyd iterations from given centres (ties: lower centre), by loops over points."""
  x = np.asarray(x, np.float64)
  centres = np.array(centres, np.float64)
  assign = None
  for _ in range(max_iters + 1):
    new = np.array([int(np.argmin([np.sum((p - c) ** 2) for c in centres])) for p in x])
    if assign is not None and (new == assign).all():
      break
    assign = new
    for c in range(len(centres)):
      members = x[assign == c]
      if len(members):
        centres[c] = members.mean(axis=0)
  return assign, centres
