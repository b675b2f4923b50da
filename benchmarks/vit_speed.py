#!/usr/bin/env python
"""ViT-S/16 training-step speed: msjax against timm + pytorch-metric-learning.

What is measured: the gradient computation of one training step, images -> ViT-S/16
(CLS pooling) -> Linear(384, 384) + L2 normalisation -> MS loss with mining (α=2, β=50,
λ=0.5, ε=0.1) -> the gradient with respect to every parameter, at batch 32 (8 classes ×
4 images), 224×224, float32, no optimiser update:

* ``msjax``   ``create_model("vit_s16", 384)``; ``jax.jit(jax.value_and_grad)`` of
              ``ms_loss_from_embeddings(model(images))`` over the ``nnx.Param`` part of
              ``nnx.split(model)``, compiled once (compile time reported apart);
* ``timm``    ``timm`` ``vit_small_patch16_224`` (``num_classes=0``: the CLS token after
              the final norm) + ``torch.nn.Linear(384, 384)`` + ``F.normalize``, pml's
              ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)`` fed by
              ``MultiSimilarityMiner(epsilon=0.1)``, ``loss.backward()``, eager PyTorch
              with ``torch.set_num_threads`` = the machine's cores;
* ``msjax bfloat16``  msjax with ``dtype=bfloat16`` (parameters float32), for reference:
              its CPU speed depends on the CPU's bfloat16 instructions (AVX512-BF16,
              AMX) and says little about an accelerator (fewer steps, ``--bf16-steps``).

Each row runs in its own subprocess (``timing.run_measurement``): s/step is the median
of ``--steps`` timed steps after ``--warmup`` untimed ones, each waited for; peak RSS is
that child's ``ru_maxrss`` (imports, model, compilation and the steps together). The
ratio is timm s/step over msjax s/step (> 1: msjax faster). The msjax rows also give the
compiled step's FLOP count (XLA cost analysis) and the achieved GFLOP/s.

Before timing, the script checks that both sides compute the same quantity: timm's
random weights are copied into msjax (``vit.convert_checkpoint``,
``weights.convert_state_dict``, ``weights.assign``), the head's too, and on the same
images the two losses must agree to 1e-4 relative and every parameter's gradient to
``GRAD_TOL`` (max |difference| / max |timm|, per tensor). The images are class-structured
(a class pattern plus noise), so the similarities separate the classes a little and
mining keeps some pairs and drops others, as in training. With the self pair dropped by
value (msjax) or by index (pml) and an anchor whose mined positives are empty exactly
when its mined negatives are, the two losses are the same function; the check prints the
mining counts and the largest off-diagonal similarity (a value drop would bite above
``1 − 1e-5``).

On an accelerator (``--device``): only msjax, in bfloat16 and float32, at
``--device-batch`` (256: 64 classes × 4), with the device's peak memory and the
model-flops utilisation ``achieved FLOP/s / peak``, given the chip's dense peak
(``--peak-tflops`` for bfloat16, ``--peak-tflops-f32`` for float32, whose matmuls JAX
may run as TF32 on a GPU); FLOPs from XLA's cost analysis of the compiled step where the
backend gives them, else the analytic count (3 × the forward's matmul FLOPs).

Usage::

    python benchmarks/vit_speed.py                       # CPU: check + 3 rows, ~5 min
    python benchmarks/vit_speed.py --steps 2 --warmup 1 --no-write       # a smoke run
    python benchmarks/vit_speed.py --device --peak-tflops 989            # an H100/H200
    python benchmarks/vit_speed.py --worker msjax --dtype float32 --steps 3   # one row
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # timm_ref: timm with the CPU torch

CLASSES, PER_CLASS, SIZE, DIM = 8, 4, 224, 384
BATCH = CLASSES * PER_CLASS
ARCH, TIMM_ARCH = "vit_s16", "vit_small_patch16_224"
MS = dict(alpha=2.0, beta=50.0, lam=0.5, epsilon=0.1)  # pml's defaults
LOSS_TOL = 1e-4  # relative, float32
GRAD_TOL = 1e-3  # max |msjax - timm| / max |timm| per parameter tensor, float32
DEVICE_BATCH = 256


def data(batch: int, seed: int = 0):
  """``(images [B, 224, 224, 3] float32, labels [B] int32)``: ``batch / 4`` classes of 4
  images, each its class's random pattern plus as much noise (unit variance, as
  ImageNet-normalised pixels), so that same-class images are more alike."""
  rng = np.random.default_rng(seed)
  classes = batch // PER_CLASS
  labels = np.repeat(np.arange(classes), PER_CLASS).astype(np.int32)
  patterns = rng.standard_normal((classes, SIZE, SIZE, 3), dtype=np.float32)
  noise = rng.standard_normal((batch, SIZE, SIZE, 3), dtype=np.float32)
  images = (patterns[labels] + noise) * np.float32(0.5 ** 0.5)
  return images, labels


def analytic_flops(batch: int) -> float:
  """Training FLOPs of a ViT-S/16 step at 224 px: 3 × the forward's matmul FLOPs (the
  backward computes two matmuls per forward one; softmax, norms and the loss left out)."""
  tokens, width, depth, patch = (SIZE // 16) ** 2 + 1, 384, 12, 16
  per_block = (2 * tokens * width * 3 * width  # qkv
               + 2 * 2 * tokens * tokens * width  # q kᵀ and attn v
               + 2 * tokens * width * width  # proj
               + 2 * 2 * tokens * width * 4 * width)  # fc1, fc2
  forward = depth * per_block + 2 * (tokens - 1) * 3 * patch * patch * width + 2 * width * DIM
  return 3.0 * forward * batch


# --- the two sides --------------------------------------------------------------------------


def msjax_model(dtype_name: str = "float32"):
  import jax.numpy as jnp
  from flax import nnx

  from msjax import models
  dtype = None if dtype_name == "float32" else getattr(jnp, dtype_name)
  model = models.create_model(ARCH, DIM, rngs=nnx.Rngs(0), dtype=dtype)
  model.train()
  return model


def msjax_value_and_grad(graphdef):
  """The jitted ``(params, rest, images, labels) -> (loss, d loss / d params)``."""
  import jax
  from flax import nnx

  from msjax.losses import ms_loss_from_embeddings

  def loss_fn(params, rest, images, labels):
    return ms_loss_from_embeddings(nnx.merge(graphdef, params, rest)(images), labels, **MS)

  return jax.jit(jax.value_and_grad(loss_fn))


def timm_side(threads: int):
  """``(backbone, head, step)``: timm's ViT-S/16, the head, and ``step(x, y) -> loss``
  (a forward and ``loss.backward()``; the gradients stay in ``.grad``)."""
  from timm_ref import import_timm
  timm = import_timm(skip_if_missing=False)
  import torch
  from pytorch_metric_learning import losses, miners

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  backbone = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0)
  head = torch.nn.Linear(backbone.num_features, DIM)
  backbone.train()  # no dropout in this architecture: train and eval compute the same
  loss_fn = losses.MultiSimilarityLoss(alpha=MS["alpha"], beta=MS["beta"], base=MS["lam"])
  miner = miners.MultiSimilarityMiner(epsilon=MS["epsilon"])
  params = list(backbone.parameters()) + list(head.parameters())

  def step(x, y):
    for p in params:
      p.grad = None
    emb = torch.nn.functional.normalize(head(backbone(x)), dim=1)
    loss = loss_fn(emb, y, miner(emb, y))
    loss.backward()
    return loss.detach()

  return backbone, head, step, miner


def to_torch(images, labels):
  import torch
  return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
          torch.from_numpy(labels.astype(np.int64)))


# --- workers (each in its own subprocess) ---------------------------------------------------


def worker_msjax(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  images, labels = data(args.batch)
  model = msjax_model(args.dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, y = jnp.asarray(images), jnp.asarray(labels)
  t0 = time.perf_counter()
  compiled = msjax_value_and_grad(graphdef).lower(params, rest, x, y).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times = timing.call_seconds(compiled, params, rest, x, y, calls=args.steps,
                              warmup=args.warmup)
  loss = float(compiled(params, rest, x, y)[0])
  seconds = float(np.median(times))
  out = dict(seconds=seconds, times=times, compile_s=compile_s, loss=loss,
             xla_flops=flops or None, analytic_flops=analytic_flops(args.batch),
             backend=jax.default_backend(), device=jax.devices()[0].device_kind)
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def worker_timm(args) -> dict:
  import torch
  threads = os.cpu_count() or 1
  _, _, step, _ = timm_side(threads)
  x, y = to_torch(*data(args.batch))
  times = timing.call_seconds(step, x, y, calls=args.steps, warmup=args.warmup)
  return dict(seconds=float(np.median(times)), times=times, loss=float(step(x, y)),
              threads=torch.get_num_threads(), torch=torch.__version__)


def worker_check(args) -> dict:
  """Both sides on the same weights and images: losses, every gradient, mining counts."""
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from msjax.models import vit, weights

  backbone, head, step, miner = timm_side(os.cpu_count() or 1)
  images, labels = data(BATCH)
  x, y = to_torch(images, labels)
  t_loss = float(step(x, y))
  t_grads = {"backbone": {k: p.grad for k, p in backbone.named_parameters()},
             "head": {"linear." + k: p.grad for k, p in head.named_parameters()}}

  model = msjax_model("float32")
  state = {"backbone": vit.convert_checkpoint(backbone.state_dict(), vit.SIZES[ARCH]),
           "head": {"linear." + k: v for k, v in head.state_dict().items()}}
  errors = {}
  for part in ("backbone", "head"):
    module = getattr(model, part)
    weights.assign(module, weights.convert_state_dict(module, state[part]))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  m_loss, m_grads = msjax_value_and_grad(graphdef)(params, rest, jnp.asarray(images),
                                                    jnp.asarray(labels))
  m_flat = {"/".join(map(str, path)): np.asarray(g[...])
            for path, g in nnx.to_flat_state(m_grads)}
  for part in ("backbone", "head"):
    want = weights.convert_state_dict(getattr(model, part), t_grads[part])
    for path, w in want.items():
      g = m_flat[f"{part}/{path}"]
      errors[f"{part}/{path}"] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
  worst = max(errors, key=errors.get)

  with torch.no_grad():
    emb = torch.nn.functional.normalize(head(backbone(x)), dim=1)
    a1, _, a2, _ = miner(emb, y)
    sim = (emb @ emb.T).numpy()
  same = labels[:, None] == labels[None, :]
  off = ~np.eye(BATCH, dtype=bool)
  m_loss = float(m_loss)
  return dict(seconds=0.0, loss_msjax=m_loss, loss_timm=t_loss,
              loss_rel_diff=abs(m_loss - t_loss) / abs(t_loss),
              grad_worst=worst, grad_worst_rel_diff=errors[worst], grads_compared=len(errors),
              mined_pos_pairs=int(len(a1)), mined_neg_pairs=int(len(a2)),
              all_pos_pairs=int((same & off).sum()), all_neg_pairs=int((~same).sum()),
              pos_sim_mean=float(sim[same & off].mean()), neg_sim_mean=float(sim[~same].mean()),
              max_offdiag_sim=float(sim[off].max()), jax=jax.__version__)


WORKERS = {"msjax": worker_msjax, "timm": worker_timm, "check": worker_check}


# --- the driver -----------------------------------------------------------------------------


def measure(args, worker, *, dtype="float32", batch=BATCH, steps=None, warmup=None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--dtype", dtype,
         "--batch", str(batch), "--steps", str(steps if steps is not None else args.steps),
         "--warmup", str(warmup if warmup is not None else args.warmup)]
  res = timing.run_measurement(cmd, env=dict(os.environ), cwd=REPO, timeout_s=args.timeout,
                               quiet_wait_s=args.quiet_wait, bg_limit=args.bg_limit)
  res.update(impl=worker, dtype=dtype, batch=batch)
  if res.get("status") is None and res.get("seconds"):
    res["status"] = "ok"
    res["images_per_s"] = batch / res["seconds"]
    flops = res.get("xla_flops") or res.get("analytic_flops")
    if flops:
      res["tflops_per_s"] = flops / res["seconds"] / 1e12
      peak = args.peak_tflops if dtype == "bfloat16" else args.peak_tflops_f32
      if peak:
        res["peak_tflops"] = peak
        res["mfu"] = res["tflops_per_s"] / peak
  print(json.dumps({k: v for k, v in res.items() if k != "times"}), flush=True)
  return res


def check_lines(c) -> list[str]:
  if c.get("status") not in (None, "ok"):
    return [f"Agreement check failed: {c.get('status')} {c.get('note', '')}"]
  ok = lambda v, tol: "ok" if v <= tol else f"ABOVE {tol:g}"
  return [
      f"Same weights (timm's, copied into msjax) and images, float32: loss msjax "
      f"{c['loss_msjax']:.7g}, timm + pml {c['loss_timm']:.7g}, relative difference "
      f"{c['loss_rel_diff']:.1e} ({ok(c['loss_rel_diff'], LOSS_TOL)}); gradients of all "
      f"{c['grads_compared']} parameter tensors, largest max|diff|/max|timm| "
      f"{c['grad_worst_rel_diff']:.1e} at `{c['grad_worst']}` "
      f"({ok(c['grad_worst_rel_diff'], GRAD_TOL)}).",
      f"Mining kept {c['mined_pos_pairs']} of {c['all_pos_pairs']} positive and "
      f"{c['mined_neg_pairs']} of {c['all_neg_pairs']} negative pairs; mean similarity "
      f"{c['pos_sim_mean']:.3f} (positive), {c['neg_sim_mean']:.3f} (negative), largest "
      f"off-diagonal {c['max_offdiag_sim']:.4f}."]


def markdown(meta, rows, check, args) -> str:
  ref = next((r for r in rows if r["impl"] == "timm" and r.get("status") == "ok"), None)
  lines = ["| impl | dtype | batch | s/step | images/s | timm / msjax | peak RSS | notes |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = "timm + pml" if r["impl"] == "timm" else "msjax"
    if r.get("status") != "ok":
      lines.append(f"| {name} | {r['dtype']} | {r['batch']} | {r['status']} | | | "
                   f"{r['peak_rss_mib'] / 1024:.2f} GiB | {r.get('note', '')} |")
      continue
    ratio = (f"{ref['seconds'] / r['seconds']:.2f}x" if ref and r["impl"] == "msjax"
             and r["batch"] == ref["batch"] else "")
    notes = []
    if r["impl"] == "msjax":
      notes.append(f"compile {r['compile_s']:.0f} s")
      if r.get("xla_flops"):
        notes.append(f"{r['xla_flops'] / 1e9:.0f} GFLOP/step (XLA)")
      else:
        notes.append(f"{r['analytic_flops'] / 1e9:.0f} GFLOP/step (analytic)")
      notes.append(f"{r['tflops_per_s'] * 1e3:.0f} GFLOP/s on {r['device']}")
      if r.get("mfu") is not None:
        notes.append(f"MFU {r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s")
      if r.get("device_peak_gib"):
        notes.append(f"device peak {r['device_peak_gib']:.1f} GiB")
      if r["dtype"] == "bfloat16" and r["backend"] == "cpu":
        notes.append("bfloat16 on a CPU, for reference only")
    else:
      notes.append(f"torch {r['torch']}, {r['threads']} threads")
    steps = len(r.get("times", []))
    notes.append(f"median of {steps} step(s)")
    lines.append(f"| {name} | {r['dtype']} | {r['batch']} | {r['seconds']:.2f} | "
                 f"{r['images_per_s']:.1f} | {ratio} | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                 f"{'; '.join(notes)} |")
  head = [f"Machine: {meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}, flax "
          f"{meta['flax']}, torch {meta['torch']}, timm {meta['timm']}, "
          f"pytorch-metric-learning {meta['pytorch-metric-learning']}; msjax "
          f"{meta['git_head'][:12]} ({meta['msjax_tree']}).", ""]
  if check:
    head += check_lines(check) + [""]
  return "\n".join(head + lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=5, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--bf16-steps", type=int, default=2, help="timed steps, CPU bfloat16 row")
  p.add_argument("--bf16-warmup", type=int, default=1)
  p.add_argument("--rows", default="msjax,timm,msjax_bf16",
                 help="of msjax, timm, msjax_bf16 (CPU mode)")
  p.add_argument("--no-check", action="store_true", help="skip the agreement check")
  p.add_argument("--device", action="store_true",
                 help="accelerator mode: msjax bfloat16 and float32 at --device-batch")
  p.add_argument("--device-batch", type=int, default=DEVICE_BATCH)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's dense bfloat16 peak, for MFU")
  p.add_argument("--peak-tflops-f32", type=float, default=None,
                 help="the device's dense float32 (or TF32) peak, for MFU")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
  p.add_argument("--quiet-wait", type=float, default=60.0,
                 help="seconds to wait for idle CPUs before each subprocess")
  p.add_argument("--bg-limit", type=float, default=0.3,
                 help="cores other processes may use for the CPUs to count as idle")
  p.add_argument("--out", default=None,
                 help="write PATH.json and PATH.md (default benchmarks/results/vit_speed)")
  p.add_argument("--no-write", action="store_true", help="print only")
  p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(WORKERS[args.worker](args)))
    return
  if args.device_batch % PER_CLASS:
    p.error(f"--device-batch must be a multiple of {PER_CLASS} (images per class)")

  versions = {n: importlib.metadata.version(n) for n in
              ("jax", "flax", "torch", "timm", "pytorch-metric-learning")}
  meta = dict(machine.environment(**versions),
              command=" ".join(["python benchmarks/vit_speed.py", *(argv or sys.argv[1:])]),
              ms=MS, image_size=SIZE, embedding_dim=DIM)
  check = None
  if not args.no_check and not args.device:
    check = measure(args, "check", steps=0, warmup=0)
    print("\n".join(check_lines(check)), flush=True)
  rows = []
  if args.device:
    for dtype in ("bfloat16", "float32"):
      rows.append(measure(args, "msjax", dtype=dtype, batch=args.device_batch))
  else:
    for row in args.rows.split(","):
      if row == "msjax_bf16":
        rows.append(measure(args, "msjax", dtype="bfloat16", steps=args.bf16_steps,
                            warmup=args.bf16_warmup))
      elif row in ("msjax", "timm"):
        rows.append(measure(args, row))
      else:
        p.error(f"unknown row {row!r}")
  md = markdown(meta, rows, check, args)
  print("\n" + md)
  if args.no_write:
    return
  title = ("# ViT-S/16 training step (forward + backward + MS loss), "
           + (f"msjax on an accelerator, batch {args.device_batch}" if args.device else
              f"batch {BATCH}, 224×224") + "\n\nGenerated by `benchmarks/vit_speed.py`.\n\n")
  payload = dict(meta=meta, check=check, rows=rows)
  paths = machine.write_results("vit_speed_device" if args.device else "vit_speed", payload,
                                title + md, out=args.out)
  if args.out:
    print("wrote {} and {}".format(*paths))


if __name__ == "__main__":
  main()
