"""Loop transcriptions (NumPy float64) of the authors' released code for SupCon,
Proxy-Anchor, Proxy-NCA(++) and Circle loss.

Each function below is written from reading the authors' PyTorch code (or, for Circle
loss, the paper's equation), as an explicit loop over anchors / proxies / pairs that
shares nothing with msjax's vectorised implementation. No code is copied: the comments
name the repository, the file and what each step of the original does.
"""

import numpy as np

SELF = 1.0 - 1e-5  # msjax's by-value self-pair threshold (gpw.SELF_THRESHOLD)


# --- normalisations used by the releases ----------------------------------------------


def l2_norm_released(x):
  """Proxy-Anchor's ``l2_norm`` (tjddus9597/Proxy-Anchor-CVPR2020, code/losses.py):
  each row divided by ``sqrt(Σ x² + 1e-12)``."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i in range(x.shape[0]):
    out[i] = x[i] / np.sqrt(np.sum(x[i] ** 2) + 1e-12)
  return out


def torch_normalize(x):
  """``torch.nn.functional.normalize(x, p=2, dim=-1)``: each row divided by
  ``max(‖x‖, 1e-12)`` (used by the Proxy-NCA++ release)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i in range(x.shape[0]):
    out[i] = x[i] / max(np.sqrt(np.sum(x[i] ** 2)), 1e-12)
  return out


# --- SupCon: HobbitLong/SupContrast, losses.py, SupConLoss.forward -----------------------


