"""Proxy losses in GPW form: Proxy-Anchor (Kim et al., CVPR 2020) and Proxy-NCA
(Movshovitz-Attias et al., ICCV 2017; with the temperature of Teh et al., ECCV 2020).

A proxy loss is a function of the ``[B, C]`` block of similarities ``S_ip`` between the
batch's samples and C learned class proxies (``ref_labels[p]`` is proxy p's class; one
proxy per training class by default), so the GPW reading carries over unchanged: the
pair weight of a sample-to-proxy pair is ``∂L/∂S_ip``, ``w⁻ ≥ 0`` for a proxy of another
class, ``w⁺`` for its own. Proxies are normalised like the embeddings
(``proxy_loss_from_embeddings``); their gradient ``Wᵀ E`` reaches the optimiser as a
parameter group of its own (``msjax.train``).

**Proxy-Anchor** treats each proxy as an anchor over the batch::

    L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X⁺_p} e^{−α(S_xp − δ)}) + 1/|P| Σ_{p∈P} log(1 + Σ_{x∈X⁻_p} e^{α(S_xp + δ)})

``P⁺`` the proxies with a positive sample in the batch, ``P`` all proxies, ``X⁺_p``/``X⁻_p``
the batch's samples of p's class and of the others. The weights are MS's Similarity-S
and -N, with the proxy as the anchor::

    w⁺_xp = α/|P⁺| · e^{−α(S_xp−δ)} / (1 + Σ_{X⁺_p} e^{−α(S−δ)})
    w⁻_xp = α/|P|  · e^{α(S_xp+δ)}  / (1 + Σ_{X⁻_p} e^{α(S+δ)})

Defaults α = 32, δ = 0.1 (the released code). The loss is a sum over proxies, so it is
not divided by the batch size.

**Proxy-NCA** is a softmax over proxies per sample, with logits ``z_ip = 2σ² S_ip``
(``σ = scale``: the released code scales both unit vectors by σ and uses
``−‖σx − σp‖² = 2σ²S − 2σ²``, whose constant cancels)::

    L = 1/m Σ_i [ −1/|P_i| Σ_{p∈P_i} z_ip + log Σ_{p∈D_i} e^{z_ip} ]

with ``D_i`` the other classes' proxies (``positive_in_denominator=False``: the original
Proxy-NCA) or all proxies (True: Proxy-NCA++'s ``-log softmax``). Weights:
``w⁻_ip = 2σ² q_ip`` and ``w⁺_ip = 2σ²/|P_i|`` (minus ``2σ² q_ip`` when the positive is
in the denominator), ``q = softmax_{D_i}(z)``: Similarity-N, with a constant pull on the
positive. (With the positive in the denominator and two proxies of one class, the closer
one gets ``∂L/∂S > 0`` once its share of the softmax passes ``1/|P_i|``, as SupCon's
positives do; the sample's positive weights still sum to a pull.) Default σ = 3 (temperature 1/9, Teh et al.). A sample without a proxy of its
class, or (original form) without another class's proxy, contributes 0.

**Sharding.** With ``axis_name`` (inside ``shard_map``, the sample rows split over that
axis, every proxy on every device) each device passes its rows and gets the loss of the
whole global batch and its own rows' weights: Proxy-Anchor's per-proxy sums and ``P⁺``
are summed over the axis, Proxy-NCA's per-sample terms are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.losses import gpw


def _pairs(name, sim, labels, ref_labels, anchor_index, ref_valid, batch_size):
  """Checks the inputs: ``(pairs, pos, neg)`` with proxies as the reference columns.

  A proxy is never its sample's "self": there is no self pair to drop.
  """
  if anchor_index is not None:
    raise ValueError(f"msjax.losses.{name}: a proxy loss has no self pairs; "
                     "`anchor_index` must be None.")
  sim = jnp.asarray(sim)
  if ref_labels is None and sim.ndim == 2:
    ref_labels = jnp.arange(sim.shape[1], dtype=jnp.int32)
  pairs = gpw.prepare_pairs(sim, labels, ref_labels=ref_labels, ref_valid=ref_valid,
                            batch_size=batch_size, loss_name=name)
  # No anchor is among the references (anchor_index is -1), so "index" drops nothing.
  return (pairs, *gpw.pair_masks(pairs, self_pair="index"))


def _sum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _column_log1p_sum_exp(x, mask, axis_name):
  """Per column ``log(1 + Σ_{rows in mask} e^x)`` over every device's rows, stable."""
  top = jnp.max(jnp.where(mask, x, -jnp.inf), axis=0)
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.where(jnp.isfinite(top), top, 0.0), 0.0))
  total = _sum(jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - shift, -jnp.inf)), 0.0),
                       axis=0), axis_name)
  return jnp.log(total + jnp.exp(-shift)) + shift


