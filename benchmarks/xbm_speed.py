#!/usr/bin/env python
"""Cross-batch memory (XBM): the MS loss of one batch against a full memory, msjax vs pml.

What is measured: the XBM memory term of one training step, ``L(batch anchors, memory)``
with the MS loss (α=2, β=40, λ=0.5, ε=0.1 as released), B = 80 anchors (16 classes × 5),
D = 512, float32, its value and its gradient with respect to the B anchors only (the
memory is a constant), on a memory that is already full:

* ``msjax step``    ``jax.jit`` of ``msjax.memory.enqueue`` + ``jax.value_and_grad`` of
                    ``msjax.memory.memory_loss`` (HIGHEST precision, the default), the
                    memory donated so the enqueue writes in place, as in a train step;
* ``msjax loss``    ``jax.jit(jax.value_and_grad(memory_loss))`` alone, on a memory that
                    already holds the batch (no enqueue);
* ``pml``           pytorch-metric-learning ``CrossBatchMemory(MultiSimilarityLoss(2, 40,
                    0.5), miner=MultiSimilarityMiner(0.1))``: one ``forward`` (which
                    enqueues the batch itself, in place, then mines and computes the loss)
                    + ``backward``; torch on 2 intra-op threads, as many as the cores
                    XLA's CPU backend uses here;
* ``released``      the released XBM code's loss (msight-tech/research-xbm: a per-anchor
                    Python loop on ``S = Q Mᵀ``, written here from it), value + autograd;
* ``floor``         the two matmuls every exact method needs, ``S = Q Mᵀ`` ([B, D] × [D, M])
                    and ``W M`` ([B, M] × [M, D]), jitted in JAX, nothing else.

Both memories are filled to full with their own enqueue (msjax ``enqueue``, pml
``add_to_memory``) from the same data, which leaves both ring pointers at slot 0. Before
every timed call the pointer is set back to that slot, so each call overwrites the same
80 oldest slots with the same batch (the memory never holds two copies of it) and every
call does the same work.

Two memory sizes: M = 55,000 (the XBM paper's SOP memory; here also the agreement check
of msjax, pml and the released loop, value and gradient) and M = 1,000,000 (msjax with
row blocks of ``block_size`` anchors, and unblocked; pml if it fits in ``--pml-limit-gib``).
Each measurement runs in its own subprocess: peak RSS is the process's high-water mark
during the timed calls (reset with ``/proc/self/clear_refs`` after the memory is filled),
and separately over the whole process including the fill; for msjax also the compiled
step's ``memory_analysis()`` (temporaries + arguments, the memory being an argument).

Data: K = 5 images per class; the memory holds one previous pass over M / 5 classes
(each class's 5 images), and the batch is 16 of those classes with fresh images, so each
anchor has 4 fresh and 5 older positives in the memory. ``emb = normalize(centre[label] +
σ·noise)`` in a random 32-d subspace of R^512 with σ = 0.9 (as in loss_speed.py): positive
similarities about 0.55, negatives about 0 ± 0.18, so mining keeps a few per cent of the
negatives, as in training.

msjax's ratio to the floor is also measured on back-to-back (msjax, floor) call pairs
(``paired``), which does not drift with the machine's speed between two measurements.

The machine may be shared: before each subprocess the driver waits (``--quiet-wait``) for
other processes to leave the CPUs idle, each timed call records how many cores others
used meanwhile (``bg``), and disturbed calls are repeated and left out of the median where
possible.

Usage::

    python benchmarks/xbm_speed.py            # full run (~5 min), writes benchmarks/results/
    python benchmarks/xbm_speed.py --quick    # M = 55,000 only, fewer calls, not written
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing
from timing import busy_cpu_s, own_cpu_s

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

B, D, K = 80, 512, 5
M_SOP, M_BIG = 55_000, 1_000_000
D_EFF, SIGMA, SEED = 32, 0.9, 0
ALPHA, BETA, LAM, EPS = 2.0, 40.0, 0.5, 0.1
HP = dict(alpha=ALPHA, beta=BETA, lam=LAM, epsilon=EPS)
THREADS = 2  # torch intra-op threads; XLA's CPU backend uses every core (2 here)
BIG_BLOCKS = ("8", "16", "none")  # msjax block_size at M = 1,000,000 ("none": unblocked)
CHUNK = 100_000  # the memory is generated and enqueued this many entries at a time
BG_LIMIT = 0.25  # cores used by other processes above which a timed call is disturbed
MIN_REP_S = 0.2  # a timed rep lasts at least this long (fast calls repeated inside it)
MIB = 2**20


# --- the data ------------------------------------------------------------------------------


class Data:
  """The memory (generated in chunks, never whole in NumPy) and the batch, for ``m`` slots."""

  def __init__(self, m: int, seed: int = SEED):
    rng = np.random.default_rng(seed)
    self.m = m
    self.seed = seed
    self.basis = np.linalg.qr(rng.standard_normal((D, D_EFF)))[0]  # orthonormal columns
    n_classes = m // K
    centres = rng.standard_normal((n_classes, D_EFF))
    self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    # The previous pass: classes in sampler order, each class's K images in a row.
    order = rng.permutation(n_classes)
    self.memory_labels = np.repeat(order, K)[:m].astype(np.int32)
    # The batch overwrites slots 0..B-1; its classes come from elsewhere in the memory.
    classes = rng.choice(order[B // K:], B // K, replace=False)
    labels = rng.permutation(np.repeat(classes, K)).astype(np.int32)
    self.batch = (self._embed(labels, rng), labels)

  def _embed(self, labels, rng):
    x = self.centres[labels] + SIGMA * rng.standard_normal((len(labels), D_EFF)) / math.sqrt(
        D_EFF)
    emb = (x @ self.basis.T).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)

  def memory_chunks(self):
    """``(emb [n, D], labels [n])`` chunks of the memory, in slot order."""
    rng = np.random.default_rng(self.seed + 1)
    for start in range(0, self.m, CHUNK):
      labels = self.memory_labels[start:start + CHUNK]
      yield self._embed(labels, rng), labels


# --- timing on a possibly shared machine ---------------------------------------------------


def measure(fn, *args, calls: int, warmup: int = 1) -> dict:
  """Median seconds of ``fn(*args)`` (``timing.call_seconds``) over ``calls`` calls during
  which other processes used at most ``BG_LIMIT`` cores; disturbed calls are repeated (up
  to ``2 · calls`` in all). A call shorter than ``MIN_REP_S`` is timed as the mean of
  enough calls to last that long, so that the CPU accounting sees a real interval."""
  first = timing.call_seconds(fn, *args, calls=1, warmup=warmup)[0]
  inner = max(1, math.ceil(MIN_REP_S / max(first, 1e-6)))
  times, bgs = [], []
  while True:
    b0, o0 = busy_cpu_s(), own_cpu_s()
    t = float(np.mean(timing.call_seconds(fn, *args, calls=inner)))
    others = (busy_cpu_s() - b0) - (own_cpu_s() - o0)
    times.append(t)
    bgs.append(max(0.0, others) / (t * inner))
    clean = [x for x, b in zip(times, bgs) if b <= BG_LIMIT]
    if len(clean) >= calls or len(times) >= 2 * calls:
      break
  use = clean or times
  return dict(seconds=float(np.median(use)), reps=len(use), inner=inner,
              disturbed=len(times) - len(clean), times=times,
              bg=[round(b, 2) for b in bgs],
              bg_max_used=max(b for x, b in zip(times, bgs) if x in use))


def paired_ratio(fa, fb, *, calls: int) -> dict:
  """Median of ``t(fa) / t(fb)`` over ``calls`` back-to-back pairs (both already
  compiled), pairs disturbed by other processes left out where possible: a ratio that
  does not depend on the machine's speed drifting between two separate measurements."""
  ratios, bgs = [], []
  while True:
    b0, o0 = busy_cpu_s(), own_cpu_s()
    ta = timing.call_seconds(fa, calls=1)[0]
    tb = timing.call_seconds(fb, calls=1)[0]
    others = (busy_cpu_s() - b0) - (own_cpu_s() - o0)
    ratios.append(ta / tb)
    bgs.append(max(0.0, others) / (ta + tb))
    clean = [r for r, b in zip(ratios, bgs) if b <= BG_LIMIT]
    if len(clean) >= calls or len(ratios) >= 2 * calls:
      break
  use = clean or ratios
  return dict(ratio=float(np.median(use)), pairs=len(use), ratios=ratios,
              bg=[round(b, 2) for b in bgs])


