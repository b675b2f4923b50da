#!/usr/bin/env python
"""Circle, SupCon, Proxy-Anchor and Proxy-NCA: value + gradient, msjax vs pml, on CPU.

What is measured: one evaluation of a loss and its gradient with respect to the float32
``[B, 512]`` embeddings (and, for the proxy losses, the ``[C, 512]`` raw proxies), side by
side with pytorch-metric-learning (pml, eager PyTorch on the CPU, gradient by autograd,
``torch.set_num_threads(2)``: as many threads as the cores XLA's CPU backend uses here):

* ``circle``        ``jax.jit(jax.value_and_grad(pair_loss_from_embeddings(loss="circle",
                    m=0.4, gamma=80, self_pair="index")))`` vs pml ``CircleLoss(m=0.4,
                    gamma=80)``; B = 1,000 and 8,000;
* ``supcon``        ``pair_loss_from_embeddings(loss="supcon", temperature=0.07,
                    base_temperature=0.07)`` vs pml ``SupConLoss(temperature=0.07)``;
                    B = 1,000 and 8,000;
* ``proxy_anchor``  ``proxy_loss_from_embeddings(loss="proxy_anchor", alpha=32,
                    delta=0.1)`` vs pml ``ProxyAnchorLoss(C, 512, margin=0.1, alpha=32)``;
                    B = 1,000 samples against C = 10,000 proxies;
* ``proxy_nca``     ``proxy_loss_from_embeddings(loss="proxy_nca", scale=3,
                    positive_in_denominator=True)`` vs pml ``ProxyNCALoss(C, 512,
                    softmax_scale=9)``; B = 1,000, C = 10,000;
* ``proxy_nca_orig``  msjax's default Proxy-NCA (``positive_in_denominator=False``, the
                    original form), timed against the same pml ``ProxyNCALoss``: pml has
                    no such form, so this row compares time only;
* floors            the matmuls every exact method needs, jitted in JAX (HIGHEST
                    precision, msjax's default; float32 on the CPU either way) and eager
                    in torch: for a pair loss ``S = E Eᵀ`` and ``(W + Wᵀ) E`` (two
                    ``B×B×D``), for a proxy loss ``S = E P̂ᵀ``, ``W P̂`` and ``Wᵀ E``
                    (three ``B×C×D``).

How pml's conventions map onto msjax's (checked in float64 before timing, see below):

* CircleLoss: pml's ``m``, ``gamma`` are msjax's; pml holds the self-paced factors
  constant (``.detach()``) as msjax's ``detach_alpha=True``; pml drops the self pair by
  index, hence ``self_pair="index"`` (msjax's default ``"value"`` also drops exact
  duplicates of the anchor; there are none in these data). pml averages over anchors
  whose loss is non-zero (``AvgNonZeroReducer``), msjax divides by B: the same here,
  where every anchor has positives and negatives and no softplus underflows to 0.
* SupConLoss: pml's ``temperature`` is τ; pml has no ``base_temperature`` (its loss is
  msjax's with τ_b = τ); both drop the self pair by index from the denominator; pml
  averages over the anchors with a non-zero loss, msjax divides by B (the same here:
  every anchor has positives, and an anchor with positives and negatives has a loss > 0).
* ProxyAnchorLoss: pml's ``margin`` is δ, ``alpha`` is α; both divide the positive
  sum by the number of proxies with a positive in the batch and the negative sum by C:
  the same quantity.
* ProxyNCALoss: pml's logits are ``softmax_scale · (−‖x̂ − p̂‖²) = 2·softmax_scale·S −
  const`` (its ``LpDistance(power=2)``, both sides normalised) in a softmax over *every*
  proxy, the positive included; msjax's are ``2σ²S``, so ``softmax_scale = σ² = 9`` and
  ``positive_in_denominator=True`` give the same per-sample terms. pml averages over the
  samples whose positive probability did not underflow to 0, msjax divides by B (the
  same here). With msjax's default ``positive_in_denominator=False`` (original
  Proxy-NCA) the loss differs: ``L_pml − L_orig = 1/B Σ_i softplus(z_iy − log Σ_{p≠y}
  e^{z_ip})`` with ``z = 2σ²S``; the check prints both sides of that relation.
* Gradients: pml normalises the embeddings inside its distance, so its embedding
  gradient is msjax's projected onto the tangent space of the unit sphere, ``g − (g·e)e``
  (msjax takes the embeddings as unit rows and differentiates ``E`` directly). Both
  differentiate the proxies through the normalisation (msjax ``p/√(‖p‖² + 1e-12)``, pml
  ``p/max(‖p‖, 1e-12)``): the proxy gradients are compared as they are.

The data are loss_speed.py's (``make_data``): K = 5 images per class, ``emb =
normalize(centre[label] + σ·noise)``, σ = 0.9, centres and noise in a random 32-d
subspace of R^512 (positive similarities ≈ 0.55, negatives 0 ± 0.18). For the proxy
losses: C = 10,000 classes with unit centres in such a subspace, the batch drawn from
B / 5 of them (labels are class ids in [0, C)); proxy p is its class's centre plus
noise (0.3 × the samples' scale), with a random norm in [0.2, 0.5] (raw, as trained
proxies: the normalisation and its gradient are part of the work): positive
similarities ≈ 0.68, negatives 0 ± 0.18.

Before timing the script checks, on the timing data at B = 1,000 (proxies: C = 10,000),
in float64 and in float32, that msjax and pml give the same loss value and gradients
(relation above), and counts the anchors pml's reducers keep. Every measurement then runs
in its own subprocess: peak RSS is that child's ``ru_maxrss`` (``os.wait4``), and a pml
that runs out of memory or time is recorded as such instead of ending the run. msjax's
sources are copied to a temporary directory at the start (``--msjax-rev REV``: taken
from git at REV instead), so edits to msjax/ during the run do not mix versions.

The machine may be shared: before each measurement the driver waits (``--quiet-wait``)
for other processes to leave the CPUs idle; each timed rep records how many cores other
processes used meanwhile (``bg``); disturbed reps are repeated and left out of the median
where possible, and the table says how many were disturbed. A fresh process's speed also
varies on a quiet machine (pml's SupCon at B = 1,000 by up to 2x between processes, its
reps within one process by a few per cent), so each measurement runs in ``--rounds``
subprocesses (2; in separate passes over the table) and the table gives the median of
their pooled reps and the spread between the rounds. Then msjax's pieces are timed alone
(``--profile``): the loss and the weights from S, the matmuls, one elementwise pass.

Usage::

    python benchmarks/new_loss_speed.py            # full run (~8-10 min on a quiet machine)
    python benchmarks/new_loss_speed.py --quick    # B = 1,000 only, fewer reps (~1.5 min);
                                                   # writes nothing unless --out is given
    python benchmarks/new_loss_speed.py --losses circle,proxy_nca --sizes 1000
    python benchmarks/new_loss_speed.py --worker circle msjax 8000   # one measurement
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing
# loss_speed.py, beside this script: the same synthetic data, and the same median-of-reps
# timing with the disturbed-rep accounting.
import loss_speed
from loss_speed import D, D_EFF, K, SEED, SIGMA, make_data, summarize, time_calls

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MSJAX_SRC = loss_speed.MSJAX_SRC  # this checkout, or the snapshot passed in MSJAX_SRC

THREADS = 2  # torch intra-op threads; XLA's CPU backend uses every core (2 here)
BG_LIMIT = loss_speed.BG_LIMIT  # cores used by others above which a timed rep is disturbed
NUM_PROXIES = 10_000
PROXY_NOISE = 0.3  # the proxies' noise, relative to the samples' σ-scaled noise
PROXY_NORMS = (0.2, 0.5)  # raw proxy norms are drawn uniformly in this range
CHECK_B = 1000

# Hyper-parameters on which both compute the same quantity (module docstring).
MSJAX_HP = {
    "circle": dict(m=0.4, gamma=80.0, self_pair="index"),
    "supcon": dict(temperature=0.07, base_temperature=0.07),
    "proxy_anchor": dict(alpha=32.0, delta=0.1),
    "proxy_nca": dict(scale=3.0, positive_in_denominator=True),
    "proxy_nca_orig": dict(scale=3.0, positive_in_denominator=False),
}
PML_HP = {
    "circle": dict(m=0.4, gamma=80),
    "supcon": dict(temperature=0.07),
    "proxy_anchor": dict(margin=0.1, alpha=32),
    "proxy_nca": dict(softmax_scale=9.0),
    "proxy_nca_orig": dict(softmax_scale=9.0),
}
PROXY = ("proxy_anchor", "proxy_nca", "proxy_nca_orig")
LOSSES = ("circle", "supcon", "proxy_anchor", "proxy_nca", "proxy_nca_orig")
SAME_QUANTITY = {
    "circle": "same loss",
    "supcon": "same loss",
    "proxy_anchor": "same loss",
    "proxy_nca": "same loss (softmax_scale = scale²)",
    "proxy_nca_orig": "time only: msjax original form, pml ++ form",
}
PAIR_SIZES = (1000, 8000)
PROXY_SIZES = (1000,)
MIB = 2**20


# --- the data ------------------------------------------------------------------------------


def make_proxy_data(batch: int, num_proxies: int = NUM_PROXIES, seed: int = SEED):
  """``(emb [B, D] unit rows, labels [B] in [0, C), proxies [C, D] raw)``, float32.

  C classes with unit centres in a random ``D_EFF``-dim subspace; the batch holds K images
  of each of B / K of them (shuffled); proxy c is normalize(centre_c + noise) times a norm
  drawn in ``PROXY_NORMS``.
  """
  rng = np.random.default_rng(seed + 1)
  basis, _ = np.linalg.qr(rng.standard_normal((D, D_EFF)))
  centres = rng.standard_normal((num_proxies, D_EFF))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  classes = rng.choice(num_proxies, -(-batch // K), replace=False)
  labels = np.repeat(classes, K)[:batch][rng.permutation(batch)]
  x = centres[labels] + SIGMA * rng.standard_normal((batch, D_EFF)) / math.sqrt(D_EFF)
  emb = (x @ basis.T).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  p = centres + PROXY_NOISE * SIGMA * rng.standard_normal((num_proxies, D_EFF)) / math.sqrt(
      D_EFF)
  p /= np.linalg.norm(p, axis=1, keepdims=True)
  p *= rng.uniform(*PROXY_NORMS, size=(num_proxies, 1))
  proxies = (p @ basis.T).astype(np.float32)
  return emb, labels.astype(np.int32), proxies


def data_for(loss: str, batch: int, num_proxies: int, dtype=np.float32):
  """``(emb, labels, proxies or None)`` in ``dtype`` (float64: re-normalised in float64)."""
  if loss in PROXY or loss == "proxy_floor":
    emb, labels, proxies = make_proxy_data(batch, num_proxies)
  else:
    (emb, labels), proxies = make_data(batch), None
  emb = emb.astype(np.float64)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  emb = emb.astype(dtype)
  if proxies is not None:
    proxies = proxies.astype(dtype)
  return emb, labels, proxies


# --- pml -----------------------------------------------------------------------------------


def make_pml(loss: str, num_proxies: int, proxies_np=None, dtype=None):
  """The pml loss module (the proxies set to ``proxies_np``, in ``dtype``)."""
  import torch
  from pytorch_metric_learning import losses

  hp = PML_HP[loss]
  if loss == "circle":
    return losses.CircleLoss(**hp)
  if loss == "supcon":
    return losses.SupConLoss(**hp)
  if loss == "proxy_anchor":
    fn = losses.ProxyAnchorLoss(num_proxies, D, **hp)
  else:
    fn = losses.ProxyNCALoss(num_proxies, D, **hp)
  fn.proxies.data = torch.tensor(proxies_np, dtype=dtype)
  return fn


def pml_value_and_grads(fn, emb, labels, proxies: bool):
  """``(loss, d/d emb, d/d proxies or None)``: one pml forward and backward."""
  e = emb.clone().requires_grad_(True)
  if proxies:
    fn.proxies.grad = None  # a fresh gradient, not accumulated into the last one
  value = fn(e, labels)
  value.backward()
  return value.detach(), e.grad, (fn.proxies.grad if proxies else None)


# --- msjax ---------------------------------------------------------------------------------


def msjax_fn(loss: str):
  """The jitted ``(emb, labels[, proxies]) -> (loss, grads)``."""
  import jax

  from msjax.losses import pair_loss_from_embeddings, proxy_loss_from_embeddings

  hp = MSJAX_HP[loss]
  if loss in PROXY:
    name = "proxy_nca" if loss == "proxy_nca_orig" else loss
    return jax.jit(jax.value_and_grad(
        lambda e, l, p: proxy_loss_from_embeddings(e, l, p, loss=name, **hp), argnums=(0, 2)))
  return jax.jit(jax.value_and_grad(
      lambda e, l: pair_loss_from_embeddings(e, l, loss=loss, **hp)))


def jax_floor_fn(proxy: bool):
  import jax
  import jax.numpy as jnp

  hi = jax.lax.Precision.HIGHEST  # as msjax's default (float32 on the CPU either way)
  if proxy:
    def floor(e, p):  # S = E P̂ᵀ, then W P̂ and Wᵀ E, all B×C×D
      s = jnp.matmul(e, p.T, precision=hi)
      return jnp.matmul(s, p, precision=hi), jnp.matmul(s.T, e, precision=hi)
  else:
    def floor(e):  # S = E Eᵀ, then (W + Wᵀ) E, both B×B×D
      return jnp.matmul(jnp.matmul(e, e.T, precision=hi), e, precision=hi)
  return jax.jit(floor)


# --- one measurement (runs in a subprocess) ------------------------------------------------


def worker(loss: str, impl: str, batch: int, args) -> dict:
  """Times ``impl`` (msjax, pml; jax, torch for the floors) of ``loss`` at ``batch``."""
  out = dict(loss=loss, impl=impl, B=batch,
             C=args.num_proxies if loss in PROXY or loss == "proxy_floor" else None)
  emb_np, labels_np, prox_np = data_for(loss, batch, args.num_proxies)
  proxy = prox_np is not None
  kw = dict(budget_s=args.rep_budget, max_reps=args.max_reps, warmup=True)
  loss_value = None
  if impl in ("pml", "torch"):
    import torch

    torch.set_num_threads(THREADS)
    emb = torch.tensor(emb_np)
    labels = torch.tensor(labels_np, dtype=torch.long)
    if impl == "torch":
      # The floor on normalised proxies (the normalisation is O(C·D), not a floor term).
      p = (torch.nn.functional.normalize(torch.tensor(prox_np), dim=1) if proxy else None)

      def call():
        with torch.no_grad():
          if proxy:
            s = emb @ p.T
            return s @ p, s.T @ emb
          return (emb @ emb.T) @ emb
    else:
      fn = make_pml(loss, args.num_proxies, prox_np, torch.float32)
      box = {}

      def call():
        box["r"] = pml_value_and_grads(fn, emb, labels, proxy)

    out["rss_before_mib"] = loss_speed.current_rss_mib()
    times, bgs, first, note = time_calls(call, reuse_slow_first_s=args.rep_budget, **kw)
    if impl == "pml":
      loss_value = float(box["r"][0])
    out["compile_s"] = None
  else:
    import jax
    import jax.numpy as jnp

    emb = jnp.asarray(emb_np)
    labels = jnp.asarray(labels_np)
    if impl == "jax":
      if proxy:
        from msjax.losses import normalize_proxies

        inputs = (emb, jax.jit(normalize_proxies)(jnp.asarray(prox_np)))
      else:
        inputs = (emb,)
      fn = jax_floor_fn(proxy)
    else:
      inputs = (emb, labels, jnp.asarray(prox_np)) if proxy else (emb, labels)
      fn = msjax_fn(loss)
    out["rss_before_mib"] = loss_speed.current_rss_mib()
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()  # compile time is kept out of the timing
    out["compile_s"] = time.perf_counter() - t0
    try:
      stats = compiled.memory_analysis()
      out["xla_temp_mib"] = stats.temp_size_in_bytes / MIB
    except Exception:  # noqa: BLE001 - not every backend reports it
      pass
    box = {}

    def call():
      box["r"] = jax.block_until_ready(compiled(*inputs))

    times, bgs, first, note = time_calls(call, reuse_slow_first_s=float("inf"), **kw)
    if impl == "msjax":
      loss_value = float(box["r"][0])
  median, best, used, disturbed, bg_max = summarize(times, bgs)
  if "msjax" in sys.modules:
    out["msjax_file"] = sys.modules["msjax"].__file__
  out.update(status="ok", times_s=times, bg_cores=bgs, median_s=median, min_s=best,
             reps=used, disturbed_reps=disturbed, bg_cores_max=bg_max, first_call_s=first,
             note=note, loss_value=loss_value, peak_rss_self_mib=loss_speed.rss_mib_self())
  return out


def child_env() -> dict:
  return loss_speed.child_env()


def run_child(cmd_args, timeout_s: float, quiet_wait: float) -> dict:
  """Runs this script with ``cmd_args`` in a subprocess after waiting for a quiet machine;
  its last ``RESULT`` line, plus peak RSS (``os.wait4``) and the status."""
  r = timing.run_measurement([sys.executable, os.path.abspath(__file__), *cmd_args],
                             env=child_env(), cwd=REPO, timeout_s=timeout_s,
                             quiet_wait_s=quiet_wait, bg_limit=BG_LIMIT)
  return dict(r, wall_s=round(r["wall_s"], 1))


# --- the agreement check (a subprocess per dtype: float64 needs jax_enable_x64) ------------


def check_worker(dtype_name: str, losses: list[str], args) -> dict:
  """Loss values and gradients of msjax and pml on the timing data at B = CHECK_B."""
  import jax

  if dtype_name == "float64":
    jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import torch

  torch.set_num_threads(THREADS)
  tdt = torch.float64 if dtype_name == "float64" else torch.float32
  ndt = np.float64 if dtype_name == "float64" else np.float32
  out = dict(dtype=dtype_name, B=CHECK_B, losses={})

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

  for loss in losses:
    proxy = loss in PROXY
    emb_np, labels_np, prox_np = data_for(loss, CHECK_B, args.num_proxies, ndt)
    vg = msjax_fn(loss)
    if proxy:
      v, (g_e, g_p) = vg(jnp.asarray(emb_np), jnp.asarray(labels_np), jnp.asarray(prox_np))
      g_p = np.asarray(g_p)
    else:
      v, g_e = vg(jnp.asarray(emb_np), jnp.asarray(labels_np))
    ms_v, ms_ge = float(v), np.asarray(g_e, np.float64)
    # pml normalises the embeddings: its gradient is msjax's tangential part.
    e64 = emb_np.astype(np.float64)
    ms_ge_t = ms_ge - np.sum(ms_ge * e64, axis=1, keepdims=True) * e64
    fn = make_pml(loss, args.num_proxies, prox_np, tdt)
    emb_t = torch.tensor(emb_np, dtype=tdt)
    labels_t = torch.tensor(labels_np, dtype=torch.long)
    pv, pge, pgp = pml_value_and_grads(fn, emb_t, labels_t, proxy)
    c = dict(loss_msjax=ms_v, loss_pml=float(pv), same_quantity=SAME_QUANTITY[loss],
             relerr_loss=abs(ms_v - float(pv)) / abs(float(pv)),
             relerr_grad_emb_tangent=rel(ms_ge_t, pge.numpy()),
             relerr_grad_emb_raw=rel(ms_ge, pge.numpy()))
    if proxy:
      c["relerr_grad_proxies"] = rel(g_p, pgp.numpy())
    if loss == "circle":
      # pml's ``torch.nn.Softplus()`` returns z itself for z > 20 (its ``threshold``):
      # L_msjax − L_pml = 1/B Σ_{z_i > 20} log(1 + e^{−z_i}), and σ(z_i) vs 1 in the
      # gradient. Visible in float64 only (e^{−20} ≈ 2e-9); pml with an exact softplus
      # must agree to rounding.
      s64 = e64 @ e64.T
      m, gamma = MSJAX_HP[loss]["m"], MSJAX_HP[loss]["gamma"]
      same = labels_np[:, None] == labels_np[None, :]
      pos, neg = same & ~np.eye(CHECK_B, dtype=bool), ~same
      x_pos = -gamma * np.maximum(1 + m - s64, 0) * (s64 - (1 - m))
      x_neg = gamma * np.maximum(s64 + m, 0) * (s64 - m)
      z = (_masked_lse(x_pos, pos) + _masked_lse(x_neg, neg))
      big = z > 20
      c["relation"] = "L_msjax - L_pml = 1/B sum_{z_i > 20} log1p(exp(-z_i)) (torch Softplus threshold)"
      c["relation_lhs"] = ms_v - float(pv)
      c["relation_rhs"] = float(np.sum(np.log1p(np.exp(-z[big]))) / CHECK_B)
      c["relation_relerr"] = abs(c["relation_lhs"] - c["relation_rhs"]) / max(
          abs(c["relation_rhs"]), 1e-300)
      c["anchors_above_softplus_threshold"] = int(big.sum())
      fn.soft_plus = torch.nn.Softplus(beta=1, threshold=1e30)  # exact (z < 100 here)
      xv, xge, _ = pml_value_and_grads(fn, emb_t, labels_t, False)
      c["loss_pml_exact_softplus"] = float(xv)
      c["relerr_loss_exact_softplus"] = abs(ms_v - float(xv)) / abs(float(xv))
      c["relerr_grad_emb_tangent_exact_softplus"] = rel(ms_ge_t, xge.numpy())
    if proxy and loss != "proxy_nca_orig":
      # pml normalises a proxy as p / max(‖p‖, 1e-12), msjax as p / √(‖p‖² + 1e-12): a
      # relative difference 1e-12 / (2‖p‖²) ≈ 1e-11 here. msjax's similarity-level loss on
      # pml's normalisation must agree to rounding.
      from msjax.losses import get

      unit = prox_np.astype(np.float64) / np.linalg.norm(prox_np.astype(np.float64), axis=1,
                                                         keepdims=True)
      s_pml = jnp.asarray((e64 @ unit.T).astype(ndt))
      v_same = float(get(loss).loss(s_pml, jnp.asarray(labels_np), **MSJAX_HP[loss]))
      c["loss_msjax_pml_normalisation"] = v_same
      c["relerr_loss_pml_normalisation"] = abs(v_same - float(pv)) / abs(float(pv))
    # How many terms pml's reducer averages over (msjax divides by B, or for
    # Proxy-Anchor by the proxies with positives and by C, as pml does).
    with torch.no_grad():
      ld = fn.compute_loss(emb_t, labels_t, None, emb_t, labels_t)
    if loss in ("circle", "supcon"):
      per = ld["loss"]["losses"]
      c["pml_reducer_count"] = int((per > 0).sum())
      c["msjax_divisor"] = CHECK_B
    elif loss.startswith("proxy_nca"):
      c["pml_reducer_count"] = int(ld["loss"]["losses"].numel())
      c["msjax_divisor"] = CHECK_B
    else:
      c["pml_divisors"] = [int(ld["pos_loss"]["divisor"]), int(ld["neg_loss"]["divisor"])]
    if loss == "proxy_nca_orig":
      # L_pml − L_orig = 1/B Σ_i softplus(z_iy − log Σ_{p≠y} e^{z_ip}),  z = 2σ² S.
      p = prox_np.astype(np.float64)
      p /= np.linalg.norm(p, axis=1, keepdims=True)
      z = 2 * MSJAX_HP[loss]["scale"] ** 2 * (e64 @ p.T)
      rows = np.arange(CHECK_B)
      zy = z[rows, labels_np]
      zn = z.copy()
      zn[rows, labels_np] = -np.inf
      top = zn.max(1)
      lse_n = top + np.log(np.exp(zn - top[:, None]).sum(1))
      gap = float(np.mean(np.logaddexp(0.0, zy - lse_n)))
      c["relation"] = "L_pml - L_msjax_orig = mean_i softplus(z_iy - lse_{p!=y} z_ip)"
      c["relation_lhs"] = float(pv) - ms_v
      c["relation_rhs"] = gap
      c["relation_relerr"] = abs(c["relation_lhs"] - gap) / abs(gap)
    out["losses"][loss] = c
  return out


def _masked_lse(x, mask):
  """Row-wise ``log Σ_{mask} e^x`` in NumPy (−inf for an empty row)."""
  x = np.where(mask, x, -np.inf)
  top = np.max(x, axis=1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  with np.errstate(divide="ignore"):
    return (top + np.log(np.sum(np.exp(x - top), axis=1, keepdims=True)))[:, 0]


def print_check(chk):
  if chk.get("status") != "ok":
    print(f"  {chk.get('dtype')}: {chk.get('status')} {chk.get('note', '')}")
    return
  tol = 1e-10 if chk["dtype"] == "float64" else 1e-4

  def ok(x):
    return f"{x:.1e} [{'OK ' if x <= tol else 'BAD'}]"

  for loss, c in chk["losses"].items():
    print(f"  {chk['dtype']} B={chk['B']} {loss:<15} msjax={c['loss_msjax']:.12g} "
          f"pml={c['loss_pml']:.12g}")
    if loss == "proxy_nca_orig":
      print(f"      differ by design: {c['relation']}: lhs {c['relation_lhs']:.10g}, rhs "
            f"{c['relation_rhs']:.10g}, rel.diff {ok(c['relation_relerr'])}")
    elif loss == "circle":
      print(f"      vs pml as is: loss {c['relerr_loss']:.1e}, grad emb (tangential) "
            f"{c['relerr_grad_emb_tangent']:.1e}; {c['relation']}: lhs "
            f"{c['relation_lhs']:.4g}, rhs {c['relation_rhs']:.4g} "
            f"({c['anchors_above_softplus_threshold']} anchors with z > 20)")
      print(f"      vs pml with an exact softplus: loss "
            f"{ok(c['relerr_loss_exact_softplus'])}, grad emb (tangential) "
            f"{ok(c['relerr_grad_emb_tangent_exact_softplus'])}")
    else:
      line = (f"      loss {ok(c['relerr_loss'])}, grad emb (tangential) "
              f"{ok(c['relerr_grad_emb_tangent'])}")
      if "relerr_grad_proxies" in c:
        line += f", grad proxies {ok(c['relerr_grad_proxies'])}"
      if "relerr_loss_pml_normalisation" in c:
        line += (f"; msjax's loss of the similarities on pml's proxy normalisation "
                 f"{ok(c['relerr_loss_pml_normalisation'])}")
      print(line)
    if "pml_reducer_count" in c:
      print(f"      pml's reducer averages over {c['pml_reducer_count']} terms, msjax divides "
            f"by {c['msjax_divisor']}")
    elif "pml_divisors" in c:
      print(f"      pml's divisors (proxies with positives, all proxies): {c['pml_divisors']}")


# --- where msjax spends its time (runs in a subprocess) ------------------------------------


def profile_worker(loss: str, batch: int, args, reps: int = 5) -> dict:
  """Times the pieces of msjax's value + gradient, each jitted on its own."""
  import jax
  import jax.numpy as jnp

  from msjax.losses import get, normalize_proxies

  hi = jax.lax.Precision.HIGHEST
  emb_np, labels_np, prox_np = data_for(loss, batch, args.num_proxies)
  emb, labels = jnp.asarray(emb_np), jnp.asarray(labels_np)
  hp = dict(MSJAX_HP[loss])
  name = "proxy_nca" if loss == "proxy_nca_orig" else loss
  entry = get(name)

  def tm(f, *xs):
    compiled = jax.jit(f).lower(*xs).compile()
    return timing.median_seconds(compiled, *xs, calls=reps)

  if loss in PROXY:
    raw = jnp.asarray(prox_np)
    unit = jax.jit(normalize_proxies)(raw)
    sim = jax.jit(lambda e, p: jnp.matmul(e, p.T, precision=hi))(emb, unit)
    _, w = jax.jit(lambda s: entry.value_and_weights(s, labels, **hp))(sim)
    pieces = {
        "S = E P^T (matmul 1)": tm(lambda e, p: jnp.matmul(e, p.T, precision=hi), emb, unit),
        "W P (matmul 2)": tm(lambda w, p: jnp.matmul(w, p, precision=hi), w, unit),
        "W^T E (matmul 3)": tm(lambda w, e: jnp.matmul(w.T, e, precision=hi), w, emb),
        "floor: the three matmuls": tm(jax_floor_fn(True), emb, unit),
        "loss from S": tm(lambda s: entry.loss(s, labels, **hp), sim),
        "loss + weights from S (value_and_weights)": tm(
            lambda s: entry.value_and_weights(s, labels, **hp), sim),
        "exp over B x C (one elementwise pass)": tm(jnp.exp, sim),
        "normalize proxies + its vjp": tm(
            lambda p, g: jax.vjp(normalize_proxies, p)[1](g), raw, unit),
        f"msjax {loss} value_and_grad": tm(msjax_fn(loss), emb, labels, raw),
    }
    floor_key = "floor: the three matmuls"
  else:
    sim = jax.jit(lambda e: jnp.matmul(e, e.T, precision=hi))(emb)
    pieces = {
        "S = E E^T (matmul 1)": tm(lambda e: jnp.matmul(e, e.T, precision=hi), emb),
        "floor: (E E^T) E": tm(jax_floor_fn(False), emb),
        "loss from S": tm(lambda s: entry.loss(s, labels, **hp), sim),
        "loss + W + W^T from S (value_and_symmetric_weights)": tm(
            lambda s: entry.value_and_symmetric_weights(s, labels, **hp), sim),
        "exp over B x B (one elementwise pass)": tm(jnp.exp, sim),
        f"msjax {loss} value_and_grad": tm(msjax_fn(loss), emb, labels),
    }
    floor_key = "floor: (E E^T) E"
  return dict(loss=loss, B=batch, reps=reps, seconds=pieces, floor_key=floor_key)