def supcon_released(features, labels, *, temperature=0.07, base_temperature=0.07, eps=1e-9,
                    no_positive="zero"):
  """``SupConLoss(temperature, contrast_mode='all', base_temperature)(features, labels)``.

  Repository HobbitLong/SupContrast, file losses.py, ``SupConLoss.forward``:
  - ``features`` is ``[bsz, n_views, D]``; ``torch.cat(torch.unbind(features, 1), 0)``
    stacks the views view-major (all samples' view 0, then all samples' view 1, ...), and
    with ``contrast_mode='all'`` every one of these ``n_views·bsz`` rows is an anchor.
  - logits ``a·c / τ`` against every row, shifted by the row max (the anchor's own column
    included; the shift cancels).
  - ``logits_mask`` removes the anchor's own column *by index* from the denominator and
    from the positives; the positives are the other rows with the same label (the other
    views of the same sample included).
  - ``log_prob = logit − log(Σ_{c≠r} exp(logit_c) + eps)``: ``eps = 1e-9`` in the stored
    version 02f458c; the earlier stored version 2728c67 has no eps (``eps=0``).
  - ``mean_log_prob_pos = Σ_pos log_prob / |pos|``: divided by ``mask.sum(1)`` in both
    stored versions, so an anchor without positives gives 0/0 = NaN
    (``no_positive="nan"``); PR #142 (merged Dec 2023, issue #141) divides by
    ``mask_pos_pairs`` = the count clamped to 1, so such an anchor gives 0
    (``no_positive="zero"``).
  - loss ``−(τ/τ_b)·mean_log_prob_pos``, averaged over all ``n_views·bsz`` anchors.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  bsz, n_views = features.shape[:2]
  rows = [features[b, v] for v in range(n_views) for b in range(bsz)]  # cat(unbind(., 1))
  row_labels = [labels[b] for v in range(n_views) for b in range(bsz)]
  n = len(rows)
  total = 0.0
  for r in range(n):
    logits = [float(np.dot(rows[r], rows[c])) / temperature for c in range(n)]
    top = max(logits)
    denominator = 0.0
    for c in range(n):
      if c != r:
        denominator += np.exp(logits[c] - top)
    log_denominator = np.log(denominator + eps)
    pos_sum, pos_count = 0.0, 0
    for c in range(n):
      if c != r and row_labels[c] == row_labels[r]:
        pos_sum += (logits[c] - top) - log_denominator
        pos_count += 1
    if pos_count == 0:
      if no_positive == "nan":
        return float("nan")
      mean_log_prob_pos = 0.0
    else:
      mean_log_prob_pos = pos_sum / pos_count
    total += -(temperature / base_temperature) * mean_log_prob_pos
  return total / n


# --- Proxy-Anchor: tjddus9597/Proxy-Anchor-CVPR2020, code/losses.py, Proxy_Anchor ------


def proxy_anchor_released(x, labels, proxies, *, mrg=0.1, alpha=32.0):
  """``Proxy_Anchor(nb_classes=C, sz_embed=D, mrg, alpha).forward(X, T)`` with its
  ``self.proxies`` set to ``proxies``.

  Repository tjddus9597/Proxy-Anchor-CVPR2020, file code/losses.py:
  - ``cos = F.linear(l2_norm(X), l2_norm(P))``: both the batch and the proxies are
    normalised inside the loss (``l2_norm``: ``/ sqrt(Σx² + 1e-12)``).
  - ``P_one_hot = binarize(T, nb_classes)`` (sklearn ``label_binarize``), one proxy per
    class, ``N_one_hot = 1 − P_one_hot``.
  - per proxy (a column): ``P_sim_sum = Σ_{samples of its class} exp(−α(cos − mrg))`` and
    ``N_sim_sum = Σ_{other samples} exp(α(cos + mrg))``.
  - ``pos_term = Σ_proxies log(1 + P_sim_sum) / num_valid_proxies`` where
    ``num_valid_proxies`` counts the proxies with at least one sample of their class in
    the batch (the others have ``log(1 + 0) = 0``); ``neg_term = Σ_proxies
    log(1 + N_sim_sum) / nb_classes``; loss = pos_term + neg_term.
  """
  xn, pn = l2_norm_released(x), l2_norm_released(proxies)
  labels = np.asarray(labels)
  num_classes = pn.shape[0]
  pos_term, neg_term, with_pos = 0.0, 0.0, 0
  for c in range(num_classes):
    p_sum, n_sum, has_pos = 0.0, 0.0, False
    for i in range(xn.shape[0]):
      cos = float(np.dot(xn[i], pn[c]))
      if labels[i] == c:
        p_sum += np.exp(-alpha * (cos - mrg))
        has_pos = True
      else:
        n_sum += np.exp(alpha * (cos + mrg))
    pos_term += np.log(1.0 + p_sum)
    neg_term += np.log(1.0 + n_sum)
    with_pos += has_pos
  return pos_term / with_pos + neg_term / num_classes


# --- Proxy-NCA / Proxy-NCA++: euwern/proxynca_pp, loss.py + similarity.py ----------------
#
# The original Proxy-NCA paper (Movshovitz-Attias et al., ICCV 2017) released no code;
# the Proxy-NCA++ authors (Teh, DeVries, Taylor, ECCV 2020) released both the classic
# form (positive excluded from the denominator) and their ``-log softmax`` form.


def pairwise_distance_released(a, squared=True):
  """``pairwise_distance(a, squared)`` of euwern/proxynca_pp, similarity.py.

  ``‖a_i‖² + ‖a_j‖² − 2 a_i·a_j``, clamped at 0 (small negatives from rounding set to
  zero), the entries ``<= 0`` zeroed (they are 0 already after the clamp), the square
  root taken only when ``squared=False``, and the diagonal explicitly set to zero.
  """
  a = np.asarray(a, np.float64)
  n = a.shape[0]
  out = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      d = float(np.dot(a[i], a[i]) + np.dot(a[j], a[j]) - 2.0 * np.dot(a[i], a[j]))
      d = max(d, 0.0)
      if d <= 0.0:
        d = 0.0
      elif not squared:
        d = np.sqrt(d)
      out[i, j] = 0.0 if i == j else d
  return out


def proxy_nca_released(x, labels, proxies, *, scale=3.0, form="classic"):
  """``ProxyNCA_classic`` (``form="classic"``) or ``ProxyNCA_prob`` (``form="prob"``) of
  euwern/proxynca_pp, loss.py, with their ``self.proxies`` set to ``proxies``.

  - ``P = scale · F.normalize(P)``, ``X = scale · F.normalize(X)`` (``scale = sqrt(1/T)``,
    3 in the paper: the distances are squared, so the logits are scaled by ``scale²``).
  - ``D = pairwise_distance(cat([X, P]), squared=True)[:B, B:]``: the sample-to-proxy
    block of squared distances (the diagonal zeroing never touches this block).
  - ``T`` one-hot of the labels over ``len(P)`` classes (no smoothing).
  - classic: ``−log(Σ_T exp(−D) / Σ_{not T} exp(−D))`` per sample;
    prob: ``Σ −T · log_softmax(−D)`` per sample; both averaged over the batch.
  """
  xs = scale * torch_normalize(x)
  ps = scale * torch_normalize(proxies)
  labels = np.asarray(labels)
  b = xs.shape[0]
  dist = pairwise_distance_released(np.concatenate([xs, ps]), squared=True)[:b, b:]
  total = 0.0
  for i in range(b):
    own, others, every = 0.0, 0.0, 0.0
    for c in range(dist.shape[1]):
      e = np.exp(-dist[i, c])
      every += e
      if labels[i] == c:
        own += e
      else:
        others += e
    if form == "classic":
      total += -np.log(own / others)
    elif form == "prob":
      total += -(-dist[i, labels[i]] - np.log(every))
    else:
      raise ValueError(form)
  return total / b


# --- Circle loss: the paper's Eq. (6), per anchor ----------------------------------------
#
# Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
# CVPR 2020. The authors released no pair-wise implementation (TinyZeaMays/CircleLoss's
# README: "It has been said that the official implementation will be included in
# https://github.com/MegEngine"; fast-reid's maintainers were still waiting for it in
# Dec 2020, JDAI-CV/fast-reid issues #41, #244, #336). So the reference is the equation:
#
#   L = log[1 + Σ_j Σ_k exp(γ(α_n^j (s_n^j − Δ_n) − α_p^k (s_p^k − Δ_p)))]
#   α_p^k = [O_p − s_p^k]_+,  α_n^j = [s_n^j − O_n]_+,
#   O_p = 1 + m, O_n = −m, Δ_p = 1 − m, Δ_n = m.


def _anchor_pairs(sim, labels, i, self_pair):
  """Column indices of anchor i's positives and negatives in a square batch."""
  pos, neg = [], []
  for j in range(sim.shape[1]):
    if labels[j] == labels[i]:
      is_self = sim[i, j] >= SELF if self_pair == "value" else j == i
      if not is_self:
        pos.append(j)
    else:
      neg.append(j)
  return pos, neg


