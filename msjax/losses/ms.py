"""Multi-Similarity (MS) loss with General Pair Weighting (Wang et al., CVPR 2019).

Step 1, mining with Similarity-P (ε = ``epsilon``), a mask that is not differentiated::

    negative (i, j) kept iff S_ij + ε > min_{k∈P_i} S_ik
    positive (i, j) kept iff S_ij − ε < max_{k∈N_i} S_ik

Step 2, weighting with Similarity-S and -N over the mined sets P̃_i, Ñ_i::

    L = 1/m Σ_i [ 1/α log(1 + Σ_{k∈P̃_i} e^{−α(S_ik−λ)}) + 1/β log(1 + Σ_{k∈Ñ_i} e^{β(S_ik−λ)}) ]

whose pair weights are ``w⁻_ij = e^{β(S_ij−λ)} / (1 + Σ_{k∈Ñ_i} e^{β(S_ik−λ)})`` and
``w⁺_ij = e^{−α(S_ij−λ)} / (1 + Σ_{k∈P̃_i} e^{−α(S_ik−λ)})``.

Defaults follow the released PyTorch code: α=2, β=40, λ=0.5, ε=0.1; the self pair is
dropped by value (``S >= 1 − 1e-5``); an anchor whose mined positive or mined negative
set is empty contributes 0 (the released loop skips it, and crashes where an anchor has
no positive at all: msjax gives that anchor 0 instead); the sum is divided by the batch
size m, not by the number of contributing anchors.

The paper's component ablation (Table 2, Cars-196) is expressed with ``mining`` and
``weighting``; see ``MS_ABLATIONS``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msjax.losses import gpw

# Hyper-parameter presets. "released" is what the released code (and so the paper's
# numbers) used; "paper" is what the paper's text reports.
MS_PRESETS = {
    "released": dict(alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1),
    "paper": dict(alpha=2.0, beta=50.0, lam=1.0, epsilon=0.1),
}

WEIGHTINGS = ("ms", "binomial", "lifted", "binlifted", "none")

# The paper's S/P/N component ablation as keyword sets for ms_loss (Cars-196, 64-d,
# Recall@1 in the paper): what each weight depends on is in the name's bracket.
MS_ABLATIONS = {
    "binomial": dict(mining=False, weighting="binomial"),  # S          71.9
    "lifted": dict(mining=False, weighting="lifted"),  # N              69.7
    "mining_only": dict(mining=True, weighting="none"),  # P            67.0
    "binlifted": dict(mining=False, weighting="binlifted"),  # S+N      70.4
    "weighting_only": dict(mining=False, weighting="ms"),  # S+N        73.2
    "binomial_mining": dict(mining=True, weighting="binomial"),  # S+P  74.6
    "lifted_mining": dict(mining=True, weighting="lifted"),  # N+P      72.2
    "ms": dict(mining=True, weighting="ms"),  # S+P+N                   77.3
}


def ms_preset(name: str) -> dict:
  """Returns a copy of the ``released`` or ``paper`` hyper-parameters."""
  gpw.check_choice("ms_preset", "name", name, tuple(MS_PRESETS))
  return dict(MS_PRESETS[name])


def _candidates(name, sim, labels, ref_labels, anchor_index, ref_valid, batch_size, epsilon,
                self_pair, self_threshold):
  """Checks the inputs: ``(pairs, candidate positives, candidate negatives)``."""
  gpw.check_choice(name, "self_pair", self_pair, gpw.SELF_PAIR_MODES)
  gpw.check_non_negative(name, epsilon=epsilon)
  pairs = gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                            ref_valid=ref_valid, batch_size=batch_size, loss_name=name)
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  return pairs, pos, neg


def _select(name, sim, labels, *, ref_labels, anchor_index, ref_valid, batch_size, epsilon,
            mining, self_pair, self_threshold):
  """Checks the inputs and runs step 1: ``(pairs, pos_mined, neg_mined, active)``.

  ``active[i]`` says anchor i has both a mined positive and a mined negative. This is the
  plain form that ``ms_loss`` (the autodiff reference) uses; ``_row_stats`` is the fused
  form behind ``ms_weights``.
  """
  pairs, pos, neg = _candidates(name, sim, labels, ref_labels, anchor_index, ref_valid,
                                batch_size, epsilon, self_pair, self_threshold)
  s = jax.lax.stop_gradient(pairs.sim)
  inf = jnp.asarray(jnp.inf, s.dtype)
  # An anchor with no positive has min = +inf: no negative passes, so it contributes 0.
  min_pos = jnp.min(jnp.where(pos, s, inf), axis=-1, keepdims=True)
  max_neg = jnp.max(jnp.where(neg, s, -inf), axis=-1, keepdims=True)
  pos, neg = _mine(s, pos, neg, min_pos, max_neg, epsilon, mining)
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  return pairs, pos, neg, active


def _check_weighting(name, alpha, beta, weighting):
  gpw.check_positive(name, alpha=alpha, beta=beta)
  gpw.check_choice(name, "weighting", weighting, WEIGHTINGS)


def ms_mining(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None, epsilon=0.1,
              mining=True, self_pair="value", self_threshold=gpw.SELF_THRESHOLD):
  """The MS selection: ``(pos_mined, neg_mined, active)``, ``[Bq, Br]``, ``[Bq, Br]``, ``[Bq]``.

  ``active[i]`` is False where anchor i's mined positives or mined negatives are empty
  (it contributes 0 to the loss).
  """
  _, pos, neg, active = _select(
      "ms_mining", sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
      ref_valid=ref_valid, batch_size=None, epsilon=epsilon, mining=mining, self_pair=self_pair,
      self_threshold=self_threshold)
  return pos, neg, active


def ms_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None, alpha=2.0,
            beta=40.0, lam=0.5, epsilon=0.1, mining=True, weighting="ms", self_pair="value",
            self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Multi-Similarity loss on a similarity block (formula in the module docstring).

  Args:
    sim: ``[Bq, Br]`` cosine similarities; bfloat16 is accepted and computed in float32.
    labels: ``[Bq]`` anchor labels.
    ref_labels: ``[Br]`` reference labels; ``None`` for the square batch.
    anchor_index: ``[Bq]`` each anchor's own column, ``-1`` for none (see ``gpw``).
    ref_valid: ``[Br]`` booleans, False for an empty column (an unfilled cross-batch
      memory slot, neither positive nor negative); ``None`` for all valid.
    alpha, beta: positive and negative scales (``scale_pos``, ``scale_neg``).
    lam: the similarity threshold λ (``thresh``).
    epsilon: the mining margin ε (``margin``).
    mining: apply step 1 (Similarity-P mining); False keeps every pair.
    weighting: ``"ms"`` (S+N), ``"binomial"`` (S: ``Σ 1/α·softplus(−α(S−λ))`` and
      ``Σ 1/β·softplus(β(S−λ))``), ``"lifted"`` (N: ``1/α·log Σ e^{−α(S−λ)}`` and
      ``1/β·log Σ e^{β(S−λ)}``, no implicit 1), ``"binlifted"`` (binomial + lifted), or
      ``"none"`` (every selected pair has weight 1: ``Σ_N (S−λ) − Σ_P (S−λ)``).
    self_pair: ``"value"`` (released: drop positives with ``S >= self_threshold``) or
      ``"index"`` (drop the anchor's own column only).
    self_threshold: the value threshold, ``1 − 1e-5`` as released.
    batch_size: the m of ``1/m``; defaults to ``Bq``.

  Returns:
    The scalar loss, float32 (float64 for float64 inputs).
  """
  _check_weighting("ms_loss", alpha, beta, weighting)
  pairs, pos, neg, active = _select(
      "ms_loss", sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
      ref_valid=ref_valid, batch_size=batch_size, epsilon=epsilon, mining=mining, self_pair=self_pair,
      self_threshold=self_threshold)
  s = pairs.sim
  x_pos = -alpha * (s - lam)
  x_neg = beta * (s - lam)

  def zero_outside(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1)

  def binomial():
    return (zero_outside(jax.nn.softplus(x_pos), pos) / alpha
            + zero_outside(jax.nn.softplus(x_neg), neg) / beta)

  def lifted():
    return (gpw.masked_log_sum_exp(x_pos, pos, plus_one=False) / alpha
            + gpw.masked_log_sum_exp(x_neg, neg, plus_one=False) / beta)

  if weighting == "ms":
    per_anchor = (gpw.masked_log_sum_exp(x_pos, pos, plus_one=True) / alpha
                  + gpw.masked_log_sum_exp(x_neg, neg, plus_one=True) / beta)
  elif weighting == "binomial":
    per_anchor = binomial()
  elif weighting == "lifted":
    per_anchor = lifted()
  elif weighting == "binlifted":
    per_anchor = binomial() + lifted()
  else:  # "none"
    per_anchor = zero_outside(s - lam, neg) - zero_outside(s - lam, pos)
  return jnp.sum(jnp.where(active, per_anchor, 0.0)) / pairs.batch_size