def rss_mib(field: str = "VmRSS") -> float:
  """``VmRSS`` (now) or ``VmHWM`` (high-water mark since the last reset) of this process."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  raise KeyError(field)


def reset_peak_rss() -> float:
  """Resets this process's RSS high-water mark (``VmHWM``, ``ru_maxrss``); returns the
  whole-process peak until now."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return peak


# --- msjax ---------------------------------------------------------------------------------


def jax_memory(data: Data):
  """An msjax ``Memory`` filled to full from ``data`` with ``enqueue`` (pointer back at 0)."""
  import jax

  from msjax import memory as xbm

  mem = xbm.create(data.m, D)
  fill = jax.jit(xbm.enqueue, donate_argnums=0)
  for emb, labels in data.memory_chunks():
    mem = fill(mem, emb, labels)
  assert int(mem.pointer) == 0 and int(mem.filled) == data.m, (mem.pointer, mem.filled)
  return mem


def jax_step(block_size):
  """The jitted XBM memory step: enqueue, then the memory term's value and d/d anchors."""
  import jax

  from msjax import memory as xbm

  def step(emb, labels, memory):
    own = xbm.slots(memory, emb.shape[0])
    updated = xbm.enqueue(memory, emb, labels)
    value, grad = jax.value_and_grad(xbm.memory_loss)(
        emb, labels, updated, anchor_slots=own, block_size=block_size, **HP)
    return value, grad, updated

  return jax.jit(step, donate_argnums=2)


