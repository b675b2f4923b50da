#!/usr/bin/env python
"""Speed and peak memory of the msjax Multi-Similarity loss, value + gradient, on CPU.

What is measured: one evaluation of the MS loss (α=2, β=40, λ=0.5, ε=0.1) and its
gradient with respect to the ``[B, 512]`` float32 embeddings, for several batch sizes
``B`` (K=5 images per class), side by side with peers:

* ``msjax_dense``         ``jax.jit(jax.value_and_grad(ms_loss_from_embeddings))``;
* ``msjax_blocked_<n>``   the same with ``block_size=n`` (O(n·B) memory, 3 matmuls);
* ``released_loop``       a per-anchor Python loop in PyTorch with the released MS
                          semantics, gradient by autograd (written here from the spec);
* ``pml``                 pytorch-metric-learning ``MultiSimilarityLoss`` fed by
                          ``MultiSimilarityMiner``, gradient by autograd;
* ``jax_floor`` / ``torch_floor``  the two ``B×B×D`` matmuls every exact method needs
                          (``S = E Eᵀ``, then ``W E``), jitted in JAX and eager in torch.

Every (implementation, B) pair runs in its own subprocess, so the peak RSS reported (from
``os.wait4``, i.e. the kernel's ru_maxrss of that one child) is per measurement, and a
peer that runs out of memory or time is recorded as such instead of ending the run.

Data are not pure noise: B/K class centres and per-image noise live in a random
``D_EFF``-dimensional subspace of R^512, ``emb = normalize(centre[label] + σ·noise)``
with ``σ = 0.9``, which gives positive cosine similarities of about 0.55 ± 0.11 and
negative ones of about 0.00 ± 0.18, so that mining keeps a few per cent of the
negatives, as in training. (With isotropic noise in all 512 dimensions the negatives
would be 0 ± 0.04 and mining would drop nearly every anchor.)

Before timing, the script checks at B=80 and B=1000 (float32 and float64) that the
released loop, pml and msjax give the same loss value, and that the released loop and
msjax give the same gradient.

The machine may be shared. Before each measurement the driver waits (``--quiet-wait``)
for other processes to leave the CPUs idle; each timed rep records how many cores other
processes used meanwhile (column ``bg``), disturbed reps are repeated and left out of the
median where possible. msjax may be edited while a long run is going: ``--msjax-rev REV``
benchmarks a ``git archive`` snapshot of ``msjax/`` at REV, and the run warns if the
msjax sources it imports changed between start and end.

Usage::

    python benchmarks/loss_speed.py                      # the full run (~20-35 min)
    python benchmarks/loss_speed.py --msjax-rev HEAD     # msjax as committed
    python benchmarks/loss_speed.py --quick              # B in {80, 1000}, few reps
    python benchmarks/loss_speed.py --sizes 1000,4000 --impls msjax_dense,jax_floor
    python benchmarks/loss_speed.py --worker msjax_dense 4000   # one measurement
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import timing  # benchmarks/timing.py, beside this script
from timing import busy_cpu_s, own_cpu_s

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Where msjax is imported from: this checkout, or a snapshot the driver extracted with
# --msjax-rev (passed to the measuring subprocesses in MSJAX_SRC).
MSJAX_SRC = os.environ.get("MSJAX_SRC", REPO)
if MSJAX_SRC not in sys.path:
  sys.path.insert(0, MSJAX_SRC)

# --- the data ------------------------------------------------------------------------------

D = 512  # embedding size
K = 5  # images per class
D_EFF = 32  # dimension of the random subspace the centres and the noise live in
SIGMA = 0.9  # noise scale: positive similarity ≈ 1 / (1 + σ²) ≈ 0.55
SEED = 0

# MS hyper-parameters, as released.
ALPHA, BETA, LAM, EPS = 2.0, 40.0, 0.5, 0.1

DENSE_MAX_B = 16000  # dense methods and peers are not run above this (B² floats = 1 GiB)
BLOCKED_MIN_B = 4000  # blocked msjax is run from this B up
THREADS = 2
MIN_REP_S = 0.3  # a timed rep lasts at least this long (fast calls are repeated inside)
BG_LIMIT = 0.25  # cores used by other processes above which a timed rep counts as disturbed

IMPLS = ("msjax_dense", "msjax_blocked_1024", "msjax_blocked_2048", "jax_floor",
         "torch_floor", "pml", "released_loop")
DEFAULT_SIZES = (80, 1000, 4000, 8000, 16000, 65536)
# Growth of the run time with B, used only to skip a measurement whose predicted time is
# far beyond the timeout. The released loop's backward is cubic: autograd turns every
# `S[i]` into a dense B×B zero gradient plus an add (SelectBackward), once per anchor.
COST_EXPONENT = {"released_loop": 3.0}


def make_data(batch: int, seed: int = SEED):
  """``(emb [B, D] float32 unit rows, labels [B] int32)``: classes of K images each.

  If K does not divide B (B=65536) the last class is smaller (there: one image, an
  anchor without positives, which contributes 0).
  """
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.standard_normal((D, D_EFF)))  # orthonormal columns
  n_classes = -(-batch // K)
  centres = rng.standard_normal((n_classes, D_EFF))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  # Shuffled so that classes are not contiguous blocks (a real sampler's order is not).
  labels = (np.arange(batch) // K)[rng.permutation(batch)]
  x = centres[labels] + SIGMA * rng.standard_normal((batch, D_EFF)) / math.sqrt(D_EFF)
  emb = (x @ basis.T).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return emb, labels.astype(np.int32)


# --- the torch peers -----------------------------------------------------------------------


def released_loop_loss(emb, labels, alpha=ALPHA, beta=BETA, lam=LAM, eps=EPS):
  """The released MS loss: a Python loop over anchors on ``S = E Eᵀ`` (PyTorch).

  Per anchor i: positives are same-label similarities below ``1 − 1e-5`` (the anchor
  itself is dropped by value), negatives are different-label ones; a negative is kept if
  ``S + ε > min(positives)``, a positive if ``S − ε < max(negatives)``; an anchor with an
  empty kept set is skipped; the sum is divided by the full batch size. ``min``/``max``
  are tensor reductions here (a Python builtin ``max`` over a tensor of B values would make
  the loop much slower still).
  """
  import torch

  batch = emb.shape[0]
  sim = emb @ emb.T
  per_anchor = []
  for i in range(batch):
    row = sim[i]
    same = labels == labels[i]
    pos_ = row[same]
    pos_ = pos_[pos_ < 1 - 1e-5]
    neg_ = row[~same]
    if pos_.numel() < 1 or neg_.numel() < 1:
      continue  # (the released code would fail on min/max of an empty set here)
    neg = neg_[neg_ + eps > torch.min(pos_)]
    pos = pos_[pos_ - eps < torch.max(neg_)]
    if neg.numel() < 1 or pos.numel() < 1:
      continue
    pos_loss = torch.log(1 + torch.sum(torch.exp(-alpha * (pos - lam)))) / alpha
    neg_loss = torch.log(1 + torch.sum(torch.exp(beta * (neg - lam)))) / beta
    per_anchor.append(pos_loss + neg_loss)
  if not per_anchor:
    return torch.sum(emb * 0)
  return sum(per_anchor) / batch


def make_pml():
  """``loss(emb, labels)`` with pytorch-metric-learning's MS loss fed by its MS miner."""
  from pytorch_metric_learning import losses, miners

  loss_fn = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=LAM)
  miner = miners.MultiSimilarityMiner(epsilon=EPS)

  def loss(emb, labels):
    return loss_fn(emb, labels, miner(emb, labels))

  return loss