class _RowStats(NamedTuple):
  """What anchor i's pair weights depend on besides S_ij and the labels, per row.

  Broadcast as a column (``[Bq, 1]``) these give W; for a symmetric S, broadcast as a
  row (``[1, B]``) they give Wᵀ elementwise, with no transpose.
  """

  min_pos: jax.Array  # mining threshold of negatives (+inf without positives)
  max_neg: jax.Array  # mining threshold of positives (-inf without negatives)
  log_norm_pos: jax.Array  # log of the w⁺ denominator (ms: 1 + Σ e^x, lifted: Σ e^x)
  log_norm_neg: jax.Array
  active: jax.Array  # both mined sets non-empty
  value: jax.Array  # the anchor's loss term (0 where inactive)


def _mine(s, pos, neg, min_pos, max_neg, epsilon, mining):
  if not mining:
    return pos, neg
  # Written as in the released code (S + ε > min, S − ε < max) so float rounding agrees.
  return pos & (s - epsilon < max_neg), neg & (s + epsilon > min_pos)


def _row_reduce_pair(operands, inits, ops):
  """Two row reductions in one pass: ``(op_0 over row of a_0, op_1 over row of a_1)``.

  A variadic reduce lets XLA fuse the masking into a single read of S; two separate
  reductions each materialised their masked B×B input first (4x slower on the CPU).
  """
  def combine(x, y):
    return tuple(op(a, b) for op, a, b in zip(ops, x, y))

  out = jax.lax.reduce(tuple(operands), tuple(inits), combine, (operands[0].ndim - 1,))
  return tuple(o[..., None] for o in out)