class Stepper:
  """Calls the donated step with the ring pointer set back to ``pointer`` every time."""

  def __init__(self, step, memory, emb, labels, pointer=0):
    self.step, self.memory, self.emb, self.labels = step, memory, emb, labels
    self.pointer = np.int32(pointer)

  def __call__(self):
    value, grad, self.memory = self.step(self.emb, self.labels,
                                         self.memory._replace(pointer=self.pointer))
    return value, grad


def floor_fn():
  import jax
  import jax.numpy as jnp

  hi = jax.lax.Precision.HIGHEST  # as msjax's default (float32 on the CPU either way)
  return jax.jit(lambda q, r: jnp.matmul(jnp.matmul(q, r.T, precision=hi), r, precision=hi))


def compiled_memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  out = {k: getattr(stats, f"{k}_size_in_bytes") / MIB
         for k in ("temp", "argument", "output", "alias")}
  # Live at once: arguments (the memory among them), temporaries, outputs not aliased
  # to a donated argument.
  out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  return {f"{k}_mib": round(v, 1) for k, v in out.items()}


def worker_jax(args) -> dict:
  """M = 55,000: the msjax step and loss, the floor, the agreement outputs, the pieces."""
  import warnings

  import jax
  import jax.numpy as jnp

  from msjax import memory as xbm
  from msjax.losses import ms_loss, ms_mining, ms_value_and_weights

  data = Data(args.m)
  emb, labels = (jnp.asarray(x) for x in data.batch)
  mem = jax_memory(data)
  out = dict(device=str(jax.devices()[0].device_kind))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step = jax_step(None)
    compiled = step.lower(emb, labels, mem).compile()
    run = Stepper(compiled, mem, emb, labels)
    value, grad = run()  # the first step, kept for the agreement check
    np.save(os.path.join(args.tmp, "grad_msjax.npy"), np.asarray(grad))
    out["loss_value"] = float(value)
    out["step"] = measure(run, calls=args.calls)
    floor = floor_fn()
    timing.wait(floor(emb, run.memory.embeddings))  # compiled before the pairs
    step_vs_floor = paired_ratio(run, lambda: floor(emb, run.memory.embeddings),
                                 calls=2 * args.calls)
  out["donation_warnings"] = [str(w.message)[:200] for w in caught]
  out["step_compiled"] = compiled_memory(compiled)
  updated, own = run.memory, xbm.slots(run.memory._replace(pointer=run.pointer), B)
  loss = jax.jit(jax.value_and_grad(
      lambda e, l, m, s: xbm.memory_loss(e, l, m, anchor_slots=s, **HP)))
  out["loss"] = measure(loss, emb, labels, updated, own, calls=args.calls)
  out["loss_value_no_enqueue"] = float(loss(emb, labels, updated, own)[0])
  out["floor"] = measure(floor, emb, updated.embeddings, calls=args.calls)
  out["paired_vs_floor"] = {
      "step": step_vs_floor,
      "loss": paired_ratio(lambda: loss(emb, labels, updated, own),
                           lambda: floor(emb, updated.embeddings), calls=2 * args.calls),
  }
  if not args.profile:
    return out

  # Where the time goes: each piece jitted alone on the same data.
  hi = jax.lax.Precision.HIGHEST
  kw = dict(ref_labels=updated.labels, anchor_index=own, ref_valid=xbm.valid(updated),
            self_pair="both")
  sim = jax.jit(lambda q, r: jnp.matmul(q, r.T, precision=hi))(emb, updated.embeddings)
  _, weights = jax.jit(lambda s: ms_value_and_weights(s, labels, **kw, **HP))(sim)
  pieces = {
      "S = Q M^T (matmul 1)": (lambda q, r: jnp.matmul(q, r.T, precision=hi),
                               emb, updated.embeddings),
      "W M (matmul 2)": (lambda w, r: jnp.matmul(w, r, precision=hi),
                         weights, updated.embeddings),
      "floor: (Q M^T) M": (floor, emb, updated.embeddings),
      "mining from S (ms_mining: masks, row min/max)": (
          lambda s: ms_mining(s, labels, epsilon=EPS, **kw), sim),
      "loss from S (ms_loss)": (lambda s: ms_loss(s, labels, **kw, **HP), sim),
      "loss + weights from S (ms_value_and_weights)": (
          lambda s: ms_value_and_weights(s, labels, **kw, **HP), sim),
      "candidate masks only (labels, self, valid)": (
          lambda s: (s < 1 - 1e-5) & (labels[:, None] == updated.labels[None, :])
          & (jnp.arange(args.m)[None, :] != own[:, None]), sim),
      "one plain row max over S": (lambda s: jnp.max(s, axis=1), sim),
      "one masked row max over S (negatives)": (
          lambda s: jnp.max(jnp.where(labels[:, None] != updated.labels[None, :], s,
                                      -jnp.inf), axis=1), sim),
      "two masked row reductions (min pos, max neg)": (
          lambda s: (jnp.min(jnp.where(labels[:, None] == updated.labels[None, :], s,
                                       jnp.inf), axis=1),
                     jnp.max(jnp.where(labels[:, None] != updated.labels[None, :], s,
                                       -jnp.inf), axis=1)), sim),
      "exp over S (one elementwise pass)": (jnp.exp, sim),
      "msjax loss + grad (whole)": (loss, emb, labels, updated, own),
  }
  prof = {}
  for name, (fn, *xs) in pieces.items():
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    prof[name] = measure(fn, *xs, calls=args.profile_calls)["seconds"]
  out["profile"] = prof
  return out