def print_profile(p):
  if p.get("status") != "ok":
    print(f"  {p.get('loss')} B={p.get('B')}: {p.get('status')} {p.get('note', '')}")
    return
  floor = p["seconds"][p["floor_key"]]
  for name, t in p["seconds"].items():
    print(f"  {p['loss']} B={p['B']:<6d} {name:<52s} {t:8.4f} s  {t / floor:5.2f}x floor")


# --- rounds: one measurement in several subprocesses -------------------------------------


def merge_rounds(runs) -> list[dict]:
  """One result per (loss, impl, B) from its rounds (separate subprocesses): the median
  over the pooled clean reps of every round (``summarize``), the rounds' own medians and
  their spread (max / min: how much a fresh process's speed varies), the largest peak RSS.
  """
  groups = {}
  for r in runs:
    groups.setdefault((r["loss"], r["impl"], r["B"]), []).append(r)
  out = []
  for rs in groups.values():
    ok = [r for r in rs if r.get("status") == "ok"]
    peak = max((r.get("peak_rss_mib") or 0.0) for r in rs)
    if not ok:
      out.append(dict({k: v for k, v in rs[0].items() if k != "round"},
                      peak_rss_mib=peak, rounds=len(rs)))
      continue
    times = [t for r in ok for t in r["times_s"]]
    bgs = [b for r in ok for b in r["bg_cores"]]
    median, best, used, disturbed, bg_max = summarize(times, bgs)
    meds = [r["median_s"] for r in ok]
    notes = sorted({r["note"] for r in ok if r.get("note")})
    first = {k: v for k, v in ok[0].items() if k != "round"}
    out.append(dict(first, times_s=times, bg_cores=bgs, median_s=median, min_s=best, reps=used,
                    disturbed_reps=disturbed, bg_cores_max=bg_max, peak_rss_mib=peak,
                    rounds=len(rs), failed_rounds=len(rs) - len(ok), round_medians_s=meds,
                    round_spread=max(meds) / min(meds), note="; ".join(notes),
                    compile_s=(None if ok[0].get("compile_s") is None
                               else float(np.mean([r["compile_s"] for r in ok]))),
                    wall_s=sum(r.get("wall_s", 0.0) for r in rs)))
  return out