def _row_stats(s, pos, neg, *, alpha, beta, lam, epsilon, mining, weighting):
  """Row statistics of the MS weights in two row passes over S (masks are recomputed).

  Neither the active flags nor the log-sum-exp shifts need a pass of their own: if any
  negative is mined the hardest one is, so ``Ñ_i ≠ ∅ ⟺ max_neg_i + ε > min_pos_i`` and
  ``max_{Ñ_i} β(S−λ) = β(max_neg_i − λ)``; likewise for positives. (Sharing one exp
  between the positive and negative sums was measured slower: XLA then materialises it.)
  """
  s = jax.lax.stop_gradient(s)
  inf = jnp.asarray(jnp.inf, s.dtype)
  min_pos, max_neg = _row_reduce_pair(
      (jnp.where(pos, s, inf), jnp.where(neg, s, -inf)), (inf, -inf),
      (jnp.minimum, jnp.maximum))
  has_pos, has_neg = jnp.isfinite(min_pos), jnp.isfinite(max_neg)
  if mining:  # the hardest negative (positive) passes iff any does: _mine's tests on it
    active = has_neg & (max_neg + epsilon > min_pos) & has_pos & (min_pos - epsilon < max_neg)
  else:
    active = has_pos & has_neg
  pos, neg = _mine(s, pos, neg, min_pos, max_neg, epsilon, mining)
  x_pos, x_neg = -alpha * (s - lam), beta * (s - lam)
  plus_one = weighting == "ms"

  def shifted_exp(x, mask, top):
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    shift = jnp.maximum(top, 0.0) if plus_one else top
    return jnp.where(mask, jnp.exp(jnp.where(mask, x - shift, 0.0)), 0.0), shift

  def log_norm(total, shift):
    total = total + jnp.exp(-shift) if plus_one else jnp.where(total > 0, total, 1.0)
    return jnp.log(total) + shift

  def row_sum(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1, keepdims=True)

  top_pos, top_neg = -alpha * (min_pos - lam), beta * (max_neg - lam)
  exp_pos, shift_pos = shifted_exp(x_pos, pos, top_pos)
  exp_neg, shift_neg = shifted_exp(x_neg, neg, top_neg)
  zero = jnp.zeros((), s.dtype)
  sum_pos, sum_neg = _row_reduce_pair((exp_pos, exp_neg), (zero, zero), (jnp.add, jnp.add))
  log_norm_pos = log_norm(sum_pos, shift_pos)
  log_norm_neg = log_norm(sum_neg, shift_neg)
  value = jnp.zeros_like(min_pos)
  if weighting in ("ms", "lifted", "binlifted"):
    value += log_norm_pos / alpha + log_norm_neg / beta
  if weighting in ("binomial", "binlifted"):
    value += (row_sum(jax.nn.softplus(x_pos), pos) / alpha
              + row_sum(jax.nn.softplus(x_neg), neg) / beta)
  if weighting == "none":
    value += row_sum(s - lam, neg) - row_sum(s - lam, pos)
  value = jnp.where(active, value, 0.0)
  return _RowStats(min_pos, max_neg, log_norm_pos, log_norm_neg, active, value)


def _pair_weights(s, same, not_self, stats, *, alpha, beta, lam, epsilon, mining, weighting):
  """``∂L/∂S_ij · m`` elementwise from the anchor's row statistics (closed forms)."""
  pos, neg = _mine(s, same & not_self, ~same & not_self, stats.min_pos, stats.max_neg, epsilon, mining)
  x = jnp.where(same, -alpha * (s - lam), beta * (s - lam))
  if weighting in ("ms", "lifted"):
    w = jnp.exp(x - jnp.where(same, stats.log_norm_pos, stats.log_norm_neg))
  elif weighting == "binomial":
    w = jax.nn.sigmoid(x)
  elif weighting == "binlifted":
    w = jax.nn.sigmoid(x) + jnp.exp(x - jnp.where(same, stats.log_norm_pos, stats.log_norm_neg))
  else:  # "none"
    w = jnp.ones_like(s)
  w = jnp.where(stats.active, w, 0.0)
  return jnp.where(neg, w, 0.0) - jnp.where(pos, w, 0.0)