def worker_jax_big(args) -> dict:
  """M = 1,000,000: the msjax step with ``--block`` (time, compiled memory, RSS)."""
  import jax.numpy as jnp

  block = None if args.block == "none" else int(args.block)
  data = Data(args.m)
  emb, labels = (jnp.asarray(x) for x in data.batch)
  mem = jax_memory(data)
  compiled = jax_step(block).lower(emb, labels, mem).compile()
  run = Stepper(compiled, mem, emb, labels)
  out = dict(block_size=args.block, compiled=compiled_memory(compiled),
             memory_mib=round((mem.embeddings.nbytes + mem.labels.nbytes) / MIB, 1))
  out["rss_setup_peak_mib"] = reset_peak_rss()
  out["rss_before_steps_mib"] = rss_mib()
  value, _ = run()
  out["loss_value"] = float(value)
  out["step"] = measure(run, calls=args.calls, warmup=0)
  out["rss_step_peak_mib"] = rss_mib("VmHWM")
  # The floor afterwards, in the same process (its RSS is not part of the peak above).
  out["floor"] = measure(floor_fn(), emb, run.memory.embeddings, calls=args.calls)
  return out


# --- the torch peers -----------------------------------------------------------------------


def released_xbm_loss(inputs_col, targets_col, inputs_row, target_row):
  """The released XBM MS loss (research-xbm ``MultiSimilarityLoss.forward``, hard mining
  on): per anchor, positives are same-label similarities below ``1 − 1e-5`` (the anchor's
  own memory copy is dropped by value), negatives different-label ones; a negative is kept
  if ``S + ε > min(positives)``, a positive if ``S − ε < max(negatives)``; an anchor with
  an empty kept set is skipped; the sum is divided by the batch size."""
  import torch

  sim = inputs_col @ inputs_row.t()
  terms = []
  for i in range(inputs_col.size(0)):
    pos_ = torch.masked_select(sim[i], target_row == targets_col[i])
    pos_ = torch.masked_select(pos_, pos_ < 1 - 1e-5)
    neg_ = torch.masked_select(sim[i], target_row != targets_col[i])
    neg = neg_[neg_ + EPS > torch.min(pos_)]
    pos = pos_[pos_ - EPS < torch.max(neg_)]
    if len(neg) < 1 or len(pos) < 1:
      continue
    pos_loss = torch.log(1 + torch.sum(torch.exp(-ALPHA * (pos - LAM)))) / ALPHA
    neg_loss = torch.log(1 + torch.sum(torch.exp(BETA * (neg - LAM)))) / BETA
    terms.append(pos_loss + neg_loss)
  return sum(terms) / inputs_col.size(0)


def pml_memory(data: Data):
  """pml ``CrossBatchMemory`` filled to full with its own ``add_to_memory`` (pointer 0)."""
  import torch
  from pytorch_metric_learning import losses, miners

  xbm = losses.CrossBatchMemory(
      loss=losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=LAM), embedding_size=D,
      memory_size=data.m, miner=miners.MultiSimilarityMiner(epsilon=EPS))
  for emb, labels in data.memory_chunks():
    xbm.add_to_memory(torch.from_numpy(emb), torch.from_numpy(labels).long(), len(emb))
  assert xbm.has_been_filled and xbm.queue_idx == 0, (xbm.has_been_filled, xbm.queue_idx)
  return xbm