# --- tables --------------------------------------------------------------------------------


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def ok_s(r):
  return r["median_s"] if r and r.get("status") == "ok" else None


def cases(results):
  """``[(loss, B, C)]`` of the losses run, in run order (a pml run that only serves
  ``proxy_nca_orig`` makes no row of its own)."""
  seen = []
  for r in results:
    if r["loss"] in LOSSES and (r["loss"], r["B"], r["C"]) not in seen and (
        r["impl"] == "msjax" or any(x["loss"] == r["loss"] and x["impl"] == "msjax"
                                    for x in results)):
      seen.append((r["loss"], r["B"], r["C"]))
  return seen


def lookup(results):
  by = {(r["loss"], r["impl"], r["B"]): r for r in results}

  def get(loss, impl, batch):
    if impl in ("jax", "torch"):
      loss = "proxy_floor" if loss in PROXY else "floor"
    if loss == "proxy_nca_orig" and impl == "pml":
      loss = "proxy_nca"  # the same pml run
    return by.get((loss, impl, batch))

  return get


def cell(r):
  if r is None:
    return "-"
  if r.get("status") == "ok":
    return f"{r['median_s']:.3g} s ({r['peak_rss_mib'] / 1024:.2f} GiB)"
  if r.get("status") == "oom":
    return f"oom ({r['peak_rss_mib'] / 1024:.1f} GiB)"
  return r.get("status", "?")