def torch_value_and_grad(fn, emb_np, labels_np, dtype=None):
  import torch

  emb = torch.tensor(emb_np, dtype=dtype, requires_grad=True)
  labels = torch.tensor(labels_np, dtype=torch.long)
  value = fn(emb, labels)
  value.backward()
  return float(value.detach()), emb.grad.detach().numpy().copy()


# --- the JAX side --------------------------------------------------------------------------


def msjax_fn(impl: str):
  """The jitted ``(emb, labels) -> (loss, d loss / d emb)`` of an msjax impl, or the floor."""
  import jax
  import jax.numpy as jnp

  from msjax.losses import ms_loss_from_embeddings

  hp = dict(alpha=ALPHA, beta=BETA, lam=LAM, epsilon=EPS)
  if impl == "msjax_dense":
    return jax.jit(jax.value_and_grad(lambda e, l: ms_loss_from_embeddings(e, l, **hp)))
  if impl.startswith("msjax_blocked_"):
    block = int(impl.rsplit("_", 1)[1])
    return jax.jit(jax.value_and_grad(
        lambda e, l: ms_loss_from_embeddings(e, l, block_size=block, **hp)))
  if impl == "jax_floor":
    hi = jax.lax.Precision.HIGHEST  # as msjax's default (float32 on CPU either way)

    def floor(e, l):
      del l
      sim = jnp.matmul(e, e.T, precision=hi)  # B×B×D
      return jnp.matmul(sim, e, precision=hi)  # B×B×D

    return jax.jit(floor)
  raise ValueError(impl)


# --- one measurement (runs in a subprocess) ------------------------------------------------