def worker_pml(args) -> dict:
  """pml's CrossBatchMemory forward + backward (and at M = 55,000 the released loop)."""
  import torch

  import pytorch_metric_learning

  torch.set_num_threads(THREADS)
  if args.as_limit_gib:  # a MemoryError instead of the OOM killer on a shared machine
    lim = int(args.as_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
  data = Data(args.m)
  emb = torch.tensor(data.batch[0], requires_grad=True)
  labels = torch.tensor(data.batch[1], dtype=torch.long)
  xbm = pml_memory(data)
  out = dict(threads=torch.get_num_threads(), torch=torch.__version__,
             pml=pytorch_metric_learning.__version__)

  def step():
    xbm.queue_idx = 0  # overwrite the same oldest slots every call
    emb.grad = None
    loss = xbm(emb, labels)
    loss.backward()
    return loss

  out["rss_setup_peak_mib"] = reset_peak_rss()
  out["rss_before_steps_mib"] = rss_mib()
  out["loss_value"] = float(step().detach())
  grad = emb.grad.numpy().copy()
  out["step"] = measure(step, calls=args.calls, warmup=0)
  out["rss_step_peak_mib"] = rss_mib("VmHWM")
  if args.m > M_SOP:
    return out
  np.save(os.path.join(args.tmp, "grad_pml.npy"), grad)

  def enqueue():
    xbm.queue_idx = 0
    xbm.add_to_memory(emb.detach(), labels, B)

  out["enqueue"] = measure(enqueue, calls=args.calls)
  # The released loop on the same memory (which holds the batch after the step above).
  mem_emb, mem_labels = xbm.embedding_memory, xbm.label_memory

  def released():
    emb.grad = None
    loss = released_xbm_loss(emb, labels, mem_emb, mem_labels)
    loss.backward()
    return loss

  # Where pml's time goes: its pieces alone, on the memory as in the step.
  import torch.nn.functional as F

  def mine():
    return xbm.miner(emb.detach(), labels, mem_emb, mem_labels)

  indices = mine()

  def loss_given_pairs():
    emb.grad = None
    loss = xbm.loss(emb, labels, indices, mem_emb, mem_labels)
    loss.backward()
    return loss

  with torch.no_grad():
    sim = emb.detach() @ mem_emb.T
  pieces = {
      "miner (MultiSimilarityMiner)": mine,
      "loss + backward given the mined pairs": loss_given_pairs,
      "normalize the memory (F.normalize, M x D)": lambda: F.normalize(mem_emb, dim=1),
      "S = Q M^T (torch matmul)": lambda: emb.detach() @ mem_emb.T,
      "sort S by row (values + indices)": lambda: torch.sort(sim, dim=1),
      "torch.where over all negatives": lambda: torch.where(labels[:, None] != mem_labels),
  }
  out["profile"] = {k: measure(f, calls=args.profile_calls)["seconds"]
                    for k, f in pieces.items()}
  out["mined_pairs"] = dict(pos=len(indices[0]), neg=len(indices[2]), all=B * args.m)
  out["released_value"] = float(released().detach())
  np.save(os.path.join(args.tmp, "grad_released.npy"), emb.grad.numpy().copy())
  out["released"] = measure(released, calls=args.calls, warmup=0)
  # float64, to tell rounding apart from a difference in what is computed.
  e64 = emb.detach().double()
  out["released_value_f64"] = float(released_xbm_loss(e64, labels, mem_emb.double(),
                                                      mem_labels))
  return out


WORKERS = {"jax": worker_jax, "jax_big": worker_jax_big, "pml": worker_pml}


# --- the driver ----------------------------------------------------------------------------


def run_worker(kind, args, tmp, *, m, calls, block=None, as_limit_gib=None, timeout=900):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--m", str(m),
         "--calls", str(calls), "--tmp", tmp, "--profile-calls", str(args.profile_calls)]
  if block is not None:
    cmd += ["--block", block]
  if as_limit_gib:
    cmd += ["--as-limit-gib", str(as_limit_gib)]
  if args.no_profile:
    cmd += ["--no-profile"]
  waited, load = timing.wait_quiet(args.quiet_wait, BG_LIMIT)
  t0 = time.monotonic()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(status="timeout", note=f"killed after {timeout} s")
  base = dict(wall_s=round(time.monotonic() - t0, 1), quiet_wait_s=round(waited, 1),
              bg_cores_at_start=round(load, 2))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    tail = proc.stderr.strip().splitlines()[-3:]
    oom = any("MemoryError" in t or "out of memory" in t.lower() for t in tail)
    return dict(base, status="oom" if oom else "error",
                note=f"exit {proc.returncode}: " + " | ".join(tail)[-500:])
  return dict(json.loads(lines[-1][len("RESULT "):]), status="ok", **base)


def rel(a, b):
  return abs(a - b) / abs(b)


def grad_rel(tmp, a, b, tangent_to=None):
  """``‖g_a − g_b‖ / ‖g_b‖``; with ``tangent_to`` (the unit anchors), ``g_a``'s radial
  part ``(g·e) e`` is removed first: pml differentiates through its own L2 normalisation
  of the anchors, which gives exactly that projection for unit inputs."""
  ga, gb = (np.load(os.path.join(tmp, f"grad_{x}.npy")).astype(np.float64) for x in (a, b))
  if tangent_to is not None:
    e = tangent_to.astype(np.float64)
    ga = ga - np.sum(ga * e, axis=1, keepdims=True) * e
  return float(np.linalg.norm(ga - gb) / np.linalg.norm(gb))


def fmt_s(r, key="step"):
  return f"{r[key]['seconds']:.4g}" if r.get("status", "ok") == "ok" and key in r else "-"


