"""Pair losses evaluated from embeddings, with the analytic GPW weights as the backward pass.

For ``S = Q Rᵀ`` and ``W = ∂L/∂S`` (the loss's closed-form weights), the chain rule gives
``∂L/∂Q = W R`` and ``∂L/∂R = Wᵀ Q``; for the square batch ``Q = R = E`` it is
``∂L/∂E = (W + Wᵀ) E``. So the value and gradient cost two ``B×B×D`` matmuls (the
floor) plus elementwise work, and nothing is differentiated through masks or sorts. The
registry's fused forms of a loss are used where it has them: for MS, one set of row
statistics gives both the value and W, and ``W + Wᵀ`` is formed elementwise from them
(``S = E Eᵀ`` is symmetric), so no B×B matrix is transposed.

``block_size`` evaluates the anchors in row blocks: each block's similarity rows, loss and
weights are formed, used for its share of the gradient, and dropped, so the peak memory is
O(block_size × B) instead of O(B²). The value and gradient equal the unblocked ones.

A proxy loss (``registry.PROXY_NAMES``) compares the embeddings with learned proxies
instead: ``proxy_loss_from_embeddings`` forms ``S = E P̂ᵀ`` and uses the loss's analytic
``∂L/∂S`` as that block's backward pass; autodiff carries it to E and the raw proxies.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from msjax.losses import gpw, proxy, registry


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description of the loss: hashable, so it can be a non-differentiable argument."""

  name: str
  hparams: tuple  # sorted (keyword, value) items, Python scalars
  batch_size: int
  precision: Any
  default_anchors: bool = True  # square batch with anchor i in column i
  ref_grad: bool = True  # False: the references are constants (a cross-batch memory)

  def similarity(self, q, r):
    dtype = gpw.compute_dtype(jnp.result_type(q, r))
    return jnp.matmul(q, r.T, precision=self.precision, preferred_element_type=dtype)

  def value(self, sim, labels, ref_labels, anchor_index, ref_valid=None):
    kwargs = self._kwargs(ref_labels, anchor_index, ref_valid)
    return registry.get(self.name).loss(sim, labels, **kwargs)

  def weights(self, sim, labels, ref_labels, anchor_index, ref_valid=None):
    kwargs = self._kwargs(ref_labels, anchor_index, ref_valid)
    return registry.get(self.name).weights(sim, labels, **kwargs)

  def value_and_weights(self, sim, labels, ref_labels, anchor_index, ref_valid=None):
    entry = registry.get(self.name)
    if entry.value_and_weights is not None:  # a fused form: one pass serves both
      kwargs = self._kwargs(ref_labels, anchor_index, ref_valid)
      return entry.value_and_weights(sim, labels, **kwargs)
    return (self.value(sim, labels, ref_labels, anchor_index, ref_valid),
            self.weights(sim, labels, ref_labels, anchor_index, ref_valid))

  def value_and_symmetric_weights(self, sim, labels, anchor_index):
    """``(L, W + Wᵀ)`` on the square batch, without a transpose where the loss's fused
    symmetric form exists (MS: ``W + Wᵀ`` from per-row statistics)."""
    entry = registry.get(self.name)
    if entry.value_and_symmetric_weights is not None and self.default_anchors:
      return entry.value_and_symmetric_weights(
          sim, labels, anchor_index=anchor_index, batch_size=self.batch_size,
          **dict(self.hparams))
    value, weights = self.value_and_weights(sim, labels, labels, anchor_index)
    return value, weights + weights.T

  def _kwargs(self, ref_labels, anchor_index, ref_valid=None):
    return dict(self.hparams, ref_labels=ref_labels, anchor_index=anchor_index,
                ref_valid=ref_valid, batch_size=self.batch_size)

  def matmul(self, a, b):
    return jnp.matmul(a, b, precision=self.precision)


# --- the whole block at once: square (2 matmuls) and rectangular (3 matmuls) -------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _square(spec, emb, labels, anchor_index):
  return spec.value(spec.similarity(emb, emb), labels, labels, anchor_index)


def _square_fwd(spec, emb, labels, anchor_index):
  value, sym_weights = spec.value_and_symmetric_weights(spec.similarity(emb, emb), labels,
                                                        anchor_index)
  return value, (sym_weights, emb)


def _square_bwd(spec, residuals, g):
  sym_weights, emb = residuals
  d_emb = spec.matmul(sym_weights, emb.astype(sym_weights.dtype))
  return (g * d_emb).astype(emb.dtype), None, None


