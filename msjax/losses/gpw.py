"""Shared pieces of the General Pair Weighting (GPW) loss family.

Every pair loss in msjax is a pure function of a similarity block ``sim[i, j]`` between
anchor rows ``i`` (labels ``labels[i]``) and reference columns ``j`` (labels
``ref_labels[j]``). The square batch is the special case ``ref_labels = labels`` with
anchor ``i`` sitting in column ``i``; the rectangular form (anchors against gathered
embeddings, row blocks, cross-batch memory) says where each anchor's own column is with
``anchor_index[i]`` (``-1`` when the anchor is not among the references), and which
columns hold a reference at all with ``ref_valid[j]`` (a cross-batch memory that is not
yet full: an unfilled slot is neither a positive nor a negative of any anchor).

GPW (Wang et al., CVPR 2019, Sec. 3) reads a loss through its pair weights
``∂L/∂S_ij``: ``w⁻_ij = ∂L/∂S_ij >= 0`` on negatives and ``w⁺_ij = -∂L/∂S_ij >= 0`` on
positives. This module holds what all losses share: input checks, the positive and
negative pair masks, a NaN-free masked log-sum-exp, and the weight summaries used for
telemetry and plots.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The released code drops the self pair by value: a positive with S >= 1 - 1e-5 is taken
# to be the anchor itself (and so are exact duplicates of it).
SELF_THRESHOLD = 1.0 - 1e-5
# "both" drops the anchor's own column and every same-label column with S >= threshold:
# the cross-batch memory's rule, where the anchor's fresh copy may be stored in bfloat16.
SELF_PAIR_MODES = ("value", "index", "both")


class Pairs(NamedTuple):
  """Validated loss inputs, similarities in the compute dtype (float32 or float64)."""

  sim: jax.Array  # [Bq, Br]
  labels: jax.Array  # [Bq]
  ref_labels: jax.Array  # [Br]
  anchor_index: jax.Array  # [Bq] int, -1 where the anchor is not a reference column
  batch_size: int  # the m the per-anchor sum is divided by
  ref_valid: jax.Array | None = None  # [Br] bool, False for an empty column; None: all


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for bfloat16/float16/float32 inputs, float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def prepare_pairs(
    sim,
    labels,
    *,
    ref_labels=None,
    anchor_index=None,
    batch_size=None,
    ref_valid=None,
    loss_name: str = "loss",
) -> Pairs:
  """Checks shapes at trace time and fills in the square-batch defaults.

  Args:
    sim: ``[Bq, Br]`` similarities (any float dtype; computed in float32 or wider).
    labels: ``[Bq]`` integer labels of the anchor rows.
    ref_labels: ``[Br]`` labels of the reference columns; ``None`` means the square
      batch (``sim`` must then be ``[B, B]`` and ``ref_labels = labels``).
    anchor_index: ``[Bq]`` column of each anchor among the references, ``-1`` for none.
      Defaults to ``arange(B)`` for the square batch and to ``-1`` otherwise.
    batch_size: the ``m`` of ``1/m Σ_i``; defaults to ``Bq``. A sharded loss passes the
      global batch size so that the per-device sums add up to the global loss.
    ref_valid: ``[Br]`` booleans, False for a column that holds no reference (an unfilled
      cross-batch memory slot): it is neither a positive nor a negative. ``None``: every
      column is a reference.
    loss_name: used in error messages.
  """
  sim = jnp.asarray(sim)
  labels = jnp.asarray(labels)
  where = f"msjax.losses.{loss_name}"
  if sim.ndim != 2:
    raise ValueError(f"{where}: `sim` must be a 2-D [anchors, references] matrix, got shape {sim.shape}.")
  if not jnp.issubdtype(sim.dtype, jnp.floating):
    raise ValueError(f"{where}: `sim` must be a float array, got dtype {sim.dtype}.")
  num_q, num_r = sim.shape
  if labels.shape != (num_q,):
    raise ValueError(
        f"{where}: `labels` has shape {labels.shape} but `sim` has {num_q} anchor rows "
        f"(shape {sim.shape}); pass one label per row."
    )
  if ref_labels is None:
    if num_q != num_r:
      raise ValueError(
          f"{where}: `sim` has shape {sim.shape}, which is not square, and no `ref_labels` "
          "were given; pass `ref_labels` (one per column) for the rectangular form."
      )
    ref_labels = labels
    if anchor_index is None:
      anchor_index = jnp.arange(num_q, dtype=jnp.int32)
  ref_labels = jnp.asarray(ref_labels)
  if ref_labels.shape != (num_r,):
    raise ValueError(
        f"{where}: `ref_labels` has shape {ref_labels.shape} but `sim` has {num_r} "
        f"reference columns (shape {sim.shape}); pass one label per column."
    )
  if anchor_index is None:
    anchor_index = jnp.full((num_q,), -1, dtype=jnp.int32)
  anchor_index = jnp.asarray(anchor_index)
  if anchor_index.shape != (num_q,) or not jnp.issubdtype(anchor_index.dtype, jnp.integer):
    raise ValueError(
        f"{where}: `anchor_index` must be an integer array of shape ({num_q},), got "
        f"{anchor_index.dtype} {anchor_index.shape}."
    )
  if batch_size is None:
    batch_size = num_q
  if not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
    raise ValueError(f"{where}: `batch_size` must be a positive Python int, got {batch_size!r}.")
  if ref_valid is not None:
    ref_valid = jnp.asarray(ref_valid)
    if ref_valid.shape != (num_r,) or ref_valid.dtype != jnp.bool_:
      raise ValueError(
          f"{where}: `ref_valid` must be a boolean array of shape ({num_r},), one per "
          f"column of `sim` {sim.shape}, got {ref_valid.dtype} {ref_valid.shape}.")
  return Pairs(sim.astype(compute_dtype(sim.dtype)), labels, ref_labels, anchor_index,
               int(batch_size), ref_valid)


def _check_bound(loss_name: str, values: dict, ok, bound: str) -> None:
  for name, value in values.items():
    try:
      value = float(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
      continue  # a traced hyper-parameter cannot be checked at trace time
    if not ok(value):
      raise ValueError(f"msjax.losses.{loss_name}: `{name}` must be {bound}, got {value!r}.")


def check_positive(loss_name: str, **values) -> None:
  """Raises for hyper-parameters that must be > 0 (traced values are not checked)."""
  _check_bound(loss_name, values, lambda v: v > 0, "> 0")


def check_non_negative(loss_name: str, **values) -> None:
  """Raises for hyper-parameters that must be >= 0 (traced values are not checked)."""
  _check_bound(loss_name, values, lambda v: v >= 0, ">= 0")


def check_choice(loss_name: str, name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"msjax.losses.{loss_name}: `{name}` must be one of {choices}, got {value!r}.")


def checked_pairs(loss_name: str, sim, labels, *, ref_labels, anchor_index, ref_valid,
                  batch_size, self_pair: str, **positive) -> Pairs:
  """``prepare_pairs`` after checking ``self_pair`` and the hyper-parameters that must
  be > 0 (``positive``): the opening every pair loss shares."""
  check_positive(loss_name, **positive)
  check_choice(loss_name, "self_pair", self_pair, SELF_PAIR_MODES)
  return prepare_pairs(sim, labels, ref_labels=ref_labels, anchor_index=anchor_index,
                       ref_valid=ref_valid, batch_size=batch_size, loss_name=loss_name)


def pair_masks(pairs: Pairs, *, self_pair: str = "value", self_threshold: float = SELF_THRESHOLD):
  """Candidate positive and negative pairs, ``[Bq, Br]`` booleans each.

  Positives share the anchor's label and are not the anchor itself; negatives have a
  different label. ``self_pair='value'`` (released code) drops every same-label column
  with ``S >= self_threshold`` (the anchor and its exact duplicates);
  ``self_pair='index'`` drops only the anchor's own column ``anchor_index[i]``;
  ``self_pair='both'`` drops both. Columns with ``ref_valid`` False are in neither mask.
  """
  same = pairs.labels[:, None] == pairs.ref_labels[None, :]
  by_value = pairs.sim < self_threshold
  by_index = jnp.arange(pairs.sim.shape[1])[None, :] != pairs.anchor_index[:, None]
  if self_pair == "value":
    not_self = by_value
  elif self_pair == "index":
    not_self = by_index
  elif self_pair == "both":
    not_self = by_value & by_index
  else:
    raise ValueError(f"`self_pair` must be one of {SELF_PAIR_MODES}, got {self_pair!r}.")
  pos, neg = same & not_self, ~same
  if pairs.ref_valid is not None:
    pos, neg = pos & pairs.ref_valid[None, :], neg & pairs.ref_valid[None, :]
  return pos, neg


def masked_log_sum_exp(x, mask, *, plus_one: bool):
  """Row-wise ``log([1 +] Σ_{j: mask_ij} exp(x_ij))``, stable, with NaN-free gradients.

  With ``plus_one`` (the implicit 1 of MS and binomial losses) an empty row gives
  ``log 1 = 0``. Without it an empty row gives 0 too (callers mask such anchors out);
  the gradient is zero there either way. The shift ``max(0, max_j x_ij)`` keeps
  ``exp`` finite for scales like β = 100 with similarities near 1.
  """
  big_neg = jnp.finfo(x.dtype).min
  shift = jnp.max(jnp.where(mask, x, big_neg), axis=-1, keepdims=True)
  if plus_one:
    shift = jnp.maximum(shift, 0.0)
  shift = jax.lax.stop_gradient(jnp.where(jnp.any(mask, axis=-1, keepdims=True), shift, 0.0))
  terms = jnp.where(mask, jnp.exp(jnp.where(mask, x - shift, 0.0)), 0.0)
  total = jnp.sum(terms, axis=-1, keepdims=True)
  if plus_one:
    total = total + jnp.exp(-shift)
  else:
    total = jnp.where(jnp.any(mask, axis=-1, keepdims=True), total, 1.0)
  return (jnp.log(total) + shift)[:, 0]


def masked_softmax(x, mask, *, plus_one: bool):
  """``exp(x_ij) / ([1 +] Σ_{k: mask_ik} exp(x_ik))`` on the mask, 0 elsewhere."""
  lse = masked_log_sum_exp(x, mask, plus_one=plus_one)
  return jnp.where(mask, jnp.exp(jnp.where(mask, x - lse[:, None], 0.0)), 0.0)


def row_count(mask):
  return jnp.sum(mask, axis=-1)


class SelectedWeights(NamedTuple):
  """A batch's weights split by side, and which pairs and anchors the selection keeps."""

  w_pos: jax.Array  # [Bq, Br] w⁺ ≥ 0 on candidate positives, 0 elsewhere
  w_neg: jax.Array  # [Bq, Br] w⁻ ≥ 0 on candidate negatives, 0 elsewhere
  pos_sel: jax.Array  # [Bq, Br] selected positives
  neg_sel: jax.Array  # [Bq, Br] selected negatives
  empty: jax.Array  # [Bq] anchors whose selected positives or negatives are empty