def small_table(j, p):
  pml, floor = p["step"]["seconds"], j["floor"]["seconds"]
  paired = {k: v["ratio"] for k, v in j["paired_vs_floor"].items()}
  rows = [
      ("msjax step: enqueue + loss + grad (memory donated)", j["step"], paired["step"]),
      ("msjax loss + grad (memory_loss alone)", j["loss"], paired["loss"]),
      ("pml CrossBatchMemory forward + backward (incl. its enqueue)", p["step"], None),
      ("pml enqueue alone (add_to_memory, 80 rows)", p["enqueue"], None),
      ("released XBM loop (torch) value + backward", p["released"], None),
      ("floor: [B,D]x[D,M] + [B,M]x[M,D] matmuls (JAX)", j["floor"], None),
  ]
  head = (f"{'M = 55,000':<60} {'seconds':>9} {'pml / it':>8} {'/ floor':>7} "
          f"{'paired':>6} {'reps':>4} {'bg':>4}")
  lines = [head, "-" * len(head)]
  for name, r, pr in rows:
    t = r["seconds"]
    pr = " " * 6 if pr is None else f"{pr:6.2f}"
    lines.append(f"{name:<60} {t:9.4g} {pml / t:8.2f} {t / floor:7.2f} {pr} {r['reps']:4d} "
                 f"{r['bg_max_used']:4.1f}")
  return lines


def big_table(rows, floor_s=None, pml_s=None):
  """The M = 1,000,000 rows; ``floor_s`` adds the floor row, ``pml_s`` the pml ratios.
  ``B/pair``: RSS growth during the steps per anchor-memory pair (bytes)."""
  def f(x, spec):
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

  head = (f"{'M = 1,000,000':<27} {'seconds':>8} {'pml / it':>8} {'/ floor':>7} "
          f"{'temp MiB':>8} {'compiled':>8} {'RSS before':>10} {'RSS steps':>9} "
          f"{'RSS proc':>8} {'B/pair':>6}")
  lines = [head, "-" * len(head)]
  for name, r in rows:
    if r.get("status") != "ok":
      lines.append(f"{name:<27} {r.get('status')}: {r.get('note', '')}")
      continue
    c = r.get("compiled", {})
    t = r["step"]["seconds"]
    fl = r.get("floor", {}).get("seconds", floor_s)
    grow = (r["rss_step_peak_mib"] - r["rss_before_steps_mib"]) * MIB / (B * M_BIG)
    lines.append(
        f"{name:<27} {t:8.3f} {f(pml_s / t if pml_s else None, '8.2f')} "
        f"{f(t / fl if fl else None, '7.2f')} {f(c.get('temp_mib'), '8.0f')} "
        f"{f(c.get('peak_mib'), '8.0f')} {r['rss_before_steps_mib']:10.0f} "
        f"{r['rss_step_peak_mib']:9.0f} "
        f"{max(r['rss_setup_peak_mib'], r['rss_step_peak_mib']):8.0f} {grow:6.1f}")
  if floor_s:
    lines.append(f"{'floor (2 matmuls, JAX)':<27} {floor_s:8.3f} "
                 f"{f(pml_s / floor_s if pml_s else None, '8.2f')} {1.0:7.2f}")
  return lines


