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


def _prepare(sim, labels, *, ref_labels, anchor_index, batch_size, alpha, beta, epsilon,
             self_pair, weighting, name):
  gpw.check_positive(name, alpha=alpha, beta=beta)
  gpw.check_choice(name, "weighting", weighting, WEIGHTINGS)
  gpw.check_choice(name, "self_pair", self_pair, gpw.SELF_PAIR_MODES)
  try:
    if float(epsilon) < 0:
      raise ValueError(f"msjax.losses.{name}: `epsilon` must be >= 0, got {epsilon!r}.")
  except (jax.errors.ConcretizationTypeError, TypeError):
    pass
  return gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                           batch_size=batch_size, loss_name=name)


def _mine(pairs: gpw.Pairs, *, epsilon, mining, self_pair, self_threshold):
  """Mined positives, mined negatives and contributing anchors (both sets non-empty)."""
  pos, neg = gpw.pair_masks(pairs, self_pair=self_pair, self_threshold=self_threshold)
  if mining:
    s = jax.lax.stop_gradient(pairs.sim)
    inf = jnp.asarray(jnp.inf, s.dtype)
    # An anchor with no positive has min = +inf: no negative passes, so it contributes 0.
    min_pos = jnp.min(jnp.where(pos, s, inf), axis=-1, keepdims=True)
    max_neg = jnp.max(jnp.where(neg, s, -inf), axis=-1, keepdims=True)
    # Written as in the released code (S + ε > min, S − ε < max) so float rounding agrees.
    neg = neg & (s + epsilon > min_pos)
    pos = pos & (s - epsilon < max_neg)
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  return pos, neg, active


def ms_mining(sim, labels, *, ref_labels=None, anchor_index=None, epsilon=0.1, mining=True,
              self_pair="value", self_threshold=gpw.SELF_THRESHOLD):
  """The MS selection: ``(pos_mined, neg_mined, active)``, ``[Bq, Br]``, ``[Bq, Br]``, ``[Bq]``.

  ``active[i]`` is False where anchor i's mined positives or mined negatives are empty
  (it contributes 0 to the loss).
  """
  pairs = _prepare(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                   batch_size=None, alpha=1.0, beta=1.0, epsilon=epsilon, self_pair=self_pair,
                   weighting="ms", name="ms_mining")
  return _mine(pairs, epsilon=epsilon, mining=mining, self_pair=self_pair,
               self_threshold=self_threshold)


def ms_loss(sim, labels, *, ref_labels=None, anchor_index=None, alpha=2.0, beta=40.0,
            lam=0.5, epsilon=0.1, mining=True, weighting="ms", self_pair="value",
            self_threshold=gpw.SELF_THRESHOLD, batch_size=None):
  """Multi-Similarity loss on a similarity block (formula in the module docstring).

  Args:
    sim: ``[Bq, Br]`` cosine similarities; bfloat16 is accepted and computed in float32.
    labels: ``[Bq]`` anchor labels.
    ref_labels: ``[Br]`` reference labels; ``None`` for the square batch.
    anchor_index: ``[Bq]`` each anchor's own column, ``-1`` for none (see ``gpw``).
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
  pairs = _prepare(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                   batch_size=batch_size, alpha=alpha, beta=beta, epsilon=epsilon,
                   self_pair=self_pair, weighting=weighting, name="ms_loss")
  pos, neg, active = _mine(pairs, epsilon=epsilon, mining=mining, self_pair=self_pair,
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


def ms_weights(sim, labels, *, ref_labels=None, anchor_index=None, alpha=2.0, beta=40.0,
               lam=0.5, epsilon=0.1, mining=True, weighting="ms", self_pair="value",
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
  pairs = _prepare(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                   batch_size=batch_size, alpha=alpha, beta=beta, epsilon=epsilon,
                   self_pair=self_pair, weighting=weighting, name="ms_weights")
  pos, neg, active = _mine(pairs, epsilon=epsilon, mining=mining, self_pair=self_pair,
                           self_threshold=self_threshold)
  s = pairs.sim
  x_pos = -alpha * (s - lam)
  x_neg = beta * (s - lam)
  if weighting == "ms":
    w_pos = gpw.masked_softmax(x_pos, pos, plus_one=True)
    w_neg = gpw.masked_softmax(x_neg, neg, plus_one=True)
  elif weighting in ("binomial", "lifted", "binlifted"):
    w_pos = jnp.zeros_like(s)
    w_neg = jnp.zeros_like(s)
    if weighting != "lifted":
      w_pos += jnp.where(pos, jax.nn.sigmoid(x_pos), 0.0)
      w_neg += jnp.where(neg, jax.nn.sigmoid(x_neg), 0.0)
    if weighting != "binomial":
      w_pos += gpw.masked_softmax(x_pos, pos, plus_one=False)
      w_neg += gpw.masked_softmax(x_neg, neg, plus_one=False)
  else:  # "none"
    w_pos = pos.astype(s.dtype)
    w_neg = neg.astype(s.dtype)
  weights = jnp.where(active[:, None], w_neg - w_pos, 0.0)
  return weights / pairs.batch_size