def circle_paper_anchor(sp, sn, *, m=0.4, gamma=80.0, sp_alpha=None, sn_alpha=None):
  """Eq. (6) for one sample, literally: a double loop over (negative j, positive k).

  ``sp_alpha``/``sn_alpha`` are the similarities the self-paced factors are computed
  from (default: ``sp``/``sn`` themselves); passing frozen values holds the α constant.
  """
  sp_alpha = sp if sp_alpha is None else sp_alpha
  sn_alpha = sn if sn_alpha is None else sn_alpha
  o_p, o_n, delta_p, delta_n = 1.0 + m, -m, 1.0 - m, m
  total = 0.0
  for j in range(len(sn)):
    alpha_n = max(sn_alpha[j] - o_n, 0.0)
    for k in range(len(sp)):
      alpha_p = max(o_p - sp_alpha[k], 0.0)
      total += np.exp(gamma * (alpha_n * (sn[j] - delta_n) - alpha_p * (sp[k] - delta_p)))
  return np.log(1.0 + total)


def circle_paper_per_anchor(sim, labels, *, m=0.4, gamma=80.0, self_pair="value",
                            alpha_at=None):
  """Eq. (6) for every anchor row of a square batch: ``(values [B], active [B])``.

  An anchor without a positive or without a negative has an empty double sum; it is
  reported inactive with value 0 (``log(1 + 0)``). ``alpha_at`` (a ``[B, B]`` matrix)
  freezes the self-paced factors at those similarities.
  """
  sim = np.asarray(sim, np.float64)
  labels = np.asarray(labels)
  frozen = sim if alpha_at is None else np.asarray(alpha_at, np.float64)
  values, active = np.zeros(sim.shape[0]), np.zeros(sim.shape[0], bool)
  for i in range(sim.shape[0]):
    pos, neg = _anchor_pairs(frozen, labels, i, self_pair)
    if pos and neg:
      values[i] = circle_paper_anchor(sim[i, pos], sim[i, neg], m=m, gamma=gamma,
                                      sp_alpha=frozen[i, pos], sn_alpha=frozen[i, neg])
      active[i] = True
  return values, active