def ratio(a, b):
  return a / b if a is not None and b is not None else None


def text_table(results) -> list[str]:
  """One line per measurement, in run order."""
  head = (f"{'loss':<15} {'impl':<6} {'B':>5} {'C':>6} {'rnd':>3} {'time_s':>9} {'reps':>4} "
          f"{'dist':>4} {'spread':>6} {'peak_RSS_MiB':>12} {'compile_s':>9} {'bg':>4} "
          f"{'loss_value':>12}  status")
  lines = [head, "-" * len(head)]
  for r in results:
    ok = r.get("status") == "ok"
    status = r["status"] if ok and not r.get("note") else f"{r['status']}: {r.get('note', '')}"
    lines.append(
        f"{r['loss']:<15} {r['impl']:<6} {r['B']:>5} {fmt(r.get('C'), '6d')} "
        f"{fmt(r.get('round', r.get('rounds')), '3d')} "
        f"{fmt(r.get('median_s') if ok else None, '9.4g')} {fmt(r.get('reps'), '4d')} "
        f"{fmt(r.get('disturbed_reps'), '4d')} {fmt(r.get('round_spread'), '6.2f')} "
        f"{fmt(r.get('peak_rss_mib'), '12.0f')} "
        f"{fmt(r.get('compile_s'), '9.2f')} {fmt(r.get('bg_cores_max'), '4.1f')} "
        f"{fmt(r.get('loss_value'), '12.7g')}  {status}")
  return lines


