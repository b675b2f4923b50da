"""SupCon, Proxy-Anchor, Proxy-NCA(++) and Circle loss against loop transcriptions of
their authors' released code (``released_losses.py``), and pytorch-metric-learning's
versions against the same transcriptions, with each documented difference asserted.
"""

import jax
import numpy as np
import pytest

import msjax.losses as L
import released_losses as R

SEEDS = (0, 1, 2, 3)
KINDS = ("pk", "unbalanced", "duplicates")


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(kind, seed):
  """``(emb [B, D] unit float64, labels [B])``, B = 12 or 24, D in 8..16.

  ``pk``: P×K; ``unbalanced``: class sizes 1..6 with at least one single-image class;
  ``duplicates``: P×K with exact copies of some rows (within and across classes).
  """
  rng = np.random.default_rng(seed)
  dim = int(rng.integers(8, 17))
  size = (12, 24)[seed % 2]  # two batch sizes: few compiled shapes
  if kind == "unbalanced":
    sizes = [1]
    while sum(sizes) < size:
      sizes.append(int(rng.integers(1, 7)))
    labels = np.repeat(np.arange(len(sizes)), sizes)[:size]
  else:
    options = [(4, 3), (6, 2)] if size == 12 else [(6, 4), (8, 3)]
    classes, per_class = options[int(rng.integers(2))]
    labels = np.repeat(np.arange(classes), per_class)
  labels = labels[rng.permutation(len(labels))].astype(np.int32)
  centres = unit(rng.normal(size=(labels.max() + 1, dim)))
  emb = unit(centres[labels] + 1.2 * rng.normal(size=(len(labels), dim)) / np.sqrt(dim))
  if kind == "duplicates":
    same = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))
            if labels[i] == labels[j]]
    i, j = same[int(rng.integers(len(same)))]
    emb[j] = emb[i]  # a duplicate within a class: S = 1 off the diagonal
    k, n = rng.choice(len(labels), size=2, replace=False)
    emb[n] = emb[k]  # and one more (often across classes)
  return emb, labels


def batches():
  for kind in KINDS:
    for seed in SEEDS:
      yield kind, seed, *make_batch(kind, 100 * KINDS.index(kind) + seed)


# Jitted once per shape; hyper-parameters are traced arguments (not recompiled per value),
# only the mode switches are static.
_CIRCLE_MODES = ("self_pair", "detach_alpha")
circle_loss = jax.jit(L.circle_loss, static_argnames=_CIRCLE_MODES)
circle_grad = jax.jit(jax.grad(L.circle_loss), static_argnames=_CIRCLE_MODES)
circle_weights = jax.jit(L.circle_weights, static_argnames=_CIRCLE_MODES)
supcon_loss = jax.jit(L.supcon_loss)
supcon_feature_grad = jax.jit(jax.grad(lambda e, y, t: L.supcon_loss(e @ e.T, y, temperature=t)))
proxy_anchor_loss = jax.jit(L.proxy_anchor_loss)
proxy_nca_loss = jax.jit(L.proxy_nca_loss, static_argnames=("positive_in_denominator",))
# proxy_loss_from_embeddings keys its custom VJP on the hyper-parameters: static.
_PROXY_STATIC = ("loss", "alpha", "delta", "scale", "positive_in_denominator")
proxy_from_embeddings = jax.jit(L.proxy_loss_from_embeddings, static_argnames=_PROXY_STATIC)
proxy_from_embeddings_grad = jax.jit(
    jax.grad(L.proxy_loss_from_embeddings, argnums=(0, 2)), static_argnames=_PROXY_STATIC)


def close(got, expected, rel=1e-6, abs_=1e-9):
  assert np.isfinite(got) and np.isfinite(expected)
  assert got == pytest.approx(expected, rel=rel, abs=abs_)


# --- SupCon (HobbitLong/SupContrast) ------------------------------------------------------