def _proxy_anchor_terms(name, sim, labels, ref_labels, anchor_index, ref_valid, alpha, delta,
                        axis_name):
  gpw.check_positive(name, alpha=alpha)
  gpw.check_non_negative(name, delta=delta)
  pairs, pos, neg = _pairs(name, sim, labels, ref_labels, anchor_index, ref_valid, None)
  s = pairs.sim
  x_pos, x_neg = -alpha * (s - delta), alpha * (s + delta)
  lse_pos = _column_log1p_sum_exp(x_pos, pos, axis_name)
  lse_neg = _column_log1p_sum_exp(x_neg, neg, axis_name)
  with_pos = _sum(jnp.any(pos, axis=0).astype(jnp.int32), axis_name) > 0
  n_with_pos = jnp.maximum(jnp.sum(with_pos), 1).astype(s.dtype)
  n_proxies = (s.shape[1] if pairs.ref_valid is None
               else jnp.maximum(jnp.sum(pairs.ref_valid), 1).astype(s.dtype))
  # A proxy without positives (negatives) in the batch has log(1 + 0) = 0 on that side.
  value = jnp.sum(lse_pos) / n_with_pos + jnp.sum(lse_neg) / n_proxies
  return pairs, pos, neg, x_pos, x_neg, lse_pos, lse_neg, n_with_pos, n_proxies, value


def proxy_anchor_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                      alpha=32.0, delta=0.1, batch_size=None, axis_name=None):
  """Proxy-Anchor loss on the ``[B, C]`` sample-to-proxy block (module docstring).

  Args:
    sim: ``[B, C]`` similarities of the samples to the (normalised) proxies.
    labels: ``[B]`` the samples' classes.
    ref_labels: ``[C]`` each proxy's class; ``None`` for ``arange(C)``.
    anchor_index: must be None (a proxy is never a sample's self pair).
    ref_valid: ``[C]`` False for a column that holds no proxy; ``None`` for all.
    alpha, delta: the scale α and margin δ.
    batch_size: accepted for a uniform signature; the loss averages over proxies.
    axis_name: the mesh axis the rows are sharded over (inside ``shard_map``), or None.
  """
  del batch_size
  *_, value = _proxy_anchor_terms("proxy_anchor_loss", sim, labels, ref_labels, anchor_index,
                                  ref_valid, alpha, delta, axis_name)
  return value


def proxy_anchor_value_and_weights(sim, labels, *, ref_labels=None, anchor_index=None,
                                   ref_valid=None, alpha=32.0, delta=0.1, batch_size=None,
                                   axis_name=None):
  """``(proxy_anchor_loss, ∂L/∂S)``: ``+w⁻`` on other classes' proxies, ``−w⁺`` on the own."""
  del batch_size
  (_, pos, neg, x_pos, x_neg, lse_pos, lse_neg, n_with_pos, n_proxies,
   value) = _proxy_anchor_terms("proxy_anchor_weights", jax.lax.stop_gradient(sim), labels,
                                ref_labels, anchor_index, ref_valid, alpha, delta, axis_name)
  w_pos = alpha / n_with_pos * jnp.exp(jnp.where(pos, x_pos - lse_pos, -jnp.inf))
  w_neg = alpha / n_proxies * jnp.exp(jnp.where(neg, x_neg - lse_neg, -jnp.inf))
  return value, w_neg - w_pos


def proxy_anchor_weights(sim, labels, **kwargs):
  """Analytic ``∂proxy_anchor_loss/∂S`` (same arguments)."""
  return proxy_anchor_value_and_weights(sim, labels, **kwargs)[1]