def ratio_rows(results) -> list[dict]:
  get = lookup(results)
  rows = []
  for loss, b, c in cases(results):
    m, p = get(loss, "msjax", b), get(loss, "pml", b)
    jf, tf = get(loss, "jax", b), get(loss, "torch", b)
    mv, pv = (m or {}).get("loss_value"), (p or {}).get("loss_value")
    same = loss != "proxy_nca_orig"
    rows.append(dict(
        loss=loss, B=b, C=c, msjax=m, pml=p, jax_floor=jf, torch_floor=tf,
        pml_over_msjax=ratio(ok_s(p), ok_s(m)), msjax_over_jax_floor=ratio(ok_s(m), ok_s(jf)),
        pml_over_torch_floor=ratio(ok_s(p), ok_s(tf)),
        relerr_loss_f32=(abs(mv - pv) / abs(pv) if same and mv is not None and pv is not None
                         else None),
        disturbed=sum((x or {}).get("disturbed_reps") or 0 for x in (m, p, jf, tf)),
        spread=max([(x or {}).get("round_spread") or 1.0 for x in (m, p, jf, tf)]),
        same_quantity=SAME_QUANTITY[loss]))
  return rows


def summary_lines(rows) -> list[str]:
  head = (f"{'loss':<15} {'B':>5} {'C':>6} {'msjax_s':>9} {'pml_s':>9} {'pml/msjax':>9} "
          f"{'jaxfloor_s':>10} {'msjax/floor':>11} {'torchfloor_s':>12} {'pml/tfloor':>10} "
          f"{'msjax_GiB':>9} {'pml_GiB':>8} {'dist':>4} {'spread':>6}  quantity")
  lines = [head, "-" * len(head)]
  for r in rows:
    gib = lambda x: (x["peak_rss_mib"] / 1024 if x and x.get("peak_rss_mib") else None)
    lines.append(
        f"{r['loss']:<15} {r['B']:>5} {fmt(r['C'], '6d')} {fmt(ok_s(r['msjax']), '9.4g')} "
        f"{fmt(ok_s(r['pml']), '9.4g')} {fmt(r['pml_over_msjax'], '9.2f')} "
        f"{fmt(ok_s(r['jax_floor']), '10.4g')} {fmt(r['msjax_over_jax_floor'], '11.2f')} "
        f"{fmt(ok_s(r['torch_floor']), '12.4g')} {fmt(r['pml_over_torch_floor'], '10.2f')} "
        f"{fmt(gib(r['msjax']), '9.2f')} {fmt(gib(r['pml']), '8.2f')} {r['disturbed']:>4d} "
        f"{r['spread']:6.2f}  "
        f"{r['same_quantity']}")
  return lines