def markdown(meta, res, small, big, big_rows, checks, targets, profile):
  lines = [
      "# XBM memory term speed: MS loss of 80 anchors against a full memory, CPU", "",
      f"{meta['cpu']}, {meta['cpu_count']} cores (XLA uses both; torch set to {THREADS} "
      f"threads); jax {meta['jax']}, torch {meta.get('torch')}, pytorch-metric-learning "
      f"{meta.get('pml')}; {meta['date']}; msjax git {meta['git_head'][:12]} "
      f"({meta['msjax_tree']}). B={B}, D={D}, float32, MS α=2, β=40, λ=0.5, ε=0.1; value + "
      "gradient w.r.t. the anchors. Median seconds per call, compile excluded; `pml / it` "
      "and `/ floor` are ratios of medians, `paired` the median ratio of back-to-back "
      "(msjax, floor) call pairs; `bg`: most cores other processes used during a timed "
      "call. Generated by `benchmarks/xbm_speed.py`.", "", "```", *small, "```", ""]
  if big:
    pml_row = dict(big_rows).get("pml CrossBatchMemory", {})
    pml_note = (f"pml was run: {pml_row.get('prediction')}" if pml_row.get("status") == "ok"
                else f"pml: {pml_row.get('status')}: {pml_row.get('note')}")
    lines += ["Memory in MiB: `temp` and `compiled` from the compiled step's "
              "`memory_analysis()` (compiled = arguments, the memory among them, + "
              "temporaries + outputs not aliased to the donated memory); RSS before the "
              "timed steps (memory filled), its high-water mark during them, and the whole "
              "process's peak (the fill included); `B/pair`: RSS growth during the steps "
              f"per anchor-memory pair, in bytes. {pml_note}.", "",
              "```", *big, "```", ""]
  lines += ["| target | value | met |", "|---|---|---|"]
  for name, t in targets.items():
    met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
    lines.append(f"| {name} | {t['value']} | {met} |")
  lines += ["", "Agreement at M = 55,000 (relative difference):", "",
            "| pair | loss | gradient (‖Δ‖/‖g‖) |", "|---|---|---|"]
  for name, c in checks.items():
    if isinstance(c, dict) and "grad" in c:
      lines.append(f"| {name} | {c['loss']:.1e} | {c['grad']:.1e} |")
  big_loss = checks.get("loss at M=1,000,000")
  if big_loss:
    values = ", ".join(f"{k} {v:.7g}" for k, v in big_loss.items() if k.startswith(("msjax",
                                                                                   "pml")))
    lines += ["", f"Loss values at M = 1,000,000: {values}; largest relative difference to "
              f"pml {big_loss['largest relative difference to pml']:.1e}."]
  if profile:
    floor = profile["floor: (Q M^T) M"]
    lines += ["", "Where msjax's time goes at M = 55,000 (each piece jitted alone):", "",
              "| piece | seconds | / floor |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {v / floor:.2f} |" for k, v in profile.items()]
  pml = res["pml"]
  if pml.get("profile"):
    step = pml["step"]["seconds"]
    mined = pml["mined_pairs"]
    lines += ["", f"Where pml's time goes at M = 55,000 (pieces alone; the step is "
              f"{step:.3f} s; its miner kept {mined['pos']:,} positive and {mined['neg']:,} "
              f"negative pairs of the {mined['all']:,}):", "",
              "| piece | seconds | / pml step |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {v / step:.2f} |" for k, v in pml["profile"].items()]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="M = 55,000 only, few calls")
  ap.add_argument("--calls", type=int, default=10, help="timed calls at M = 55,000")
  ap.add_argument("--big-calls", type=int, default=3, help="timed calls at M = 1,000,000")
  ap.add_argument("--profile-calls", type=int, default=10)
  ap.add_argument("--no-profile", action="store_true")
  ap.add_argument("--blocks", default=",".join(BIG_BLOCKS),
                  help="msjax block sizes at M = 1,000,000 ('none' for unblocked)")
  ap.add_argument("--pml-limit-gib", type=float, default=20.0,
                  help="run pml at M = 1,000,000 only if its predicted peak is below this")
  ap.add_argument("--quiet-wait", type=float, default=60.0,
                  help="before each subprocess, wait up to this many seconds for the CPUs "
                       "to be idle")
  # worker arguments
  ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  ap.add_argument("--m", type=int, default=M_SOP, help=argparse.SUPPRESS)
  ap.add_argument("--block", default="none", help=argparse.SUPPRESS)
  ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--as-limit-gib", type=float, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    args.profile = not args.no_profile
    print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
    return

  t_start = time.monotonic()
  if args.quick:
    args.calls, args.profile_calls = min(args.calls, 5), min(args.profile_calls, 5)
  import jax

  meta = machine.environment(jax=jax.__version__)
  print(f"# {meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}; msjax git "
        f"{meta['git_head'][:12]} ({meta['msjax_tree']})", flush=True)
  res = {}
  with tempfile.TemporaryDirectory(prefix="xbm_speed_") as tmp:
    print(f"## M = {M_SOP:,}: msjax (+ floor, profile)", flush=True)
    res["jax"] = run_worker("jax", args, tmp, m=M_SOP, calls=args.calls)
    print(f"## M = {M_SOP:,}: pml CrossBatchMemory (+ released loop)", flush=True)
    res["pml"] = run_worker("pml", args, tmp, m=M_SOP, calls=args.calls)
    for k in ("jax", "pml"):
      if res[k]["status"] != "ok":
        raise SystemExit(f"{k} failed: {res[k]}")
    j, p = res["jax"], res["pml"]
    meta.update(torch=p["torch"], pml=p["pml"], torch_threads=p["threads"])
    checks = {
        "msjax vs pml": dict(loss=rel(j["loss_value"], p["loss_value"]),
                             grad=grad_rel(tmp, "msjax", "pml")),
        "msjax (tangential part) vs pml": dict(
            loss=rel(j["loss_value"], p["loss_value"]),
            grad=grad_rel(tmp, "msjax", "pml", tangent_to=Data(M_SOP).batch[0])),
        "msjax vs released loop": dict(loss=rel(j["loss_value"], p["released_value"]),
                                       grad=grad_rel(tmp, "msjax", "released")),
        "pml vs released loop": dict(loss=rel(p["loss_value"], p["released_value"]),
                                     grad=grad_rel(tmp, "pml", "released")),
        "msjax vs released loop in float64 (loss)": rel(j["loss_value"],
                                                         p["released_value_f64"]),
        "values": dict(msjax=j["loss_value"], msjax_no_enqueue=j["loss_value_no_enqueue"],
                       pml=p["loss_value"], released=p["released_value"],
                       released_f64=p["released_value_f64"]),
    }
  small = small_table(j, p)
  print("\n".join(small), flush=True)
  speedup = p["step"]["seconds"] / j["step"]["seconds"]
  targets = {
      "msjax step >= 10x faster than pml at M=55,000": dict(value=round(speedup, 2),
                                                            met=speedup >= 10),
  }
  for key, name in (("loss", "msjax loss + grad"), ("step", "msjax step")):
    ratio = j["paired_vs_floor"][key]["ratio"]
    targets[f"{name} within 1.5x of the two-matmul floor at M=55,000 (paired)"] = dict(
        value=round(ratio, 2), met=ratio <= 1.5)
  targets["msjax loss equals pml's to 1e-4 relative"] = dict(
      value=f"{checks['msjax vs pml']['loss']:.1e}", met=checks["msjax vs pml"]["loss"] <= 1e-4)
  for name, c in checks.items():
    print(f"  {name}: {c}")

  big_rows, big_floor, big_pml = [], None, None
  if not args.quick:
    for block in args.blocks.split(","):
      print(f"## M = {M_BIG:,}: msjax block_size={block}", flush=True)
      r = run_worker("jax_big", args, "/tmp", m=M_BIG, calls=args.big_calls, block=block)
      big_rows.append((f"msjax block_size={block}", r))
      print("\n".join(big_table(big_rows[-1:])[2:]), flush=True)
    # pml: its peak grows with B·M (the [B, M] similarity, two sorts with int64 indices,
    # every negative's (anchor, index) pair, masks); predicted from M = 55,000.
    grow = p["rss_step_peak_mib"] - p["rss_before_steps_mib"]
    memory_mib = (M_BIG * D * 4 + M_BIG * 8) / MIB
    predicted = (p["rss_before_steps_mib"] + memory_mib + grow * M_BIG / M_SOP) / 1024
    import psutil

    avail = psutil.virtual_memory().available / 2**30
    note = (f"predicted peak {predicted:.1f} GiB ({grow:.0f} MiB above the filled memory at "
            f"M={M_SOP:,}, scaled by M, + the {memory_mib / 1024:.1f} GiB memory); "
            f"{avail:.1f} GiB available")
    print(f"## M = {M_BIG:,}: pml ({note})", flush=True)
    if predicted < min(args.pml_limit_gib, avail - 1.0):
      r = run_worker("pml", args, "/tmp", m=M_BIG, calls=max(1, args.big_calls - 1),
                     as_limit_gib=min(args.pml_limit_gib, avail - 0.5) + 4.0)
    else:
      r = dict(status="skipped", note=note)
    r["prediction"] = note
    big_rows.append(("pml CrossBatchMemory", r))
    print("\n".join(big_table(big_rows[-1:])[2:]), flush=True)
    ok = {n: r for n, r in big_rows if r.get("status") == "ok"}
    pml_big = ok.get("pml CrossBatchMemory")
    for n, r in ok.items():
      if n.startswith("msjax"):
        gib = max(r["rss_step_peak_mib"], r["rss_setup_peak_mib"]) / 1024
        targets[f"{n} at M=1,000,000: process peak RSS, GiB (no target)"] = dict(
            value=round(gib, 2), met=None)
        if pml_big:
          sp = pml_big["step"]["seconds"] / r["step"]["seconds"]
          targets[f"{n} >= 10x faster than pml at M=1,000,000"] = dict(value=round(sp, 2),
                                                                       met=sp >= 10)
    if pml_big:
      checks["loss at M=1,000,000"] = {n: r["loss_value"] for n, r in ok.items()}
      checks["loss at M=1,000,000"]["largest relative difference to pml"] = max(
          rel(r["loss_value"], pml_big["loss_value"]) for r in ok.values())
    floors = [r["floor"]["seconds"] for n, r in ok.items() if "floor" in r]
    big_floor = floors[-1] if floors else None  # the last msjax worker's (unblocked)
    big_pml = pml_big["step"]["seconds"] if pml_big else None
  big = big_table(big_rows, big_floor, big_pml) if big_rows else []
  meta["total_wall_s"] = round(time.monotonic() - t_start, 1)
  meta["data"] = dict(B=B, D=D, K=K, d_eff=D_EFF, sigma=SIGMA, seed=SEED,
                      hparams=HP, memory="one previous pass over M/5 classes; the batch: 16 "
                      "of those classes, fresh images (4 fresh + 5 older positives each)")
  md = markdown(meta, res, small, big, big_rows, checks, targets, j.get("profile"))
  print()
  print(md)
  print(f"# total {meta['total_wall_s']:.0f} s")
  if not args.quick:
    machine.write_results("xbm_speed", dict(meta=meta, m_sop=res, m_big=dict(big_rows),
                                            checks=checks, targets=targets, table=small + big),
                          md)


if __name__ == "__main__":
  main()