def _proxy_nca_terms(name, sim, labels, ref_labels, anchor_index, ref_valid, scale,
                     positive_in_denominator, batch_size, axis_name):
  gpw.check_positive(name, scale=scale)
  if batch_size is None and axis_name is not None:
    batch_size = jnp.shape(sim)[0] * jax.lax.axis_size(axis_name)
  pairs, pos, neg = _pairs(name, sim, labels, ref_labels, anchor_index, ref_valid,
                           batch_size)
  z = 2.0 * scale ** 2 * pairs.sim
  denominator = (pos | neg) if positive_in_denominator else neg
  n_pos = gpw.row_count(pos)
  active = (n_pos > 0) & jnp.any(denominator, axis=-1)
  log_norm = gpw.masked_log_sum_exp(z, denominator, plus_one=False)
  mean_pos = jnp.sum(jnp.where(pos, z, 0.0), axis=-1) / jnp.maximum(n_pos, 1)
  value = _sum(jnp.sum(jnp.where(active, log_norm - mean_pos, 0.0)), axis_name)
  return pairs, pos, denominator, z, n_pos, active, log_norm, value / pairs.batch_size


def proxy_nca_loss(sim, labels, *, ref_labels=None, anchor_index=None, ref_valid=None,
                   scale=3.0, positive_in_denominator=False, batch_size=None,
                   axis_name=None):
  """Proxy-NCA loss on the ``[B, C]`` sample-to-proxy block (module docstring).

  Arguments as ``proxy_anchor_loss``; ``scale`` is σ (logits ``2σ²S``),
  ``positive_in_denominator`` picks Proxy-NCA++'s softmax over every proxy, and
  ``batch_size`` is the m of ``1/m`` (the global batch when sharded; default: the rows).
  """
  *_, value = _proxy_nca_terms("proxy_nca_loss", sim, labels, ref_labels, anchor_index,
                               ref_valid, scale, positive_in_denominator, batch_size,
                               axis_name)
  return value


def proxy_nca_value_and_weights(sim, labels, *, ref_labels=None, anchor_index=None,
                                ref_valid=None, scale=3.0, positive_in_denominator=False,
                                batch_size=None, axis_name=None):
  """``(proxy_nca_loss, ∂L/∂S)``: ``+w⁻`` on other classes' proxies, ``−w⁺`` on the own."""
  (pairs, pos, denominator, z, n_pos, active, log_norm,
   value) = _proxy_nca_terms("proxy_nca_weights", jax.lax.stop_gradient(sim), labels,
                             ref_labels, anchor_index, ref_valid, scale,
                             positive_in_denominator, batch_size, axis_name)
  q = jnp.exp(jnp.where(denominator, z - log_norm[:, None], -jnp.inf))
  pull = jnp.where(pos, 1.0 / jnp.maximum(n_pos, 1)[:, None], 0.0)
  weights = jnp.where(active[:, None], q - pull, 0.0) * (2.0 * scale ** 2)
  return value, weights / pairs.batch_size


def proxy_nca_weights(sim, labels, **kwargs):
  """Analytic ``∂proxy_nca_loss/∂S`` (same arguments)."""
  return proxy_nca_value_and_weights(sim, labels, **kwargs)[1]


# --- proxies: initialisation and normalisation (the loss from embeddings is
# ``embeddings.proxy_loss_from_embeddings``) ---------------------------------------------


def kaiming_fan_out_proxies(key, num_proxies: int, dim: int, dtype=jnp.float32):
  """``N(0, 2/C)`` proxies: PyTorch's ``kaiming_normal_(mode='fan_out')`` on a ``[C, D]``
  tensor, the Proxy-Anchor release's initialisation."""
  return jax.random.normal(key, (num_proxies, dim), dtype) * jnp.sqrt(2.0 / num_proxies)


def scaled_normal_proxies(key, num_proxies: int, dim: int, dtype=jnp.float32):
  """``N(0, 1)/8`` proxies, the Proxy-NCA++ release's initialisation."""
  return jax.random.normal(key, (num_proxies, dim), dtype) / 8.0


def normalize_proxies(proxies):
  """Unit rows, as the released code's ``l2_norm``: ``p / sqrt(Σp² + 1e-12)``."""
  return proxies * jax.lax.rsqrt(jnp.sum(proxies * proxies, axis=-1, keepdims=True) + 1e-12)