def _views(seed, bsz, n_views, singleton=False):
  """Random unit features ``[bsz, n_views, D]``; every anchor has a positive unless
  ``singleton`` (then one class has a single sample and ``n_views`` is 1)."""
  rng = np.random.default_rng(seed)
  dim = int(rng.integers(8, 17))
  if n_views == 1:
    labels = np.arange(bsz) // 3  # classes of 3 (a last class of 1 joins the one before)
    if bsz % 3 == 1:
      labels[-1] = labels[-2]
    if singleton:
      labels[-1] = labels.max() + 1
  else:  # the other view of the same sample is always a positive
    labels = rng.integers(0, max(bsz // 2, 2), size=bsz)
  labels = labels[rng.permutation(bsz)].astype(np.int32)
  return unit(rng.normal(size=(bsz, n_views, dim))), labels


def _flatten_views(features, labels):
  """The authors' ``torch.cat(torch.unbind(features, dim=1), dim=0)`` order, and the
  labels repeated to match (their ``mask.repeat(anchor_count, contrast_count)``)."""
  n_views = features.shape[1]
  return (np.concatenate([features[:, v] for v in range(n_views)]),
          np.tile(labels, n_views))


@pytest.mark.parametrize("n_views", [1, 2])
@pytest.mark.parametrize("temperature,base_temperature", [(0.07, 0.07), (0.1, 0.07), (0.5, 0.5)])
def test_supcon_matches_released(n_views, temperature, base_temperature):
  """msjax equals the authors' loop with the ``+ 1e-9`` left out (eps=0, as in the
  stored version 2728c67), and differs from the ``+ 1e-9`` version (02f458c) by exactly
  the eps term: ``mean_r (τ/τ_b) log(1 + 1e-9/D_r)`` with ``D_r = Σ_{c≠r} e^{(S_rc −
  max_c S_rc)/τ}``. The row max includes the anchor's own logit 1/τ, so ``D_r`` is
  small (~B·e^{−1/τ}) and the 1e-9 is NOT negligible at 1e-6 for τ = 0.07."""
  for seed in SEEDS:
    features, labels = _views(seed, bsz=(12, 24)[seed % 2] // n_views, n_views=n_views)
    hp = dict(temperature=temperature, base_temperature=base_temperature)
    flat, flat_labels = _flatten_views(features, labels)
    sim = flat @ flat.T
    got = float(supcon_loss(sim, flat_labels, **hp))
    close(got, R.supcon_released(features, labels, eps=0.0, **hp))
    released_eps = R.supcon_released(features, labels, eps=1e-9, **hp)
    logits = sim / temperature
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.fill_diagonal(shifted, 0.0)
    offset = np.mean(temperature / base_temperature * np.log1p(1e-9 / shifted.sum(axis=1)))
    assert released_eps - got == pytest.approx(offset, rel=1e-4, abs=1e-13)


def test_supcon_default_hparams_match_released_defaults():
  """``supcon_loss`` defaults (τ = τ_b = 0.07, self pair by index) are the release's."""
  features, labels = _views(7, bsz=12, n_views=2)
  flat, flat_labels = _flatten_views(features, labels)
  close(float(supcon_loss(flat @ flat.T, flat_labels)),
        R.supcon_released(features, labels, eps=0.0))


def test_supcon_anchor_without_positive():
  """A single-image class (n_views = 1): both stored versions give NaN (0/0); after PR
  #142 the anchor contributes 0 and the mean is still over all anchors — msjax's rule."""
  for seed in SEEDS:
    features, labels = _views(seed, bsz=12, n_views=1, singleton=True)
    sim = features[:, 0] @ features[:, 0].T
    assert np.isnan(R.supcon_released(features, labels, eps=0.0, no_positive="nan"))
    expected = R.supcon_released(features, labels, eps=0.0, no_positive="zero")
    got = float(supcon_loss(sim, labels))
    close(got, expected)
    # Dividing by the anchors with positives instead would be 12/11 of it: not msjax.
    assert got != pytest.approx(expected * 12 / 11, rel=1e-3)


def test_supcon_gradient_matches_released_loop():
  """d/dE of ``supcon_loss(E Eᵀ)`` equals central differences of the authors' loop in
  feature space (the release takes raw features: any direction is admissible)."""
  rng = np.random.default_rng(5)
  h = 1e-6
  for seed in SEEDS[:2]:
    features, labels = _views(seed, bsz=12, n_views=2)
    flat, flat_labels = _flatten_views(features, labels)
    g = np.asarray(supcon_feature_grad(flat, flat_labels, 0.1))
    for _ in range(2):
      v = rng.normal(size=features.shape)
      plus = R.supcon_released(features + h * v, labels, temperature=0.1, eps=0.0)
      minus = R.supcon_released(features - h * v, labels, temperature=0.1, eps=0.0)
      v_flat, _ = _flatten_views(v, labels)
      close(float(np.sum(g * v_flat)), (plus - minus) / (2 * h), rel=1e-6, abs_=1e-7)


# --- Proxy-Anchor (tjddus9597/Proxy-Anchor-CVPR2020) and Proxy-NCA (euwern/proxynca_pp) ----


def _proxy_batch(seed, absent=True):
  """``(x raw [B, D], emb = l2_norm(x), labels, proxies raw [C, D])``; with ``absent``
  some classes have no sample in the batch. Proxies as the releases initialise them
  (Kaiming fan-out normal), so their norms are far from 1."""
  rng = np.random.default_rng(1000 + seed)
  dim, num_classes, batch = 12, 10, (12, 24)[seed % 2]  # few compiled shapes
  present = (rng.choice(num_classes, size=num_classes - 3, replace=False) if absent
             else np.arange(num_classes))
  labels = np.concatenate([present, rng.choice(present, size=batch - len(present))])
  labels = labels[rng.permutation(len(labels))][:batch].astype(np.int32)
  proxies = rng.normal(size=(num_classes, dim)) * np.sqrt(2.0 / num_classes)
  centres = R.l2_norm_released(proxies + 0.5 * rng.normal(size=proxies.shape))
  x = (centres[labels] + rng.normal(size=(batch, dim)) / np.sqrt(dim)) * rng.uniform(
      0.5, 3.0, size=(batch, 1))
  return x, R.l2_norm_released(x), labels, proxies


@pytest.mark.parametrize("alpha,delta", [(32.0, 0.1), (16.0, 0.0), (8.0, 0.3)])
def test_proxy_anchor_matches_released(alpha, delta):
  for seed in SEEDS:
    for absent in (True, False):
      x, emb, labels, proxies = _proxy_batch(seed, absent)
      if absent:
        assert len(np.unique(labels)) < proxies.shape[0]
      expected = R.proxy_anchor_released(x, labels, proxies, mrg=delta, alpha=alpha)
      if alpha == 32.0 and seed < 2:  # static hyper-parameters: one compile per value
        close(float(proxy_from_embeddings(emb, labels, proxies, loss="proxy_anchor",
                                          alpha=alpha, delta=delta)), expected)
      sim = emb @ R.l2_norm_released(proxies).T
      close(float(proxy_anchor_loss(sim, labels, alpha=alpha, delta=delta)), expected)


def test_proxy_anchor_defaults_match_released():
  x, emb, labels, proxies = _proxy_batch(9)
  close(float(proxy_from_embeddings(emb, labels, proxies)),
        R.proxy_anchor_released(x, labels, proxies))


@pytest.mark.parametrize("scale", [3.0, 1.0, float(np.sqrt(32.0))])
@pytest.mark.parametrize("form", ["classic", "prob"])
def test_proxy_nca_matches_released(form, scale):
  """``positive_in_denominator=False`` is ``ProxyNCA_classic``, True ``ProxyNCA_prob``;
  msjax's ``scale`` is theirs (logits ``2σ²S``)."""
  for seed in SEEDS:
    x, emb, labels, proxies = _proxy_batch(seed, absent=seed % 2 == 0)
    expected = R.proxy_nca_released(x, labels, proxies, scale=scale, form=form)
    hp = dict(scale=scale, positive_in_denominator=form == "prob")
    if scale == 3.0 and seed < 2:  # static hyper-parameters: one compile per value
      close(float(proxy_from_embeddings(emb, labels, proxies, loss="proxy_nca", **hp)),
            expected)
    sim = emb @ R.l2_norm_released(proxies).T
    close(float(proxy_nca_loss(sim, labels, **hp)), expected)


def test_proxy_nca_default_is_classic_with_scale_3():
  x, emb, labels, proxies = _proxy_batch(11)
  got = float(proxy_from_embeddings(emb, labels, proxies, loss="proxy_nca"))
  close(got, R.proxy_nca_released(x, labels, proxies, scale=3.0, form="classic"))
  assert got != pytest.approx(R.proxy_nca_released(x, labels, proxies, form="prob"), rel=1e-3)


@pytest.mark.parametrize("loss,released,hp", [
    ("proxy_anchor", R.proxy_anchor_released, {}),
    ("proxy_nca", lambda x, y, p: R.proxy_nca_released(x, y, p, form="classic"), {}),
    ("proxy_nca", lambda x, y, p: R.proxy_nca_released(x, y, p, form="prob"),
     {"positive_in_denominator": True}),
])
def test_proxy_gradient_matches_released_loop(loss, released, hp):
  """``proxy_loss_from_embeddings`` (analytic weights as its backward pass): the gradient
  w.r.t. the raw proxies matches central differences of the authors' loop (which
  normalises them) in any direction; w.r.t. the unit embeddings along tangent
  directions (the authors also normalise the batch, msjax expects it normalised)."""
  rng = np.random.default_rng(17)
  h = 1e-6
  for seed in (0, 2):  # B = 12 both times: one compile
    _, emb, labels, proxies = _proxy_batch(seed)
    g_emb, g_proxies = (np.asarray(a) for a in proxy_from_embeddings_grad(
        emb, labels, proxies, loss=loss, **hp))
    for _ in range(2):
      v = rng.normal(size=proxies.shape)
      fd = (released(emb, labels, proxies + h * v)
            - released(emb, labels, proxies - h * v)) / (2 * h)
      close(float(np.sum(g_proxies * v)), fd, rel=1e-6, abs_=1e-7)
      u = rng.normal(size=emb.shape)
      u -= np.sum(u * emb, axis=1, keepdims=True) * emb  # tangent to the unit sphere
      fd = (released(emb + h * u, labels, proxies)
            - released(emb - h * u, labels, proxies)) / (2 * h)
      close(float(np.sum(g_emb * u)), fd, rel=1e-6, abs_=1e-7)


# --- Circle loss (the paper's Eq. 6; no official pair-wise release) ------------------------

CIRCLE_HP = [(0.4, 80.0), (0.25, 16.0)]


@pytest.mark.parametrize("m,gamma", CIRCLE_HP)
@pytest.mark.parametrize("self_pair", ["value", "index"])
def test_circle_matches_paper_eq6(m, gamma, self_pair):
  """``circle_loss`` = (1/B) Σ_i Eq. (6)_i, an anchor missing a side counting 0."""
  saw_inactive = 0
  for kind, seed, emb, labels in batches():
    sim = emb @ emb.T
    values, active = R.circle_paper_per_anchor(sim, labels, m=m, gamma=gamma,
                                               self_pair=self_pair)
    saw_inactive += not active.all()
    got = float(circle_loss(sim, labels, m=m, gamma=gamma, self_pair=self_pair))
    close(got, values.sum() / len(labels), rel=1e-6, abs_=1e-9)
  assert saw_inactive  # the unbalanced batches have single-image classes


def test_circle_anchor_missing_a_side_counts_zero():
  """One class only (no anchor has a negative): Eq. (6)'s double sum is empty for every
  anchor, and the loss is 0 (not NaN)."""
  emb, _ = make_batch("pk", 0)
  labels = np.zeros(len(emb), np.int32)
  values, active = R.circle_paper_per_anchor(emb @ emb.T, labels)
  assert not active.any() and values.sum() == 0.0
  assert float(circle_loss(emb @ emb.T, labels)) == 0.0


def test_circle_defaults_are_fine_grained_setting():
  emb, labels = make_batch("pk", 42)
  sim = emb @ emb.T
  values, _ = R.circle_paper_per_anchor(sim, labels, m=0.4, gamma=80.0, self_pair="value")
  close(float(circle_loss(sim, labels)), values.mean())


def test_circle_self_pair_value_drops_duplicates():
  """With γ small enough for a duplicate positive (S = 1) to matter, the by-value rule
  (default, as in msjax's MS) and the by-index rule give different losses, each equal
  to its own transcription (``test_circle_matches_paper_eq6``)."""
  emb, labels = make_batch("duplicates", 3)
  sim = emb @ emb.T
  hp = dict(m=0.25, gamma=16.0)
  by_value = float(circle_loss(sim, labels, self_pair="value", **hp))
  by_index = float(circle_loss(sim, labels, self_pair="index", **hp))
  assert by_value != pytest.approx(by_index, rel=1e-6)


def _small_batches():
  """The B = 12 batches of every kind (one compiled shape for the gradient checks)."""
  return [b for b in batches() if len(b[3]) == 12]


def _directions(sim, rng, count):
  """Random perturbations that leave the self pairs and duplicates (S ≈ 1) alone, so the
  by-value masks are the same at S ± hV."""
  for _ in range(count):
    v = rng.normal(size=sim.shape)
    v[sim >= 1.0 - 1e-4] = 0.0
    yield v


@pytest.mark.parametrize("m,gamma", CIRCLE_HP)
def test_circle_gradient_detached_alpha(m, gamma):
  """``detach_alpha=True``: the gradient (autodiff and the analytic ``circle_weights``)
  is that of Eq. (6) with the α frozen at the point; and it differs from the gradient
  with α differentiated, so the check can tell them apart."""
  rng = np.random.default_rng(23)
  h = 1e-6
  for kind, seed, emb, labels in _small_batches()[::2]:
    sim = emb @ emb.T
    hp = dict(m=m, gamma=gamma)
    g = np.asarray(circle_grad(sim, labels, detach_alpha=True, **hp))
    w = np.asarray(circle_weights(sim, labels, detach_alpha=True, **hp))
    g_full = np.asarray(circle_grad(sim, labels, detach_alpha=False, **hp))
    for v in _directions(sim, rng, 2):
      f = lambda s: R.circle_paper_per_anchor(s, labels, alpha_at=sim, **hp)[0].mean()
      fd = (f(sim + h * v) - f(sim - h * v)) / (2 * h)
      scale = max(abs(fd), 1.0)
      assert np.sum(g * v) == pytest.approx(fd, rel=1e-6, abs=1e-7 * scale)
      assert np.sum(w * v) == pytest.approx(fd, rel=1e-6, abs=1e-7 * scale)
      assert np.sum(g_full * v) != pytest.approx(fd, rel=1e-3)


@pytest.mark.parametrize("m,gamma", CIRCLE_HP)
def test_circle_gradient_full_alpha(m, gamma):
  """``detach_alpha=False``: the gradient is the full derivative of Eq. (6)."""
  rng = np.random.default_rng(29)
  h = 1e-6
  for kind, seed, emb, labels in _small_batches()[1::2]:
    sim = emb @ emb.T
    hp = dict(m=m, gamma=gamma)
    g = np.asarray(circle_grad(sim, labels, detach_alpha=False, **hp))
    w = np.asarray(circle_weights(sim, labels, detach_alpha=False, **hp))
    for v in _directions(sim, rng, 2):
      f = lambda s: R.circle_paper_per_anchor(s, labels, **hp)[0].mean()
      fd = (f(sim + h * v) - f(sim - h * v)) / (2 * h)
      scale = max(abs(fd), 1.0)
      assert np.sum(g * v) == pytest.approx(fd, rel=1e-6, abs=1e-7 * scale)
      assert np.sum(w * v) == pytest.approx(fd, rel=1e-6, abs=1e-7 * scale)


@pytest.mark.parametrize("m,gamma", CIRCLE_HP)
def test_circle_batch_version_tinyzeamays_relation(m, gamma):
  """TinyZeaMays/CircleLoss forms ONE softplus over every pair of the batch (upper
  triangle; the earlier version: every ordered pair, so no ¼, and a clamp at 1e38).
  Exactly: ``L_tzm = log(1 + ¼ (Σ_i N_i)(Σ_i P_i))`` with ``N_i``, ``P_i``
  the two factors of anchor i's Eq. (6) double sum (self pair by index: the upper
  triangle keeps off-diagonal duplicates); the per-anchor loss is ``log(1 + N_i P_i)``.
  So the batch version adds every cross-anchor product ``N_a P_b`` and is not divided by
  B; by Jensen and ``Σ N_i P_i ≤ ΣN ΣP``, ``circle_loss ≤ L_tzm`` whenever B ≥ 4."""
  for kind, seed, emb, labels in batches():
    sim = emb @ emb.T
    tzm = R.circle_tinyzeamays(sim, labels, m=m, gamma=gamma)
    pos_sums, neg_sums = R.circle_paper_sums(sim, labels, m=m, gamma=gamma)
    close(tzm, np.log1p(0.25 * pos_sums.sum() * neg_sums.sum()), rel=1e-9)
    # The repository's earlier version (ordered pairs, both triangles, clamped at 1e38).
    close(R.circle_tinyzeamays(sim, labels, m=m, gamma=gamma, version="early"),
          np.log1p(min(pos_sums.sum() * neg_sums.sum(), 1e38)), rel=1e-9)
    for self_pair in ("index", "value"):
      ours = float(circle_loss(sim, labels, m=m, gamma=gamma, self_pair=self_pair))
      assert ours <= tzm * (1 + 1e-12)
    # ... and strictly larger in practice (not a rescaling of the per-anchor mean).
    assert tzm > 1.05 * float(circle_loss(sim, labels, m=m, gamma=gamma))


# --- pytorch-metric-learning against the authors -----------------------------------------


@pytest.fixture(scope="module")
def pml():
  import torch  # both in the test extras: these relations are the README's claims
  from pytorch_metric_learning import losses
  return torch, losses


def _t(torch, a, dtype=None):
  a = np.asarray(a)
  return torch.tensor(a, dtype=dtype or (torch.float64 if a.dtype.kind == "f" else torch.long))


def test_pml_defaults_differ_from_authors(pml):
  """pml 2.9.0's defaults versus the authors' (README table)."""
  torch, losses = pml
  assert losses.SupConLoss().temperature == 0.1  # authors: 0.07 (and base_temperature 0.07)
  assert losses.NCALoss().softmax_scale == 1  # authors' Proxy-NCA++: scale 3 ↔ pml 9
  circle = losses.CircleLoss()
  assert (circle.m, circle.gamma) == (0.4, 80)  # the paper's fine-grained setting
  anchor = losses.ProxyAnchorLoss(num_classes=4, embedding_size=8)
  assert (anchor.margin, anchor.alpha) == (0.1, 32)  # as released


@pytest.mark.parametrize("temperature", [0.07, 0.1])
def test_pml_supcon_relation(pml, temperature):
  """pml SupConLoss(τ) = authors' SupCon(τ, base_temperature=τ) averaged over the
  anchors WITH positives only (AvgNonZeroReducer), i.e. authors × B / B₊ (pml has no
  base_temperature: its loss is not scaled by τ/τ_b); no ``+1e-9``;
  the embeddings are L2-normalised inside pml (the authors use the features as given);
  views flattened by the caller (labels repeated)."""
  torch, losses = pml
  for seed in SEEDS:
    features, labels = _views(seed, bsz=12, n_views=1, singleton=True)
    raw = features * np.random.default_rng(seed).uniform(0.5, 2.0, size=(12, 1, 1))
    flat, flat_labels = _flatten_views(raw, labels)
    got = losses.SupConLoss(temperature=temperature)(_t(torch, flat), _t(torch, flat_labels)).item()
    authors = R.supcon_released(features, labels, temperature=temperature,
                                base_temperature=temperature, eps=0.0)
    with_pos = sum(np.sum(labels == y) > 1 for y in labels)
    assert with_pos == 11
    close(got, authors * len(labels) / with_pos, rel=1e-9)
    if temperature != 0.07:  # authors' default τ_b = 0.07 scales their loss by τ/0.07
      authors_default = R.supcon_released(features, labels, temperature=temperature, eps=0.0)
      close(got, authors_default * 0.07 / temperature * len(labels) / with_pos, rel=1e-9)
  # Two views, every anchor has a positive: pml equals the authors (τ_b = τ).
  features, labels = _views(5, bsz=10, n_views=2)
  flat, flat_labels = _flatten_views(features, labels)
  close(losses.SupConLoss(temperature=0.07)(_t(torch, flat), _t(torch, flat_labels)).item(),
        R.supcon_released(features, labels, eps=0.0), rel=1e-9)
  # A batch of one class (no negative pair at all): pml returns 0; the authors (and msjax)
  # still have a softmax over the positives.
  one_class = np.zeros(len(flat_labels), np.int32)
  assert losses.SupConLoss(temperature=0.07)(_t(torch, flat), _t(torch, one_class)).item() == 0
  authors = R.supcon_released(features, np.zeros(len(labels), np.int32), eps=0.0)
  assert authors > 1.0
  close(float(supcon_loss(flat @ flat.T, one_class)), authors)


@pytest.mark.parametrize("m,gamma", CIRCLE_HP)
def test_pml_circle_relation(pml, m, gamma):
  """pml CircleLoss = per-anchor Eq. (6) (self pair by index, so duplicates stay
  positives), averaged over the anchors that have both a positive and a negative
  (AvgNonZeroReducer) — msjax divides by all B anchors:
  ``pml = circle_loss(self_pair="index") · B / B_active``; pml normalises embeddings."""
  torch, losses = pml
  for kind, seed, emb, labels in batches():
    sim = emb @ emb.T
    raw = emb * np.random.default_rng(seed).uniform(0.5, 2.0, size=(len(labels), 1))
    got = losses.CircleLoss(m=m, gamma=gamma)(_t(torch, raw), _t(torch, labels)).item()
    values, active = R.circle_paper_per_anchor(sim, labels, m=m, gamma=gamma,
                                               self_pair="index")
    close(got, values.sum() / active.sum(), rel=1e-9)
    ours = float(circle_loss(sim, labels, m=m, gamma=gamma, self_pair="index"))
    close(got, ours * len(labels) / active.sum(), rel=1e-6)


def test_pml_proxy_anchor_equals_authors(pml):
  """pml ProxyAnchorLoss (same proxies) = the authors' Proxy_Anchor, absent classes
  included: same per-proxy sums, same divisors (proxies with positives; all classes)."""
  torch, losses = pml
  for seed in SEEDS:
    for alpha, delta in [(32.0, 0.1), (8.0, 0.3)]:
      x, _, labels, proxies = _proxy_batch(seed)
      loss = losses.ProxyAnchorLoss(num_classes=proxies.shape[0],
                                    embedding_size=proxies.shape[1], margin=delta,
                                    alpha=alpha).double()
      loss.proxies.data = _t(torch, proxies)
      close(loss(_t(torch, x), _t(torch, labels)).item(),
            R.proxy_anchor_released(x, labels, proxies, mrg=delta, alpha=alpha), rel=1e-9)


@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_pml_proxy_nca_relation(pml, scale):
  """pml ProxyNCALoss(softmax_scale=σ²) = the authors' ``ProxyNCA_prob`` with scale σ
  (positive in the denominator; pml has no classic form): squared L2 distances of
  normalised vectors times ``softmax_scale``, mean over samples (minus any whose
  positive probability underflows to 0)."""
  torch, losses = pml
  for seed in SEEDS:
    x, _, labels, proxies = _proxy_batch(seed)
    loss = losses.ProxyNCALoss(num_classes=proxies.shape[0], embedding_size=proxies.shape[1],
                               softmax_scale=scale ** 2).double()
    loss.proxies.data = _t(torch, proxies)
    got = loss(_t(torch, x), _t(torch, labels)).item()
    close(got, R.proxy_nca_released(x, labels, proxies, scale=scale, form="prob"), rel=1e-9)
    assert got != pytest.approx(
        R.proxy_nca_released(x, labels, proxies, scale=scale, form="classic"), rel=1e-3)