def rss_mib_self() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_calls(call, *, budget_s, max_reps, warmup, reuse_slow_first_s):
  """Median-of-reps timing: ``(times, bg_cores, first_s, note)``.

  ``call()`` must block until its results are ready. The first call is a warm-up; if it
  took longer than ``reuse_slow_first_s`` (torch peers that need minutes), it is the
  only measurement. Otherwise as many reps as fit ``budget_s`` (1 to ``max_reps``); a
  rep of a call faster than ``MIN_REP_S`` is the mean over enough calls to last that long.

  The machine may be shared: for every rep the CPU time other processes used meanwhile
  is recorded (``bg_cores``: their average number of busy cores). A rep during which
  others used more than ``BG_LIMIT`` cores is repeated while the time budget allows
  (up to twice the planned number); the caller reports the median of the clean reps.
  """
  inner = 1

  def timed():
    b0, o0, t0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    for _ in range(inner):
      call()
    t = time.perf_counter() - t0
    bg = max(0.0, (busy_cpu_s() - b0) - (own_cpu_s() - o0)) / max(t, 1e-9)
    return t / inner, bg

  if not warmup:
    t, bg = timed()
    return [t], [bg], None, "single run, no warm-up"
  first, first_bg = timed()
  if first > reuse_slow_first_s:
    return [first], [first_bg], first, "single run (the first call; too slow to repeat)"
  reps = int(max(1, min(max_reps, budget_s // max(first, 1e-9))))
  # A rep of a fast call is the mean of `inner` calls, >= MIN_REP_S in all, so that the
  # CPU accounting (10 ms ticks) and the timer see a meaningful interval.
  inner = max(1, math.ceil(MIN_REP_S / max(first, 1e-6)))
  times, bgs = [], []
  t_end = time.perf_counter() + 2 * budget_s
  while True:
    t, bg = timed()
    times.append(t)
    bgs.append(bg)
    if sum(b <= BG_LIMIT for b in bgs) >= reps or len(times) >= 2 * reps:
      break
    if len(times) >= reps and time.perf_counter() + t > t_end:
      break
  return times, bgs, first, ""


def summarize(times, bgs):
  """``(median, min, reps used, reps disturbed, max bg load of the reps used)``: the
  median is over the reps run while the machine was otherwise quiet, else over all."""
  clean = [(t, b) for t, b in zip(times, bgs) if b <= BG_LIMIT]
  use = clean or list(zip(times, bgs))
  return (float(np.median([t for t, _ in use])), float(np.min(times)), len(use),
          len(times) - len(clean), max(b for _, b in use))


def worker(impl: str, batch: int, args) -> dict:
  out = dict(impl=impl, B=batch)
  emb_np, labels_np = make_data(batch)
  warmup = batch <= DENSE_MAX_B
  max_reps = args.max_reps if batch <= DENSE_MAX_B else 1
  if impl in ("released_loop", "pml", "torch_floor"):
    import torch

    torch.set_num_threads(THREADS)
    emb = torch.tensor(emb_np)
    labels = torch.tensor(labels_np, dtype=torch.long)
    if impl == "torch_floor":
      def call():
        with torch.no_grad():
          return (emb @ emb.T) @ emb
      loss_value = None
    else:
      fn = released_loop_loss if impl == "released_loop" else make_pml()
      box = {}

      def call():
        e = emb.clone().requires_grad_(True)
        value = fn(e, labels)
        value.backward()
        box["v"] = float(value.detach())
        return e.grad

    out["rss_before_mib"] = current_rss_mib()
    times, bgs, first, note = time_calls(call, budget_s=args.rep_budget, max_reps=max_reps,
                                         warmup=warmup, reuse_slow_first_s=args.rep_budget / 2)
    if impl != "torch_floor":
      loss_value = box["v"]
    out["compile_s"] = None
  else:
    import jax
    import jax.numpy as jnp

    emb = jnp.asarray(emb_np)
    labels = jnp.asarray(labels_np)
    fn = msjax_fn(impl)
    out["rss_before_mib"] = current_rss_mib()
    t0 = time.perf_counter()
    compiled = fn.lower(emb, labels).compile()  # compile time is kept out of the timing
    out["compile_s"] = time.perf_counter() - t0
    box = {}

    def call():
      box["r"] = jax.block_until_ready(compiled(emb, labels))

    times, bgs, first, note = time_calls(call, budget_s=args.rep_budget, max_reps=max_reps,
                                         warmup=warmup, reuse_slow_first_s=float("inf"))
    loss_value = float(box["r"][0]) if impl != "jax_floor" else None
  median, best, used, disturbed, bg_max = summarize(times, bgs)
  out.update(status="ok", times_s=times, bg_cores=bgs, median_s=median, min_s=best, reps=used,
             disturbed_reps=disturbed, bg_cores_max=bg_max, first_call_s=first, note=note,
             loss=loss_value, peak_rss_self_mib=rss_mib_self())
  return out


def child_env() -> dict:
  env = dict(os.environ)
  env["MSJAX_SRC"] = MSJAX_SRC
  env["PYTHONPATH"] = MSJAX_SRC + os.pathsep + env.get("PYTHONPATH", "")
  return env


def msjax_digest(root: str) -> str:
  """sha256 (12 hex digits) of msjax's .py files under ``root``, to detect edits mid-run."""
  import hashlib

  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(os.path.join(root, "msjax"))):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()[:12]


def run_worker(impl: str, batch: int, args, timeout_s: float) -> dict:
  """Runs one measurement in a subprocess; peak RSS of that child from ``os.wait4``."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(batch),
         "--rep-budget", str(args.rep_budget), "--max-reps", str(args.max_reps)]
  r = timing.run_measurement(cmd, env=child_env(), cwd=REPO, timeout_s=timeout_s,
                             quiet_wait_s=args.quiet_wait, bg_limit=BG_LIMIT,
                             sample_rss=True)
  return dict(r, impl=impl, B=batch)


# --- where msjax dense spends its time (runs in a subprocess) ------------------------------


def profile_worker(batch: int, reps: int = 5) -> dict:
  """Times the pieces of the dense value + gradient separately, each jitted on its own.

  The dense path is ``S = E Eᵀ``; the loss and the weights ``W = ∂L/∂S`` from ``S``
  (elementwise passes and row reductions over B×B); ``(W + Wᵀ) E``. The floor is the two
  matmuls alone. The ``W + Wᵀ`` rows time the ways of forming that product from a
  materialised ``W`` (for reference: msjax may form ``W + Wᵀ`` without a transpose,
  see the HLO summary); the last row is the whole dense value and gradient.
  """
  import jax
  import jax.numpy as jnp

  from msjax.losses import ms_loss, ms_loss_from_embeddings, ms_weights

  hi = jax.lax.Precision.HIGHEST
  hp = dict(alpha=ALPHA, beta=BETA, lam=LAM, epsilon=EPS)
  emb_np, labels_np = make_data(batch)
  emb, labels = jnp.asarray(emb_np), jnp.asarray(labels_np)
  sim = jax.jit(lambda e: jnp.matmul(e, e.T, precision=hi))(emb)
  weights = jax.jit(lambda s, l: ms_weights(s, l, **hp))(sim, labels)

  def tm(f, *xs):
    compiled = jax.jit(f).lower(*xs).compile()
    return timing.median_seconds(compiled, *xs, calls=reps)

  pieces = {
      "S = E E^T (matmul 1)": tm(lambda e: jnp.matmul(e, e.T, precision=hi), emb),
      "W E (matmul 2)": tm(lambda w, e: jnp.matmul(w, e, precision=hi), weights, emb),
      "floor: (E E^T) E": tm(lambda e: jnp.matmul(jnp.matmul(e, e.T, precision=hi), e,
                                                  precision=hi), emb),
      "loss from S (ms_loss)": tm(lambda s, l: ms_loss(s, l, **hp), sim, labels),
      "weights from S (ms_weights)": tm(lambda s, l: ms_weights(s, l, **hp), sim, labels),
      "loss + weights from S, one jit": tm(
          lambda s, l: (ms_loss(s, l, **hp), ms_weights(s, l, **hp)), sim, labels),
      "W + W^T (given W)": tm(lambda w: w + w.T, weights),
      "W^T alone (a transposed copy)": tm(lambda w: w.T, weights),
      "(W + W^T) E (given W)": tm(lambda w, e: jnp.matmul(w + w.T, e, precision=hi),
                                 weights, emb),
      "W E + W^T E, two matmuls (given W)": tm(
          lambda w, e: jnp.matmul(w, e, precision=hi) + jnp.matmul(w.T, e, precision=hi),
          weights, emb),
      "exp over B x B (one elementwise pass)": tm(jnp.exp, sim),
      "msjax dense value_and_grad": tm(
          jax.value_and_grad(lambda e, l: ms_loss_from_embeddings(e, l, **hp)), emb, labels),
  }
  hlo = jax.jit(jax.value_and_grad(lambda e, l: ms_loss_from_embeddings(e, l, **hp))).lower(
      emb, labels).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  big = f"[{batch},{batch}]"
  n_big = sum(1 for line in entry.splitlines() if " fusion(" in line and big in line.split("=")[1][:40])
  transposed = "transpose(" in hlo and "copy(" in hlo
  return dict(B=batch, reps=reps, seconds=pieces, bxb_fusions_in_dense_hlo=n_big,
              dense_hlo_has_fused_transpose=transposed)


def run_profile(batch, timeout_s):
  cmd = [sys.executable, os.path.abspath(__file__), "--profile-worker", str(batch)]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO,
                         timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(B=batch, status="timeout")
  lines = [l[len("RESULT "):] for l in res.stdout.splitlines() if l.startswith("RESULT ")]
  if res.returncode or not lines:
    return dict(B=batch, status="error", note=res.stderr[-800:])
  return dict(json.loads(lines[-1]), status="ok")


def print_profile(p):
  if p.get("status") != "ok":
    print(f"  B={p['B']}: {p.get('status')} {p.get('note', '')}")
    return
  sec = p["seconds"]
  floor = sec["floor: (E E^T) E"]
  for name, t in sec.items():
    print(f"  B={p['B']:<6d} {name:<40s} {t:8.4f} s  {t / floor:5.2f}x floor")
  print(f"  dense HLO: {p['bxb_fusions_in_dense_hlo']} fusions with a B x B output; "
        f"transpose fused into the last elementwise pass: {p['dense_hlo_has_fused_transpose']}")


# --- the agreement check (runs in a subprocess: it needs float64 JAX) ----------------------


def check_worker(batch: int, dtype_name: str) -> dict:
  """Loss values of the released loop, pml and msjax, and their gradients, on one batch."""
  import jax

  if dtype_name == "float64":
    jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import torch

  from msjax.losses import ms_loss_from_embeddings, ms_mining

  torch.set_num_threads(THREADS)
  tdt = torch.float64 if dtype_name == "float64" else torch.float32
  ndt = np.float64 if dtype_name == "float64" else np.float32
  emb_np, labels_np = make_data(batch)
  emb_np = emb_np.astype(np.float64)
  emb_np /= np.linalg.norm(emb_np, axis=1, keepdims=True)  # renormalise in float64
  emb_np = emb_np.astype(ndt)

  hp = dict(alpha=ALPHA, beta=BETA, lam=LAM, epsilon=EPS)
  vg = jax.jit(jax.value_and_grad(lambda e, l: ms_loss_from_embeddings(e, l, **hp)))
  ms_v, ms_g = vg(jnp.asarray(emb_np), jnp.asarray(labels_np))
  ms_v, ms_g = float(ms_v), np.asarray(ms_g)
  block = max(8, batch // 4 - 3)  # a partial last block on purpose
  vg_b = jax.jit(jax.value_and_grad(
      lambda e, l: ms_loss_from_embeddings(e, l, block_size=block, **hp)))
  msb_v, msb_g = vg_b(jnp.asarray(emb_np), jnp.asarray(labels_np))
  msb_v, msb_g = float(msb_v), np.asarray(msb_g)

  rel_v, rel_g = torch_value_and_grad(released_loop_loss, emb_np, labels_np, tdt)
  pml_v, pml_g = torch_value_and_grad(make_pml(), emb_np, labels_np, tdt)

  def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

  # pml's cosine distance re-normalises the embeddings, so its gradient is msjax's
  # projected onto the tangent space of the unit sphere: g − (g·e) e.
  e64 = emb_np.astype(np.float64)
  g64 = ms_g.astype(np.float64)
  ms_g_tangent = g64 - np.sum(g64 * e64, axis=1, keepdims=True) * e64

  # Where could pml differ from the released semantics? (a) it drops the self pair by
  # index, not by value (S >= 1 − 1e-5), so an exact duplicate of the anchor would count
  # as a positive in pml only; (b) it sums the positive and the negative terms of an
  # anchor separately, so an anchor whose mined positives are empty but whose mined
  # negatives are not keeps its negative term in pml (the released code skips the
  # anchor). In exact arithmetic (b) cannot happen: a mined negative n (S_n > min P − ε)
  # makes the hardest positive p satisfy S_p − ε < S_n <= max N, so p is mined too; in
  # floating point the two comparisons are rounded separately and may disagree by one
  # ulp at a boundary. Count both cases on this batch.
  sim = jnp.asarray(emb_np) @ jnp.asarray(emb_np).T
  pos, neg, active = ms_mining(sim, jnp.asarray(labels_np), epsilon=EPS)
  pos, neg, active = np.asarray(pos), np.asarray(neg), np.asarray(active)
  same = labels_np[:, None] == labels_np[None, :]
  np.fill_diagonal(same, False)
  duplicates = int(np.sum(same & (np.asarray(sim) >= 1 - 1e-5)))
  neg_only = int(np.sum(~pos.any(1) & neg.any(1)))
  s = np.asarray(sim)
  cand_neg = ~(labels_np[:, None] == labels_np[None, :])
  return dict(
      B=batch, dtype=dtype_name,
      loss_released_loop=rel_v, loss_pml=pml_v, loss_msjax=ms_v, loss_msjax_blocked=msb_v,
      block_size=block,
      relerr_loss_msjax_vs_released=abs(ms_v - rel_v) / abs(rel_v),
      relerr_loss_pml_vs_released=abs(pml_v - rel_v) / abs(rel_v),
      relerr_loss_blocked_vs_dense=abs(msb_v - ms_v) / abs(ms_v),
      relerr_grad_msjax_vs_released=rel_err(ms_g, rel_g),
      maxabs_grad_msjax_vs_released=float(np.max(np.abs(ms_g - rel_g))),
      relerr_grad_blocked_vs_dense=rel_err(msb_g, ms_g),
      relerr_grad_pml_vs_msjax_tangent=rel_err(pml_g.astype(np.float64), ms_g_tangent),
      active_anchors=int(active.sum()),
      anchors_with_neg_only=neg_only,
      duplicate_self_pairs=duplicates,
      pos_sim_mean=float(s[same].mean()), neg_sim_mean=float(s[cand_neg].mean()),
      neg_sim_std=float(s[cand_neg].std()),
      mined_neg_fraction=float(neg.sum() / cand_neg.sum()),
      mined_pos_fraction=float(pos.sum() / same.sum()),
  )


def run_check(batch, dtype_name, timeout_s):
  cmd = [sys.executable, os.path.abspath(__file__), "--check-worker", str(batch), dtype_name]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO,
                         timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(B=batch, dtype=dtype_name, status="timeout")
  lines = [l[len("RESULT "):] for l in res.stdout.splitlines() if l.startswith("RESULT ")]
  if res.returncode or not lines:
    return dict(B=batch, dtype=dtype_name, status="error", note=res.stderr[-800:])
  return dict(json.loads(lines[-1]), status="ok")


def print_check(c):
  if c.get("status") != "ok":
    print(f"  B={c['B']} {c['dtype']}: {c.get('status')} {c.get('note', '')}")
    return
  tol = 1e-5 if c["dtype"] == "float32" else 1e-10
  ok = lambda x: "OK " if x <= tol else "BAD"
  print(f"  B={c['B']:<5d} {c['dtype']}: loss released_loop={c['loss_released_loop']:.9g} "
        f"pml={c['loss_pml']:.9g} msjax={c['loss_msjax']:.9g} "
        f"msjax(block={c['block_size']})={c['loss_msjax_blocked']:.9g}")
  print(f"      rel. diff of the loss: msjax vs released {c['relerr_loss_msjax_vs_released']:.2e} "
        f"[{ok(c['relerr_loss_msjax_vs_released'])}], pml vs released "
        f"{c['relerr_loss_pml_vs_released']:.2e} [{ok(c['relerr_loss_pml_vs_released'])}], "
        f"blocked vs dense {c['relerr_loss_blocked_vs_dense']:.2e}")
  print(f"      rel. diff of the gradient (2-norm): msjax vs released "
        f"{c['relerr_grad_msjax_vs_released']:.2e} [{ok(c['relerr_grad_msjax_vs_released'])}] "
        f"(max abs {c['maxabs_grad_msjax_vs_released']:.1e}), blocked vs dense "
        f"{c['relerr_grad_blocked_vs_dense']:.2e}, pml vs msjax projected on the sphere "
        f"{c['relerr_grad_pml_vs_msjax_tangent']:.2e}")
  print(f"      batch: {c['active_anchors']}/{c['B']} anchors contribute; mined "
        f"{100 * c['mined_pos_fraction']:.1f}% of positives, "
        f"{100 * c['mined_neg_fraction']:.2f}% of negatives; pos sim {c['pos_sim_mean']:.3f}, "
        f"neg sim {c['neg_sim_mean']:.3f} ± {c['neg_sim_std']:.3f}; anchors where pml would "
        f"keep a lone negative term: {c['anchors_with_neg_only']}; duplicate self pairs: "
        f"{c['duplicate_self_pairs']}")


# --- the driver ----------------------------------------------------------------------------


def environment() -> dict:
  info = dict(python=platform.python_version(), platform=platform.platform(),
              cpu_count=os.cpu_count(), threads=THREADS)
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu"] = platform.processor()
  try:
    import psutil
    info["mem_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
  except ImportError:
    pass
  code = ("import jax, jaxlib, numpy, torch, pytorch_metric_learning as p, msjax;"
          "print(jax.__version__, jaxlib.__version__, numpy.__version__, torch.__version__,"
          " p.__version__, msjax.__version__, jax.devices()[0].device_kind,"
          " jax.default_backend())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env())
  keys = ("jax", "jaxlib", "numpy", "torch", "pytorch_metric_learning", "msjax",
          "jax_device", "jax_backend")
  info["versions"] = dict(zip(keys, out.stdout.split()))
  def git(*a):
    return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()

  try:
    info["git_head"] = git("rev-parse", "HEAD")
    if MSJAX_SRC == REPO:
      dirty = git("status", "--porcelain", "msjax")
      info["msjax_source"] = "working tree at " + info["git_head"][:12] + (
          " with uncommitted changes in msjax/" if dirty else "")
  except OSError:
    pass
  info["msjax_digest"] = msjax_digest(MSJAX_SRC)
  return info


def wanted(impl: str, batch: int) -> bool:
  if impl.startswith("msjax_blocked_"):
    return batch >= BLOCKED_MIN_B
  return batch <= DENSE_MAX_B


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def table(results) -> list[str]:
  by = {(r["B"], r["impl"]): r for r in results}
  head = (f"{'B':>6} {'impl':<20} {'time_s':>9} {'reps':>4} {'x_dense':>8} {'x_jaxfloor':>10} "
          f"{'peak_RSS_MiB':>12} {'compile_s':>9} {'bg':>4}  status")
  lines = [head, "-" * len(head)]
  last_b = None
  for r in results:
    if last_b is not None and r["B"] != last_b:
      lines.append("")
    last_b = r["B"]
    ok = r["status"] == "ok"
    t = r.get("median_s") if ok else None
    dense = by.get((r["B"], "msjax_dense"), {})
    floor = by.get((r["B"], "jax_floor"), {})
    x_dense = t / dense["median_s"] if ok and dense.get("status") == "ok" else None
    x_floor = t / floor["median_s"] if ok and floor.get("status") == "ok" else None
    status = r["status"] if ok and not r.get("note") else f"{r['status']}: {r.get('note', '')}"
    rss = r.get("peak_rss_mib") if r["status"] != "skipped" else None
    lines.append(f"{r['B']:>6} {r['impl']:<20} {fmt(t, '9.3g')} {fmt(r.get('reps'), '4d')} "
                 f"{fmt(x_dense, '8.2f')} {fmt(x_floor, '10.2f')} {fmt(rss, '12.0f')} "
                 f"{fmt(r.get('compile_s'), '9.2f')} {fmt(r.get('bg_cores_max'), '4.1f')}  {status}")
  return lines


def targets(results) -> dict:
  by = {(r["B"], r["impl"]): r for r in results if r["status"] == "ok"}
  out = {}
  for b in (1000, 8000):
    d, p = by.get((b, "msjax_dense")), by.get((b, "pml"))
    if d and p:
      sp = p["median_s"] / d["median_s"]
      out[f"msjax_dense >= 10x faster than pml at B={b}"] = dict(value=round(sp, 2), met=sp >= 10)
  for (b, impl), r in sorted(by.items()):
    if impl == "msjax_dense" and b >= 4000 and (b, "jax_floor") in by:
      ratio = r["median_s"] / by[(b, "jax_floor")]["median_s"]
      out[f"msjax_dense within 1.5x of the JAX matmul floor at B={b}"] = dict(
          value=round(ratio, 2), met=ratio <= 1.5)
  huge = [r for r in results if r["B"] > DENSE_MAX_B and r["impl"].startswith("msjax_blocked")]
  for r in huge:
    rss = r.get("peak_rss_mib")
    out[f"{r['impl']} at B={r['B']}: peak RSS < 8 GiB"] = dict(
        value=None if rss is None else round(rss / 1024, 2), unit="GiB",
        met=r["status"] == "ok" and rss is not None and rss < 8192)
  return out


def markdown(meta, results, checks, tgts, profiles=()) -> str:
  by = {(r["B"], r["impl"]): r for r in results}
  impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
  sizes = sorted({r["B"] for r in results})
  v = meta["versions"]
  lines = [
      "# MS loss speed: value + gradient w.r.t. the embeddings, CPU",
      "",
      f"{meta['cpu']}, {meta['cpu_count']} cores ({THREADS} threads for torch), "
      f"{meta.get('mem_total_gib', '?')} GiB RAM; jax {v.get('jax')}, torch {v.get('torch')}, "
      f"pytorch-metric-learning {v.get('pytorch_metric_learning')}; {meta['date']}; msjax: "
      f"{meta.get('msjax_source')}.",
      f"D={D}, K={K} images per class, float32, α=2, β=40, λ=0.5, ε=0.1; "
      f"emb = normalize(centre[label] + σ·noise), σ={SIGMA}, centres and noise in a random "
      f"{D_EFF}-d subspace. Median seconds per call (compile excluded); in brackets the "
      "peak RSS of the measuring process. Generated by `benchmarks/loss_speed.py`.",
      "",
      "| impl | " + " | ".join(f"B={b}" for b in sizes) + " |",
      "|---|" + "---|" * len(sizes),
  ]
  for impl in impls:
    cells = []
    for b in sizes:
      r = by.get((b, impl))
      if r is None:
        cells.append("")
      elif r["status"] == "ok":
        cells.append(f"{r['median_s']:.3g} s ({r['peak_rss_mib'] / 1024:.2f} GiB)")
      elif r["status"] == "skipped":
        cells.append("skipped")
      else:
        cells.append(r["status"] + (f" ({r['peak_rss_mib'] / 1024:.1f} GiB)"
                                    if r["status"] == "oom" else ""))
    lines.append(f"| `{impl}` | " + " | ".join(cells) + " |")
  lines += ["", "| target | value | met |", "|---|---|---|"]
  for name, t in tgts.items():
    val = t["value"]
    unit = t.get("unit", "x")
    lines.append(f"| {name} | {'-' if val is None else f'{val}{unit}'} | "
                 f"{'yes' if t['met'] else 'no'} |")
  ok_checks = [c for c in checks if c.get("status") == "ok"]
  if ok_checks:
    lines += ["", "Agreement (relative difference to the released loop):", "",
              "| B | dtype | loss msjax | loss pml | grad msjax |", "|---|---|---|---|---|"]
    for c in ok_checks:
      lines.append(f"| {c['B']} | {c['dtype']} | {c['relerr_loss_msjax_vs_released']:.1e} | "
                   f"{c['relerr_loss_pml_vs_released']:.1e} | "
                   f"{c['relerr_grad_msjax_vs_released']:.1e} |")
  for p in profiles:
    if p.get("status") != "ok":
      continue
    floor = p["seconds"]["floor: (E E^T) E"]
    lines += ["", f"Where msjax dense spends its time at B={p['B']} (each piece jitted alone):",
              "", "| piece | seconds | / floor |", "|---|---|---|"]
    for name, t in p["seconds"].items():
      lines.append(f"| {name} | {t:.3f} | {t / floor:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                  help=f"comma-separated batch sizes (K={K} images per class, the last class "
                       f"smaller if K does not divide B); dense methods and peers stop at "
                       f"{DENSE_MAX_B}, blocked msjax starts at {BLOCKED_MIN_B}")
  ap.add_argument("--impls", default=",".join(IMPLS),
                  help="comma-separated; msjax_blocked_<n> for any block size n")
  ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
  ap.add_argument("--huge-timeout", type=float, default=1800.0,
                  help=f"seconds per measurement above B={DENSE_MAX_B} (blocked msjax only)")
  ap.add_argument("--huge-block", default="auto",
                  help=f"block size(s) to run above B={DENSE_MAX_B}: 'auto' runs only the "
                       "blocked variant fastest at the largest B both were run at, 'all' "
                       "runs every requested one, or a comma-separated list")
  ap.add_argument("--msjax-rev", default=None,
                  help="benchmark msjax as of this git revision (extracted with `git "
                       "archive` into a temporary directory) instead of the working tree")
  ap.add_argument("--out", default=None,
                  help="JSON results (default benchmarks/results/loss_speed.json, or "
                       "loss_speed_quick.json with --quick)")
  ap.add_argument("--md", default=None, help="markdown summary (default: --out with .md)")
  ap.add_argument("--quick", action="store_true", help="B in {80, 1000}, at most 3 reps")
  ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
  ap.add_argument("--rep-budget", type=float, default=60.0,
                  help="seconds of timed reps per measurement (the number of reps adapts)")
  ap.add_argument("--max-reps", type=int, default=5)
  ap.add_argument("--quiet-wait", type=float, default=20.0,
                  help="before each measurement, wait up to this many seconds for other "
                       "processes to leave the CPUs idle")
  ap.add_argument("--worker", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
  ap.add_argument("--check-worker", nargs=2, metavar=("B", "DTYPE"), help=argparse.SUPPRESS)
  ap.add_argument("--profile-worker", type=int, metavar="B", help=argparse.SUPPRESS)
  ap.add_argument("--profile-sizes", default="4000",
                  help="B values at which to time the pieces of msjax dense ('' for none)")
  args = ap.parse_args(argv)

  if args.worker:
    res = worker(args.worker[0], int(args.worker[1]), args)
    print("RESULT " + json.dumps(res), flush=True)
    return
  if args.profile_worker:
    print("RESULT " + json.dumps(profile_worker(args.profile_worker)), flush=True)
    return
  if args.check_worker:
    res = check_worker(int(args.check_worker[0]), args.check_worker[1])
    print("RESULT " + json.dumps(res), flush=True)
    return

  if args.out is None:
    args.out = os.path.join(HERE, "results",
                            "loss_speed_quick.json" if args.quick else "loss_speed.json")
  global MSJAX_SRC
  msjax_rev = None
  if args.msjax_rev:
    msjax_rev = subprocess.run(["git", "-C", REPO, "rev-parse", args.msjax_rev],
                               capture_output=True, text=True, check=True).stdout.strip()
    MSJAX_SRC = tempfile.mkdtemp(prefix="msjax_src_")
    archive = subprocess.run(["git", "-C", REPO, "archive", msjax_rev, "msjax"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", MSJAX_SRC], input=archive, check=True)
  if args.quick:
    args.sizes = "80,1000"
    args.max_reps = min(args.max_reps, 3)
    args.rep_budget = min(args.rep_budget, 20.0)
    args.profile_sizes = "1000" if args.profile_sizes else ""
  sizes = sorted(int(s) for s in args.sizes.split(","))
  impls = [i.strip() for i in args.impls.split(",") if i.strip()]
  for i in impls:
    if i not in IMPLS and not (i.startswith("msjax_blocked_") and i.rsplit("_", 1)[1].isdigit()):
      ap.error(f"unknown impl {i!r}; choose from {IMPLS} or msjax_blocked_<n>")
  t_start = time.monotonic()
  meta = environment()
  if msjax_rev:
    meta["msjax_source"] = f"git {msjax_rev} (git archive snapshot)"
  meta.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              command=" ".join([os.path.basename(sys.executable)] + sys.argv),
              data=dict(D=D, K=K, sigma=SIGMA, d_eff=D_EFF, seed=SEED, dtype="float32",
                        recipe="normalize(centre[label] + sigma * noise); centres unit, "
                               "noise N(0, I/d_eff), both in a random d_eff-dim subspace "
                               "of R^D"),
              hparams=dict(alpha=ALPHA, beta=BETA, lam=LAM, epsilon=EPS),
              timing=dict(rep_budget_s=args.rep_budget, max_reps=args.max_reps,
                          timeout_s=args.timeout, huge_timeout_s=args.huge_timeout,
                          rss="ru_maxrss of the measuring subprocess (os.wait4)"))
  print(f"# {meta['cpu']}, {meta['cpu_count']} cores, {meta.get('mem_total_gib')} GiB; "
        f"versions {meta['versions']}")
  print(f"# msjax: {meta.get('msjax_source')}; digest {meta['msjax_digest']}")
  print(f"# data: D={D}, K={K}, sigma={SIGMA}, d_eff={D_EFF}, seed={SEED}; "
        f"MS alpha={ALPHA} beta={BETA} lambda={LAM} eps={EPS}", flush=True)

  checks = []
  if not args.no_check:
    print("\n## agreement check (released loop vs pml vs msjax)", flush=True)
    for b in (80, 1000):
      for dt in ("float32", "float64"):
        c = run_check(b, dt, args.timeout)
        checks.append(c)
        print_check(c)
        sys.stdout.flush()

  print("\n## timing (each row is its own subprocess)", flush=True)
  results = []
  failed_at = {}  # impl -> B where it timed out / ran out of memory
  last_ok = {}  # impl -> (B, seconds of that measurement's first call)
  blocked_impls = [i for i in impls if i.startswith("msjax_blocked_")]
  for b in sizes:
    todo = [i for i in impls if wanted(i, b)]
    if b > DENSE_MAX_B and args.huge_block != "all":
      if args.huge_block == "auto":
        ran = [(r["B"], r["impl"], r["median_s"]) for r in results
               if r["impl"] in blocked_impls and r["status"] == "ok"]
        if ran:
          top = max(x[0] for x in ran)
          best = min((x for x in ran if x[0] == top), key=lambda x: x[2])[1]
          todo = [i for i in todo if not i.startswith("msjax_blocked_") or i == best]
      else:
        keep = {f"msjax_blocked_{n.strip()}" for n in args.huge_block.split(",")}
        todo = [i for i in todo if not i.startswith("msjax_blocked_") or i in keep]
    timeout = args.timeout if b <= DENSE_MAX_B else args.huge_timeout
    for impl in todo:
      if impl in failed_at:
        r = dict(impl=impl, B=b, status="skipped",
                 note=f"{failed_at[impl][1]} at B={failed_at[impl][0]}")
      elif impl in last_ok and impl in COST_EXPONENT and (
          last_ok[impl][1] * (b / last_ok[impl][0]) ** COST_EXPONENT[impl] > timeout):
        pred = last_ok[impl][1] * (b / last_ok[impl][0]) ** COST_EXPONENT[impl]
        r = dict(impl=impl, B=b, status="skipped",
                 note=f"predicted ~{pred:.0f} s (B^{COST_EXPONENT[impl]:g} from "
                      f"B={last_ok[impl][0]}) > timeout")
      else:
        r = run_worker(impl, b, args, timeout)
      if r["status"] in ("timeout", "oom"):
        failed_at[impl] = (b, r["status"])
      elif r["status"] == "ok":
        last_ok[impl] = (b, r.get("first_call_s") or r["median_s"])
      results.append(r)
      print(table(results)[-1], flush=True)

  profiles = []
  prof_sizes = [int(x) for x in args.profile_sizes.split(",") if x.strip()]
  if prof_sizes:
    print("\n## where msjax dense spends its time (pieces jitted separately, median s)",
          flush=True)
  for b in prof_sizes:
    timing.wait_quiet(args.quiet_wait, BG_LIMIT)
    p = run_profile(b, args.timeout)
    profiles.append(p)
    print_profile(p)

  tgts = targets(results)
  end_digest = msjax_digest(MSJAX_SRC)
  if end_digest != meta["msjax_digest"]:
    meta["msjax_changed_during_run"] = end_digest
    print(f"# WARNING: msjax changed during the run (digest {meta['msjax_digest']} -> "
          f"{end_digest}); the msjax rows may mix versions. Use --msjax-rev.")
  meta["total_wall_s"] = round(time.monotonic() - t_start, 1)
  lines = table(results)
  print("\n## results (time_s: median seconds per value+grad call, compile excluded; "
        "x_dense: time / msjax_dense; x_jaxfloor: time / jax_floor; peak_RSS: ru_maxrss of "
        "the measuring process; bg: most cores other processes used during a timed rep)")
  print("\n".join(lines))
  print("\n## targets")
  for name, t in tgts.items():
    print(f"  {'MET    ' if t['met'] else 'NOT MET'} {name}: {t['value']}{t.get('unit', 'x')}")
  print(f"\n# total {meta['total_wall_s']:.0f} s")

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, check=checks, results=results, targets=tgts, profile=profiles,
                   table=lines), f,
              indent=1)
  md = args.md or os.path.splitext(args.out)[0] + ".md"
  with open(md, "w") as f:
    f.write(markdown(meta, results, checks, tgts, profiles))
  print(f"# wrote {args.out} and {md}")
  if msjax_rev:
    import shutil

    shutil.rmtree(MSJAX_SRC, ignore_errors=True)


if __name__ == "__main__":
  main()