def circle_paper_sums(sim, labels, *, m=0.4, gamma=80.0, self_pair="index"):
  """Per anchor ``(Σ_{k∈P_i} e^{−γα_p(s_p−Δ_p)}, Σ_{j∈N_i} e^{γα_n(s_n−Δ_n)})``: the two
  factors of Eq. (6)'s double sum, which factorises (used for the batch-level relation)."""
  sim = np.asarray(sim, np.float64)
  labels = np.asarray(labels)
  pos_sums, neg_sums = np.zeros(sim.shape[0]), np.zeros(sim.shape[0])
  for i in range(sim.shape[0]):
    pos, neg = _anchor_pairs(sim, labels, i, self_pair)
    for k in pos:
      s = sim[i, k]
      pos_sums[i] += np.exp(-gamma * max(1.0 + m - s, 0.0) * (s - (1.0 - m)))
    for j in neg:
      s = sim[i, j]
      neg_sums[i] += np.exp(gamma * max(s + m, 0.0) * (s - m))
  return pos_sums, neg_sums


# --- Circle loss, batch version: TinyZeaMays/CircleLoss, circle_loss.py ------------------


def _log_sum_exp(values):
  if not values:
    return -np.inf
  top = max(values)
  return top + np.log(sum(np.exp(v - top) for v in values))


def circle_tinyzeamays(sim, labels, *, m=0.25, gamma=256.0, version="master"):
  """The batch-level Circle loss of TinyZeaMays/CircleLoss, circle_loss.py: ONE term for
  the whole batch (no per-anchor sum, no division by the batch size).

  ``version="master"``: ``CircleLoss(m, gamma)(*convert_label_to_similarity(feat,
  label))`` as on the repository's master (widely copied; not among the stored
  versions):
  - ``convert_label_to_similarity``: ``S = feat featᵀ``; every unordered pair ``i < j``
    (``triu(diagonal=1)``: each pair once, the diagonal never) is a positive ``sp`` if
    the labels match, else a negative ``sn``; duplicates off the diagonal stay positives.
  - ``ap = [−sp + 1 + m]_+``, ``an = [sn + m]_+`` (detached), ``Δ_p = 1 − m``,
    ``Δ_n = m``, ``logit_p = −ap(sp − Δ_p)γ``, ``logit_n = an(sn − Δ_n)γ``.
  - ``softplus(logsumexp(logit_n) + logsumexp(logit_p))``.

  ``version="early"``: the stored commit 272eded (``CircleLossBackward``): the labels'
  equality matrix plus the identity, so the diagonal (2) is neither side and every
  *ordered* off-diagonal pair (both triangles) is a positive (1) or a negative (0); the
  same logits; the value ``log(1 + min(Σexp(logit_n) · Σexp(logit_p), 1e38))`` (its
  gradient is written by hand, Eq. 10 with a sign fixed, and is not transcribed here).
  """
  sim = np.asarray(sim, np.float64)
  labels = np.asarray(labels)
  logit_p, logit_n = [], []
  for i in range(sim.shape[0]):
    for j in range(sim.shape[1]):
      if (j <= i) if version == "master" else (j == i):
        continue
      s = sim[i, j]
      if labels[i] == labels[j]:
        logit_p.append(-max(-s + 1.0 + m, 0.0) * (s - (1.0 - m)) * gamma)
      else:
        logit_n.append(max(s + m, 0.0) * (s - m) * gamma)
  if version == "master":
    z = _log_sum_exp(logit_n) + _log_sum_exp(logit_p)
    return float(np.logaddexp(0.0, z))  # softplus
  if version == "early":
    product = sum(np.exp(v) for v in logit_n) * sum(np.exp(v) for v in logit_p)
    return float(np.log(1.0 + min(product, 1e38)))
  raise ValueError(version)