def markdown(meta, rows, checks, profiles) -> str:
  v = meta["versions"]
  lines = [
      "# Circle, SupCon, Proxy-Anchor, Proxy-NCA: value + gradient, msjax vs pml, CPU",
      "",
      f"{meta['cpu']}, {meta['cpu_count']} cores (XLA uses all; torch set to {THREADS} "
      f"threads), {meta.get('mem_total_gib', '?')} GiB RAM; jax {v.get('jax')}, torch "
      f"{v.get('torch')}, pytorch-metric-learning {v.get('pytorch_metric_learning')}; "
      f"{meta['date']}; msjax: {meta['msjax_source']} (digest {meta['msjax_digest']}).",
      f"D={D}, float32; pair losses: K={K} images per class, loss_speed.py's data "
      f"(normalize(centre[label] + σ·noise), σ={SIGMA}, a random {D_EFF}-d subspace); proxy "
      f"losses: B samples of B/{K} classes against C={meta['num_proxies']:,} raw proxies "
      "(norms 0.2-0.5). Gradient w.r.t. the embeddings (and the proxies). Median seconds "
      "per call, compile excluded; in brackets the peak RSS of the measuring process. "
      "`pml / msjax`: ratio of the medians (> 1: msjax faster); `/ floor`: msjax over the "
      "JAX matmul floor (pair: S = E Eᵀ and (W + Wᵀ) E, two B×B×D; proxy: S = E P̂ᵀ, W P̂, "
      "Wᵀ E, three B×C×D); `dist`: timed reps disturbed by other processes (left out of "
      "the median where clean ones sufficed). Each measurement ran in "
      f"{meta['timing']['rounds']} separate subprocess(es), in separate passes over the "
      "table; the time is the median of their pooled reps, `spread` the largest ratio "
      "between two rounds' medians among the row's four measurements (a fresh process's "
      "speed varies, pml's most). Generated by `benchmarks/new_loss_speed.py`.",
      "",
      "| loss | B | C | msjax | pml | pml / msjax | JAX floor | msjax / floor | torch floor "
      "| pml / torch floor | loss rel. diff (f32) | dist | spread | compared |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['loss']} | {r['B']:,} | {'' if r['C'] is None else format(r['C'], ',')} | "
        f"{cell(r['msjax'])} | {cell(r['pml'])} | **{fmt(r['pml_over_msjax'], '.2f')}** | "
        f"{cell(r['jax_floor'])} | {fmt(r['msjax_over_jax_floor'], '.2f')} | "
        f"{cell(r['torch_floor'])} | {fmt(r['pml_over_torch_floor'], '.2f')} | "
        f"{fmt(r['relerr_loss_f32'], '.1e')} | {r['disturbed']} | {r['spread']:.2f} | "
        f"{r['same_quantity']} |")
  lines += [
      "",
      "Hyper-parameters (the same quantity unless said): circle msjax `m=0.4, gamma=80, "
      "self_pair=\"index\"` / pml `CircleLoss(m=0.4, gamma=80)`; supcon msjax "
      "`temperature=base_temperature=0.07` / pml `SupConLoss(temperature=0.07)`; "
      "proxy_anchor msjax `alpha=32, delta=0.1` / pml `ProxyAnchorLoss(margin=0.1, "
      "alpha=32)`; proxy_nca msjax `scale=3, positive_in_denominator=True` / pml "
      "`ProxyNCALoss(softmax_scale=9)` (pml's −‖x̂−p̂‖² logits are 2S − 2: scale² = "
      "softmax_scale); proxy_nca_orig is msjax's default original form "
      "(`positive_in_denominator=False`), which pml cannot compute: its row compares the "
      "time of a different quantity against the same pml run. Reductions: pml averages "
      "Circle, SupCon and Proxy-NCA over the anchors whose loss is non-zero "
      "(`AvgNonZeroReducer`; Proxy-NCA: whose positive probability did not underflow), "
      "msjax divides by B; on these data every anchor counts in both (checked below).",
  ]
  for chk in checks:
    if chk.get("status") != "ok":
      lines += ["", f"Agreement check {chk.get('dtype')}: {chk.get('status')}"]
      continue
    lines += ["", f"Agreement at B={chk['B']:,} (proxies: C={meta['num_proxies']:,}), "
              f"{chk['dtype']}: relative differences msjax vs pml; pml's embedding gradient "
              "against msjax's tangential part:", "",
              "| loss | msjax | pml | loss | grad emb | grad proxies | pml reducer terms | "
              "note |", "|---|---|---|---|---|---|---|---|"]
    for loss, c in chk["losses"].items():
      terms = (f"{c['pml_reducer_count']} of {c['msjax_divisor']}" if "pml_reducer_count" in c
               else f"{c['pml_divisors'][0]} proxies with positives; C = {c['pml_divisors'][1]}")
      head = f"| {loss} | {c['loss_msjax']:.12g} | {c['loss_pml']:.12g} |"
      if loss == "proxy_nca_orig":
        lines.append(
            f"{head} - | - | - | {terms} | a different loss by design: L_pml − L_orig = "
            f"{c['relation_lhs']:.10g}, 1/B Σ softplus(z_iy − log Σ_(p≠y) e^z_ip) = "
            f"{c['relation_rhs']:.10g} (rel. diff {c['relation_relerr']:.1e}) |")
        continue
      note = ""
      if loss == "circle":
        note = (f"pml's `torch.nn.Softplus` returns z for z > 20 "
                f"({c['anchors_above_softplus_threshold']} anchors): L_msjax − L_pml = "
                f"{c['relation_lhs']:.4g} vs 1/B Σ_(z>20) log1p(e^−z) = "
                f"{c['relation_rhs']:.4g}"
                + (" (in float32 below rounding)" if chk["dtype"] == "float32" else "")
                + "; pml with an exact softplus: loss "
                f"{c['relerr_loss_exact_softplus']:.1e}, grad "
                f"{c['relerr_grad_emb_tangent_exact_softplus']:.1e}")
      elif "relerr_loss_pml_normalisation" in c:
        note = ("proxies normalised p/√(‖p‖²+1e-12) (msjax) vs p/max(‖p‖, 1e-12) (pml); "
                "msjax's loss on pml's normalisation: "
                f"{c['relerr_loss_pml_normalisation']:.1e}")
      gp = c.get("relerr_grad_proxies")
      lines.append(f"{head} {c['relerr_loss']:.1e} | {c['relerr_grad_emb_tangent']:.1e} | "
                   f"{fmt(gp, '.1e')} | {terms} | {note} |")
  for p in profiles:
    if p.get("status") != "ok":
      continue
    floor = p["seconds"][p["floor_key"]]
    lines += ["", f"Where msjax {p['loss']} spends its time at B={p['B']:,} (each piece "
              "jitted alone, median of 5):", "", "| piece | seconds | / floor |",
              "|---|---|---|"]
    lines += [f"| {k} | {t:.4f} | {t / floor:.2f} |" for k, t in p["seconds"].items()]
  return "\n".join(lines) + "\n"