def select_weights(weights, pos_mask, neg_mask, selected=None) -> SelectedWeights:
  """Splits ``∂L/∂S`` into ``w⁺``/``w⁻`` and the selection (default: non-zero weights)."""
  weights = jnp.asarray(weights)
  if selected is None:
    selected = weights != 0
  pos_sel = pos_mask & selected
  neg_sel = neg_mask & selected
  empty = ~(jnp.any(pos_sel, axis=-1) & jnp.any(neg_sel, axis=-1))
  return SelectedWeights(jnp.where(pos_mask, -weights, 0.0), jnp.where(neg_mask, weights, 0.0),
                         pos_sel, neg_sel, empty)


def gpw_summary(weights, pos_mask, neg_mask, selected=None) -> dict:
  """Pair-weight summaries of one batch for telemetry and GPW plots.

  Args:
    weights: ``[Bq, Br]`` ``∂L/∂S`` (for example from ``ms_weights``).
    pos_mask, neg_mask: candidate positive and negative pairs (``pair_masks``).
    selected: pairs kept by the loss's mining; defaults to pairs of non-zero weight.

  Returns:
    A dict with per-pair arrays ``pos_weight`` (w⁺ ≥ 0) and ``neg_weight`` (w⁻ ≥ 0),
    per-anchor sums ``pos_weight_per_anchor`` / ``neg_weight_per_anchor``, and scalars:
    ``pos_mined_fraction`` / ``neg_mined_fraction`` (selected over candidate pairs),
    ``empty_anchor_fraction`` (anchors whose selected positives or negatives are empty),
    ``pos_weight_mean`` / ``pos_weight_max`` / ``neg_weight_mean`` / ``neg_weight_max``
    (over selected pairs), as float32 or wider.
  """
  w_pos, w_neg, pos_sel, neg_sel, empty = select_weights(weights, pos_mask, neg_mask,
                                                         selected)

  def ratio(num, den):
    return jnp.sum(num) / jnp.maximum(jnp.sum(den), 1)

  return {
      "pos_weight": w_pos,
      "neg_weight": w_neg,
      "pos_weight_per_anchor": jnp.sum(w_pos, axis=-1),
      "neg_weight_per_anchor": jnp.sum(w_neg, axis=-1),
      "pos_mined_fraction": ratio(pos_sel, pos_mask),
      "neg_mined_fraction": ratio(neg_sel, neg_mask),
      "empty_anchor_fraction": jnp.mean(empty.astype(w_pos.dtype)),
      "pos_weight_mean": ratio(jnp.where(pos_sel, w_pos, 0.0), pos_sel),
      "neg_weight_mean": ratio(jnp.where(neg_sel, w_neg, 0.0), neg_sel),
      "pos_weight_max": jnp.max(jnp.where(pos_sel, w_pos, 0.0)),
      "neg_weight_max": jnp.max(jnp.where(neg_sel, w_neg, 0.0)),
  }