def _fused(name, sim, labels, *, ref_labels, anchor_index, ref_valid, alpha, beta, lam, epsilon, mining,
           weighting, self_pair, self_threshold, batch_size, symmetric):
  """``(loss, W)``, or ``(loss, W + Wᵀ)`` for a symmetric square S, from one row-stats pass."""
  hp = dict(alpha=alpha, beta=beta, lam=lam, epsilon=epsilon, mining=mining, weighting=weighting)
  _check_weighting(name, alpha, beta, weighting)
  pairs, pos, neg = _candidates(name, sim, labels, ref_labels, anchor_index, ref_valid,
                                batch_size, epsilon, self_pair, self_threshold)
  stats = _row_stats(pairs.sim, pos, neg, **hp)
  same = pairs.labels[:, None] == pairs.ref_labels[None, :]
  weights = _pair_weights(pairs.sim, same, pos | neg, stats, **hp)
  if symmetric:
    column_stats = _RowStats(*(x.T for x in stats))
    weights += _pair_weights(pairs.sim, same, pos | neg, column_stats, **hp)
  return jnp.sum(stats.value) / pairs.batch_size, weights / pairs.batch_size


def ms_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None, alpha=2.0,
               beta=40.0, lam=0.5, epsilon=0.1, mining=True, weighting="ms", self_pair="value",
               self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Analytic ``∂ms_loss/∂S``, ``[Bq, Br]``, from the closed-form GPW weights.

  ``+w⁻_ij/m`` on mined negatives, ``−w⁺_ij/m`` on mined positives of contributing
  anchors, 0 elsewhere. For ``weighting="ms"``::

      w⁻_ij = e^{β(S_ij−λ)} / (1 + Σ_{k∈Ñ_i} e^{β(S_ik−λ)})
      w⁺_ij = e^{−α(S_ij−λ)} / (1 + Σ_{k∈P̃_i} e^{−α(S_ik−λ)})

  ``binomial``: ``w⁺ = 1/(e^{α(S−λ)} + 1)``, ``w⁻ = 1/(e^{β(λ−S)} + 1)``; ``lifted``:
  the same ratios as ``ms`` without the 1 (softmax over P̃_i / Ñ_i); ``binlifted``: their
  sum; ``none``: 1. Same arguments as ``ms_loss``.
  """
  return _fused("ms_weights", sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                ref_valid=ref_valid, alpha=alpha, beta=beta, lam=lam, epsilon=epsilon, mining=mining,
                weighting=weighting, self_pair=self_pair, self_threshold=self_threshold,
                batch_size=batch_size, symmetric=False)[1]


def ms_value_and_weights(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                         alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1, mining=True, weighting="ms",
                         self_pair="value", self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """``(ms_loss, ms_weights)`` from one set of row statistics (what a fused step needs)."""
  return _fused("ms_value_and_weights", sim, labels, ref_labels=ref_labels,
                anchor_index=anchor_index, ref_valid=ref_valid, alpha=alpha, beta=beta, lam=lam, epsilon=epsilon,
                mining=mining, weighting=weighting, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=False)


def ms_value_and_symmetric_weights(sim, labels, *, alpha=2.0, beta=40.0, lam=0.5,
                                   epsilon=0.1, mining=True, weighting="ms",
                                   self_pair="value", self_threshold=gpw.SELF_THRESHOLD,
                                   anchor_index=None, batch_size=None):
  """``(ms_loss, W + Wᵀ)`` for a square, symmetric S, without transposing a B×B matrix.

  ``W_ji`` depends on ``S_ji`` and on anchor j's row statistics; with ``S_ji = S_ij`` it
  is the same closed form evaluated with the statistics broadcast along the other axis.
  This is the gradient of ``S = E Eᵀ`` w.r.t. E up to the final ``(W + Wᵀ) E``. It is
  exact when S is exactly symmetric (``E @ E.T`` is, on the CPU backend) and within
  rounding of the weights otherwise. ``anchor_index`` must be ``arange(B)`` or None.
  """
  return _fused("ms_value_and_symmetric_weights", sim, labels, ref_labels=None,
                anchor_index=anchor_index, ref_valid=None, alpha=alpha, beta=beta, lam=lam, epsilon=epsilon,
                mining=mining, weighting=weighting, self_pair=self_pair,
                self_threshold=self_threshold, batch_size=batch_size, symmetric=True)