# --- the driver ----------------------------------------------------------------------------


def plan(losses, pair_sizes, proxy_sizes):
  """``[(loss, impl, B)]``: per size, each loss's msjax and pml runs, then the floors."""
  todo = []
  pair = [l for l in losses if l not in PROXY]
  for b in pair_sizes:
    if not pair:
      break
    for loss in pair:
      todo += [(loss, "msjax", b), (loss, "pml", b)]
    todo += [("floor", "jax", b), ("floor", "torch", b)]
  prox = [l for l in losses if l in PROXY]
  for b in proxy_sizes:
    if not prox:
      break
    for loss in prox:
      todo.append((loss, "msjax", b))
      if loss != "proxy_nca_orig":
        todo.append((loss, "pml", b))
    if "proxy_nca_orig" in prox and "proxy_nca" not in prox:
      todo.append(("proxy_nca", "pml", b))
    todo += [("proxy_floor", "jax", b), ("proxy_floor", "torch", b)]
  return todo


def snapshot_msjax(rev):
  """A copy of msjax/ (the working tree, or git ``rev``) in a temporary directory."""
  dst = tempfile.mkdtemp(prefix="msjax_src_")
  if rev:
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "msjax"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
  else:
    shutil.copytree(os.path.join(REPO, "msjax"), os.path.join(dst, "msjax"),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return dst


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated of {LOSSES}")
  ap.add_argument("--sizes", default=",".join(map(str, PAIR_SIZES)),
                  help="batch sizes of the pair losses (K=5 images per class)")
  ap.add_argument("--proxy-sizes", default=",".join(map(str, PROXY_SIZES)),
                  help="batch sizes of the proxy losses")
  ap.add_argument("--num-proxies", type=int, default=NUM_PROXIES, help="C")
  ap.add_argument("--quick", action="store_true",
                  help="B = 1,000 only, at most 3 reps, the float64 check only; writes "
                       "nothing unless --out is given")
  ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
  ap.add_argument("--profile", default="auto",
                  help="'auto': profile msjax's pieces where pml is faster or msjax is above "
                       "1.5x its floor, and (not --quick) circle and supcon at the largest B "
                       "and proxy_anchor; 'none'; or comma-separated loss:B pairs")
  ap.add_argument("--rep-budget", type=float, default=60.0,
                  help="seconds of timed reps per measurement (the number of reps adapts; a "
                       "first call slower than this is the only one)")
  ap.add_argument("--max-reps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=2,
                  help="run each measurement in this many subprocesses, in separate passes "
                       "over the table (1 with --quick)")
  ap.add_argument("--timeout", type=float, default=420.0, help="seconds per measurement")
  ap.add_argument("--quiet-wait", type=float, default=20.0,
                  help="before each measurement, wait up to this many seconds for other "
                       "processes to leave the CPUs idle")
  ap.add_argument("--msjax-rev", default=None,
                  help="benchmark msjax as of this git revision instead of a copy of the "
                       "working tree")
  ap.add_argument("--out", default=None,
                  help="JSON results (default benchmarks/results/new_loss_speed.json; with "
                       "--quick none)")
  ap.add_argument("--worker", nargs=3, metavar=("LOSS", "IMPL", "B"), help=argparse.SUPPRESS)
  ap.add_argument("--check-worker", nargs=2, metavar=("DTYPE", "LOSSES"),
                  help=argparse.SUPPRESS)
  ap.add_argument("--profile-worker", nargs=2, metavar=("LOSS", "B"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:
    loss, impl, b = args.worker
    print("RESULT " + json.dumps(worker(loss, impl, int(b), args)), flush=True)
    return
  if args.check_worker:
    res = check_worker(args.check_worker[0], args.check_worker[1].split(","), args)
    print("RESULT " + json.dumps(res), flush=True)
    return
  if args.profile_worker:
    res = profile_worker(args.profile_worker[0], int(args.profile_worker[1]), args)
    print("RESULT " + json.dumps(res), flush=True)
    return

  losses = [l.strip() for l in args.losses.split(",") if l.strip()]
  for l in losses:
    if l not in LOSSES:
      ap.error(f"unknown loss {l!r}; choose from {LOSSES}")
  pair_sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
  proxy_sizes = [int(s) for s in args.proxy_sizes.split(",") if s.strip()]
  if args.quick:
    pair_sizes = [b for b in pair_sizes if b <= 1000] or [1000]
    args.max_reps = min(args.max_reps, 3)
    args.rep_budget = min(args.rep_budget, 10.0)
    args.quiet_wait = min(args.quiet_wait, 5.0)
    args.rounds = 1
  if args.out is None and not args.quick:
    args.out = os.path.join(HERE, "results", "new_loss_speed.json")

  global MSJAX_SRC
  t_start = time.monotonic()
  rev = None
  if args.msjax_rev:
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", args.msjax_rev],
                         capture_output=True, text=True, check=True).stdout.strip()
  MSJAX_SRC = snapshot_msjax(rev)
  loss_speed.MSJAX_SRC = MSJAX_SRC
  try:
    meta = loss_speed.environment()  # in a child, importing msjax from the snapshot
    head = machine.environment()
    meta["msjax_source"] = (f"git {rev} (git archive snapshot)" if rev else
                            f"a copy of the working tree at {head['git_head'][:12]} "
                            f"({head['msjax_tree']})")
    meta.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                num_proxies=args.num_proxies, msjax_hparams=MSJAX_HP, pml_hparams=PML_HP,
                data=dict(D=D, K=K, sigma=SIGMA, d_eff=D_EFF, seed=SEED, dtype="float32",
                          proxy_noise=PROXY_NOISE, proxy_norms=PROXY_NORMS),
                timing=dict(rep_budget_s=args.rep_budget, max_reps=args.max_reps,
                            timeout_s=args.timeout, quiet_wait_s=args.quiet_wait,
                            rounds=args.rounds,
                            torch_threads=THREADS,
                            rss="ru_maxrss of the measuring subprocess (os.wait4)"))
    work_digest = loss_speed.msjax_digest(REPO)
    if not rev and work_digest != meta["msjax_digest"]:
      print("# WARNING: the snapshot differs from the working tree already")
    print(f"# {meta['cpu']}, {meta['cpu_count']} cores, {meta.get('mem_total_gib')} GiB; "
          f"versions {meta['versions']}")
    print(f"# msjax: {meta['msjax_source']}; digest {meta['msjax_digest']}", flush=True)

    checks = []
    if not args.no_check:
      print(f"\n## agreement check at B={CHECK_B} (proxies: C={args.num_proxies}), msjax vs "
            "pml", flush=True)
      for dt in (("float64",) if args.quick else ("float64", "float32")):
        c = run_child(["--check-worker", dt, ",".join(losses), "--num-proxies",
                       str(args.num_proxies)], args.timeout, 0.0)
        c.setdefault("dtype", dt)
        if "losses" in c and c.get("status") is None:
          c["status"] = "ok"
        checks.append(c)
        print_check(c)
        sys.stdout.flush()

    print("\n## timing (each row is its own subprocess)", flush=True)
    runs = []
    lines = text_table([])
    print("\n".join(lines), flush=True)
    for rnd in range(args.rounds):
      for loss, impl, b in plan(losses, pair_sizes, proxy_sizes):
        r = run_child(["--worker", loss, impl, str(b), "--rep-budget", str(args.rep_budget),
                       "--max-reps", str(args.max_reps), "--num-proxies",
                       str(args.num_proxies)], args.timeout, args.quiet_wait)
        r.update(loss=loss, impl=impl, B=b, round=rnd,
                 C=args.num_proxies if loss in PROXY or loss == "proxy_floor" else None)
        runs.append(r)
        print(text_table(runs)[-1], flush=True)
    results = merge_rounds(runs)

    rows = ratio_rows(results)
    if args.profile == "none":
      prof_todo = []
    elif args.profile == "auto":
      prof_todo = [(r["loss"], r["B"]) for r in rows
                   if (r["pml_over_msjax"] is not None and r["pml_over_msjax"] < 1.0
                       and r["loss"] != "proxy_nca_orig")
                   or (r["msjax_over_jax_floor"] is not None
                       and r["msjax_over_jax_floor"] > 1.5)]
      if not args.quick:  # and, always, the largest batch of each family's losses
        for loss, sizes in (("circle", pair_sizes), ("supcon", pair_sizes),
                            ("proxy_anchor", proxy_sizes)):
          if loss in losses and sizes and (loss, max(sizes)) not in prof_todo:
            prof_todo.append((loss, max(sizes)))
    else:
      prof_todo = [(x.split(":")[0], int(x.split(":")[1])) for x in args.profile.split(",")]
    profiles = []
    if prof_todo:
      print("\n## where msjax spends its time (pieces jitted separately, median s)",
            flush=True)
    for loss, b in prof_todo:
      p = run_child(["--profile-worker", loss, str(b), "--num-proxies",
                     str(args.num_proxies)], args.timeout, args.quiet_wait)
      p.setdefault("loss", loss)
      p.setdefault("B", b)
      if "seconds" in p and p.get("status") is None:
        p["status"] = "ok"
      profiles.append(p)
      print_profile(p)

    end_digest = loss_speed.msjax_digest(MSJAX_SRC)
    if end_digest != meta["msjax_digest"]:  # cannot happen to a snapshot; kept as a guard
      meta["msjax_changed_during_run"] = end_digest
    meta["working_tree_digest_at_end"] = loss_speed.msjax_digest(REPO)
    if meta["working_tree_digest_at_end"] != meta["msjax_digest"] and not rev:
      print(f"# note: msjax/ in the working tree changed during the run (digest "
            f"{meta['msjax_digest']} -> {meta['working_tree_digest_at_end']}); the run used "
            f"the snapshot taken at the start")
    meta["total_wall_s"] = round(time.monotonic() - t_start, 1)
    summary = summary_lines(rows)
    print("\n## measurements (time_s: median seconds per value+grad call, compile excluded; "
          "dist: disturbed reps; peak_RSS: ru_maxrss of the measuring process; bg: most "
          "cores other processes used during a rep used)")
    print("\n".join(text_table(results)))
    print("\n## ratios (pml/msjax > 1: msjax faster; msjax/floor: msjax over the JAX floor)")
    print("\n".join(summary))
    print(f"\n# total {meta['total_wall_s']:.0f} s")
    md = markdown(meta, rows, checks, profiles)
    if args.out:
      payload = dict(meta=meta, check=checks, results=results, runs=runs,
                     ratios=[{k: (v if not isinstance(v, dict) else ok_s(v))
                              for k, v in r.items()} for r in rows],
                     profile=profiles, table=text_table(results), summary=summary)
      paths = machine.write_results("new_loss_speed", payload, md, out=args.out)
      print("# wrote {} and {}".format(*paths))
    else:
      print("\n" + md)
  finally:
    shutil.rmtree(MSJAX_SRC, ignore_errors=True)


if __name__ == "__main__":
  main()