_square.defvjp(_square_fwd, _square_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rect(spec, q, r, labels, ref_labels, anchor_index, ref_valid):
  return spec.value(spec.similarity(q, r), labels, ref_labels, anchor_index, ref_valid)


def _rect_fwd(spec, q, r, labels, ref_labels, anchor_index, ref_valid):
  value, weights = spec.value_and_weights(spec.similarity(q, r), labels, ref_labels,
                                          anchor_index, ref_valid)
  return value, (weights, q, r)


def _rect_bwd(spec, residuals, g):
  weights, q, r = residuals
  d_q = spec.matmul(weights, r.astype(weights.dtype))
  if spec.ref_grad:
    d_r = (g * spec.matmul(weights.T, q.astype(weights.dtype))).astype(r.dtype)
  else:  # constant references: their B×Br×D matmul is never formed
    d_r = jnp.zeros_like(r)
  return (g * d_q).astype(q.dtype), d_r, None, None, None, None


_rect.defvjp(_rect_fwd, _rect_bwd)


# --- row blocks: O(block × B) memory -----------------------------------------------------


def _split_rows(x, block_size):
  """``x[:n·blk]`` as ``[n, blk, ...]`` and the remaining ``x[n·blk:]``."""
  n = x.shape[0] // block_size
  return x[: n * block_size].reshape((n, block_size) + x.shape[1:]), x[n * block_size:]


def _over_row_blocks(step, carry, block_size, q, labels, anchor_index):
  """Runs ``step(carry, (q_b, labels_b, index_b)) -> (carry, out)`` over row blocks.

  Whole blocks go through ``lax.scan`` (one compiled body, buffers reused); a last
  partial block, if any, is one more call. Returns the carry and the outputs of every
  row block in order: the scan's stacked outputs, then the tail's.
  """
  heads, tails = zip(*(_split_rows(x, block_size) for x in (q, labels, anchor_index)))
  outs = []
  if heads[0].shape[0]:
    carry, out = jax.lax.scan(step, carry, heads)
    outs.append(out)
  if tails[0].shape[0]:
    carry, out = step(carry, tails)
    outs.append(out)
  return carry, outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked(spec, block_size, dtypes, q, r, labels, ref_labels, anchor_index, ref_valid):
  def step(carry, xs):
    q_b, labels_b, index_b = xs
    return carry, spec.value(spec.similarity(q_b, r), labels_b, ref_labels, index_b,
                             ref_valid)

  _, outs = _over_row_blocks(step, None, block_size, q, labels, anchor_index)
  return sum(jnp.sum(o) for o in outs)


def _blocked_fwd(spec, block_size, dtypes, q, r, labels, ref_labels, anchor_index,
                 ref_valid):
  r_c = r.astype(gpw.compute_dtype(r.dtype))

  def step(d_r, xs):
    q_b, labels_b, index_b = xs
    value, weights = spec.value_and_weights(spec.similarity(q_b, r), labels_b, ref_labels,
                                            index_b, ref_valid)
    if spec.ref_grad:
      d_r = d_r + spec.matmul(weights.T, q_b.astype(weights.dtype))
    return d_r, (value, spec.matmul(weights, r_c))

  # Constant references carry a scalar instead of an [Br, D] gradient through the scan.
  init = jnp.zeros_like(r_c) if spec.ref_grad else jnp.zeros((), r_c.dtype)
  d_r, outs = _over_row_blocks(step, init, block_size, q, labels, anchor_index)
  if not spec.ref_grad:
    d_r = jnp.zeros_like(r_c)
  value = sum(jnp.sum(v) for v, _ in outs)
  d_q = jnp.concatenate([dq.reshape(-1, q.shape[1]) for _, dq in outs], axis=0)
  return value, (d_q, d_r)


def _blocked_bwd(spec, block_size, dtypes, residuals, g):
  (d_q, d_r), (q_dtype, r_dtype) = residuals, dtypes
  # Constant references keep the zero of their own type: inside shard_map, ``g`` varies
  # over the batch axis while a replicated memory does not.
  d_r = (g * d_r).astype(r_dtype) if spec.ref_grad else d_r.astype(r_dtype)
  return (g * d_q).astype(q_dtype), d_r, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --- public ------------------------------------------------------------------------------


def pair_loss_from_embeddings(emb, labels, *, loss="ms", ref_emb=None, ref_labels=None,
                              anchor_index=None, ref_valid=None, ref_grad=True,
                              block_size=None, batch_size=None,
                              precision=jax.lax.Precision.HIGHEST, **hparams):
  """``loss(emb @ ref_embᵀ, labels, ...)`` with its analytic GPW weights as the gradient.

  Args:
    emb: ``[Bq, D]`` anchor embeddings (L2-normalised by the embedding head).
    labels: ``[Bq]`` anchor labels.
    loss: a registry name (``msjax.losses.NAMES``).
    ref_emb, ref_labels: ``[Br, D]`` and ``[Br]`` reference embeddings and labels (for
      example the gathered global batch or a cross-batch memory); ``None`` for the
      square batch, where ``ref_emb = emb``.
    anchor_index: ``[Bq]`` each anchor's row in ``ref_emb``, ``-1`` for none; defaults
      as in the similarity-level losses.
    ref_valid: ``[Br]`` booleans, False for rows of ``ref_emb`` that hold no reference
      (unfilled cross-batch memory slots); ``None`` for all. Only with ``ref_emb``.
    ref_grad: False treats ``ref_emb`` as a constant (a cross-batch memory): its
      gradient is zero and its ``Bq×Br×D`` matmul is never formed.
    block_size: evaluate anchors in row blocks of this many rows (peak memory
      O(block_size × Br)); ``None`` for one block. Blocking costs one extra
      ``B×B×D`` matmul on the square batch (3 instead of 2).
    batch_size: the m of ``1/m``; defaults to ``Bq``.
    precision: of the similarity matmul. HIGHEST by default because mining and the
      by-value self-pair drop (``S >= 1 − 1e-5``) are decided on these values; a
      bfloat16/TF32 pass (~1e-3 relative error) moves those decisions.
    **hparams: the loss's hyper-parameters (Python scalars and strings), for example
      ``alpha=2.0, beta=40.0`` or ``**msjax.losses.ms_preset("paper")``.

  Returns:
    The scalar loss; ``jax.grad`` through it uses the analytic weights.
  """
  registry.get(loss)  # validates the name
  emb = jnp.asarray(emb)
  labels = jnp.asarray(labels)
  if emb.ndim != 2:
    raise ValueError(f"msjax.losses.pair_loss_from_embeddings: `emb` must be [B, D], got shape {emb.shape}.")
  if labels.shape != emb.shape[:1]:
    raise ValueError(
        "msjax.losses.pair_loss_from_embeddings: `labels` has shape "
        f"{labels.shape} but `emb` has {emb.shape[0]} rows; pass one label per row.")
  if block_size is not None and (not isinstance(block_size, numbers.Integral) or block_size <= 0):
    raise ValueError(f"msjax.losses.pair_loss_from_embeddings: `block_size` must be a positive int or None, got {block_size!r}.")
  if batch_size is None:
    batch_size = emb.shape[0]
  spec = _Spec(loss, tuple(sorted(hparams.items())), batch_size, precision,
               default_anchors=anchor_index is None, ref_grad=bool(ref_grad))

  if ref_emb is None:
    if ref_labels is not None or ref_valid is not None:
      raise ValueError("msjax.losses.pair_loss_from_embeddings: `ref_labels` or "
                       "`ref_valid` given without `ref_emb`.")
    if anchor_index is None:
      anchor_index = jnp.arange(emb.shape[0], dtype=jnp.int32)
    # Validate shapes and hyper-parameters once, on an abstract similarity block.
    jax.eval_shape(lambda s: spec.value(s, labels, labels, anchor_index),
                   jax.ShapeDtypeStruct((emb.shape[0],) * 2, gpw.compute_dtype(emb.dtype)))
    if block_size is None or block_size >= emb.shape[0]:
      return _square(spec, emb, labels, anchor_index)
    return _blocked(spec, int(block_size), (emb.dtype,) * 2, emb, emb, labels, labels,
                    anchor_index, None)

  ref_emb = jnp.asarray(ref_emb)
  if ref_labels is None:
    raise ValueError("msjax.losses.pair_loss_from_embeddings: `ref_emb` given without `ref_labels`.")
  if ref_emb.ndim != 2 or ref_emb.shape[1] != emb.shape[1]:
    raise ValueError(
        "msjax.losses.pair_loss_from_embeddings: `ref_emb` must be [Br, D] with the "
        f"same D as `emb` {emb.shape}, got {ref_emb.shape}.")
  ref_labels = jnp.asarray(ref_labels)
  if anchor_index is None:
    anchor_index = jnp.full((emb.shape[0],), -1, dtype=jnp.int32)
  anchor_index = jnp.asarray(anchor_index)
  jax.eval_shape(lambda s: spec.value(s, labels, ref_labels, anchor_index, ref_valid),
                 jax.ShapeDtypeStruct((emb.shape[0], ref_emb.shape[0]),
                                      gpw.compute_dtype(emb.dtype)))
  if block_size is None or block_size >= emb.shape[0]:
    return _rect(spec, emb, ref_emb, labels, ref_labels, anchor_index, ref_valid)
  return _blocked(spec, int(block_size), (emb.dtype, ref_emb.dtype), emb, ref_emb, labels,
                  ref_labels, anchor_index, ref_valid)


def ms_loss_from_embeddings(emb, labels, *, block_size=None, **kwargs):
  """MS loss from embeddings (``pair_loss_from_embeddings`` with ``loss="ms"``).

  With ``block_size`` it is the row-blocked MS loss for huge batches: identical value
  and gradient to ``ms_loss(emb @ embᵀ, labels)`` with peak memory O(block_size × B).
  """
  return pair_loss_from_embeddings(emb, labels, loss="ms", block_size=block_size, **kwargs)


# --- proxy losses: the sample-to-proxy block -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ProxySpec:
  """Static description of a proxy loss: hashable, a non-differentiable argument."""

  name: str
  hparams: tuple  # sorted (keyword, value) items
  batch_size: int | None
  axis_name: Any

  def kwargs(self, ref_labels, ref_valid):
    return dict(self.hparams, ref_labels=ref_labels, ref_valid=ref_valid,
                batch_size=self.batch_size, axis_name=self.axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _proxy_block(spec, sim, labels, ref_labels, ref_valid):
  return registry.get(spec.name).loss(sim, labels, **spec.kwargs(ref_labels, ref_valid))


def _proxy_block_fwd(spec, sim, labels, ref_labels, ref_valid):
  return registry.get(spec.name).value_and_weights(sim, labels,
                                                   **spec.kwargs(ref_labels, ref_valid))


def _proxy_block_bwd(spec, weights, g):
  return (g * weights).astype(weights.dtype), None, None, None


_proxy_block.defvjp(_proxy_block_fwd, _proxy_block_bwd)


def proxy_loss_from_embeddings(emb, labels, proxies, *, loss="proxy_anchor",
                               proxy_labels=None, proxy_valid=None, batch_size=None,
                               axis_name=None, precision=jax.lax.Precision.HIGHEST,
                               **hparams):
  """A proxy loss of embeddings and raw proxies, with the analytic weights as ``∂L/∂S``.

  ``S = emb · normalize(proxies)ᵀ``; the gradient reaches ``emb`` as ``W P̂`` and the
  proxies as ``Wᵀ emb`` through the normalisation (autodiff of two small ops).

  Args:
    emb: ``[B, D]`` L2-normalised embeddings (this device's rows inside ``shard_map``),
      as the embedding head gives them; the released code normalises inside its loss,
      this function (like every loss here) takes them normalised and does not check.
    labels: ``[B]`` their classes.
    proxies: ``[C, D]`` the proxies as trained (any norm); the same on every device.
    loss: a proxy loss, ``registry.PROXY_NAMES``.
    proxy_labels, proxy_valid: ``[C]`` each proxy's class (default ``arange(C)``) and
      which proxies exist (default all).
    batch_size: Proxy-NCA's m (default: the global number of rows).
    axis_name: the mesh axis the rows are sharded over, inside ``shard_map``; the result
      is then the global batch's loss on every device.
    precision: of the similarity matmul.
    **hparams: the loss's hyper-parameters (``alpha``, ``delta``; ``scale``, ...).
  """
  where = "msjax.losses.proxy_loss_from_embeddings"
  if loss not in registry.PROXY_NAMES:
    raise ValueError(f"{where}: {loss!r} is not a proxy loss; choose one of "
                     f"{registry.PROXY_NAMES}.")
  emb, proxies = jnp.asarray(emb), jnp.asarray(proxies)
  if emb.ndim != 2 or proxies.ndim != 2 or proxies.shape[1] != emb.shape[1]:
    raise ValueError(f"{where}: `emb` [B, D] and `proxies` [C, D] must share D; got "
                     f"{emb.shape} and {proxies.shape}.")
  for arg, value in (("proxy_labels", proxy_labels), ("proxy_valid", proxy_valid)):
    if value is not None and jnp.shape(value) != proxies.shape[:1]:
      raise ValueError(f"{where}: `{arg}` must hold one entry per proxy, shape "
                       f"({proxies.shape[0]},); got {jnp.shape(value)}.")
  known = tuple(registry.hparam_defaults(loss))
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"{where}: {loss} takes no {unknown}; its hyper-parameters are "
                     f"{known}.")
  dtype = gpw.compute_dtype(jnp.result_type(emb, proxies))
  unit = proxy.normalize_proxies(proxies.astype(dtype))
  sim = jnp.matmul(emb, unit.T, precision=precision, preferred_element_type=dtype)
  if proxy_labels is None:
    proxy_labels = jnp.arange(proxies.shape[0], dtype=jnp.int32)
  spec = _ProxySpec(loss, tuple(sorted(hparams.items())), batch_size, axis_name)
  return _proxy_block(spec, sim, jnp.asarray(labels), jnp.asarray(proxy_labels), proxy_valid)
