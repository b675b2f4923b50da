#!/usr/bin/env python
"""Training-step speed: backbone + embedding head + MS loss, forward and backward.

What is measured, for BN-Inception (227×227, the released recipe: frozen BatchNorm,
global max pooling, 512-d head) and ResNet-50 (224×224, frozen BatchNorm, average
pooling, 512-d head), at batch 80 (16 classes × 5), float32:

* ``msjax``  ``nnx.value_and_grad`` of ``ms_loss_from_embeddings(model(images))`` with
             respect to every parameter, jitted (compile excluded).
* ``torch``  the same network in PyTorch (``tests/torch_*.py``, the reference modules
             the equivalence tests use) with a linear head and L2 normalisation,
             pytorch-metric-learning's ``MultiSimilarityLoss`` + ``MultiSimilarityMiner``,
             ``loss.backward()``; BatchNorm in eval mode (frozen), 2 intra-op threads.

No optimiser update on either side. Each (impl, arch) runs in its own subprocess;
images/s is 80 / median step seconds. For msjax the compiled step's flop count (XLA cost
analysis) gives the achieved GFLOP/s. On a GPU, run the same script there: it reports the
device and, given ``--peak-tflops``, the model-flops utilisation.

Usage::

    python benchmarks/step_speed.py                  # both archs, both impls
    python benchmarks/step_speed.py --archs resnet50 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, CLASSES, DIM = 80, 16, 512
SIZES = {"bninception": 227, "resnet50": 224}
POOLING = {"bninception": "max", "resnet50": "avg"}


def data(arch, seed=0):
  rng = np.random.default_rng(seed)
  size = SIZES[arch]
  images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
  if arch == "bninception":
    images *= 60.0  # Caffe-scale inputs
  labels = np.repeat(np.arange(CLASSES), BATCH // CLASSES).astype(np.int32)
  return images, labels


def timed(step, reps):
  """(median seconds, every call's seconds) of ``reps`` calls of ``step``."""
  times = timing.call_seconds(step, calls=reps)
  return float(np.median(times)), times


def worker_msjax(arch, reps):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from msjax import models
  from msjax.losses import ms_loss_from_embeddings

  images, labels = data(arch)
  model = models.create_model(arch, DIM, rngs=nnx.Rngs(0), frozen_bn=True,
                              pooling=POOLING[arch])
  model.train()
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, images, labels):
    def loss_fn(params, rest):
      m = nnx.merge(graphdef, params, rest)
      return ms_loss_from_embeddings(m(images), labels)
    params, rest = state.split(nnx.Param, ...)
    return jax.value_and_grad(loss_fn)(params, rest)

  x, y = jnp.asarray(images), jnp.asarray(labels)
  compiled = step.lower(state, x, y).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(state, x, y))
  first = time.perf_counter() - t0
  seconds, times = timed(lambda: jax.block_until_ready(compiled(state, x, y)), reps)
  return dict(seconds=seconds, times=times, first_s=first, flops=flops,
              gflops_per_s=flops / seconds / 1e9 if flops else None,
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend())


def worker_torch(arch, reps):
  import torch
  from pytorch_metric_learning import losses, miners
  sys.path.insert(0, os.path.join(REPO, "tests"))
  if arch == "bninception":
    from torch_bninception import TorchBNInception as Net
    features = 1024
  else:
    from torch_resnet import TorchResNet50 as Net
    features = 2048
  torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count() or 1)))
  net, head = Net(), torch.nn.Linear(features, DIM)
  net.train()
  for m in net.modules():  # frozen BatchNorm: running statistics, affine still trained
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
  loss_fn = losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
  miner = miners.MultiSimilarityMiner(epsilon=0.1)
  images, labels = data(arch)
  x = torch.tensor(images.transpose(0, 3, 1, 2).copy())
  y = torch.tensor(labels.astype(np.int64))
  params = list(net.parameters()) + list(head.parameters())

  def step():
    for p in params:
      p.grad = None
    emb = torch.nn.functional.normalize(head(net.features(x, POOLING[arch])), dim=1)
    loss = loss_fn(emb, y, miner(emb, y))
    loss.backward()

  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  seconds, times = timed(step, reps)
  return dict(seconds=seconds, times=times, first_s=first, threads=torch.get_num_threads(),
              torch=torch.__version__)


def worker_convparts(arch, reps):
  """Where XLA's step time goes: one 3x3, 64->64 convolution on [16, 56, 56, 64], its
  forward, its input gradient and its kernel gradient alone, in GFLOP/s (and PyTorch's
  for the same three)."""
  import jax
  import jax.numpy as jnp
  import torch
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 56, 56, 64)).astype(np.float32)
  w = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
  flops = 2 * 16 * 56 * 56 * 64 * 64 * 9
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xj, wj = jnp.asarray(x), jnp.asarray(w)
  yj = conv(xj, wj)
  parts = {
      "forward": (conv, (xj, wj)),
      "input gradient": (lambda x, w, y: jax.vjp(lambda x: conv(x, w), x)[1](y)[0],
                         (xj, wj, yj)),
      "kernel gradient": (lambda x, w, y: jax.vjp(lambda w: conv(x, w), w)[1](y)[0],
                          (xj, wj, yj)),
  }
  out = {}
  for name, (f, args) in parts.items():
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    seconds, _ = timed(lambda: jax.block_until_ready(f(*args)), 5)
    out[f"xla {name}"] = flops / seconds / 1e9
  torch.set_num_threads(os.cpu_count() or 1)
  xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
  wt = torch.tensor(w.transpose(3, 2, 0, 1).copy(), requires_grad=True)
  yt = torch.nn.functional.conv2d(xt, wt, padding=1).detach()
  fwd = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)
  out["torch forward"] = flops / timed(lambda: fwd(), 5)[0] / 1e9
  out["torch input gradient"] = flops / timed(
      lambda: torch.autograd.grad(fwd(), xt, yt), 5)[0] / 1e9
  out["torch kernel gradient"] = flops / timed(
      lambda: torch.autograd.grad(fwd(), wt, yt), 5)[0] / 1e9
  return dict(seconds=0.0, gflops=out)


WORKERS = {"msjax": worker_msjax, "torch": worker_torch, "convparts": worker_convparts}


def run(impl, arch, reps):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--archs", arch,
         "--reps", str(reps)]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    raise RuntimeError(f"{impl}/{arch} failed:\n{out.stderr[-3000:]}")
  res = json.loads(lines[-1][len("RESULT "):])
  res.update(impl=impl, arch=arch,
             images_per_s=BATCH / res["seconds"] if res["seconds"] else None)
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--archs", default="bninception,resnet50")
  p.add_argument("--impls", default="msjax,torch")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's peak (dense, this dtype) for MFU")
  p.add_argument("--worker", choices=sorted(WORKERS))
  args = p.parse_args(argv)
  if args.worker:
    out = WORKERS[args.worker](args.archs, args.reps)
    out["peak_rss_mib"] = __import__("resource").getrusage(
        __import__("resource").RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))
    return
  parts = run("convparts", "resnet50", 1)
  print(json.dumps(parts["gflops"]), flush=True)
  results = []
  for arch in args.archs.split(","):
    for impl in args.impls.split(","):
      results.append(run(impl, arch, args.reps))
      print(json.dumps({k: v for k, v in results[-1].items() if k != "times"}), flush=True)
  lines = ["| arch | impl | s/step | images/s | vs torch | peak RSS | notes |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    ref = next((t for t in results if t["arch"] == r["arch"] and t["impl"] == "torch"), None)
    ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else ""
    note = ""
    if r["impl"] == "msjax" and r.get("gflops_per_s"):
      note = f"{r['flops'] / 1e9:.0f} GFLOP/step, {r['gflops_per_s']:.0f} GFLOP/s on {r['device']}"
      if args.peak_tflops:
        note += f", MFU {r['gflops_per_s'] / 1e3 / args.peak_tflops:.1%}"
    if r["impl"] == "torch":
      note = f"torch {r['torch']}, {r['threads']} threads"
    lines.append(f"| {r['arch']} | {r['impl']} | {r['seconds']:.2f} | "
                 f"{r['images_per_s']:.1f} | {ratio} | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                 f"{note} |")
  lines += ["", "One 3x3 convolution, 64->64 channels on [16, 56, 56, 64] (GFLOP/s; the "
            "torch gradients include their forward):", "", "| part | GFLOP/s |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in parts["gflops"].items()]
  md = "\n".join(lines) + "\n"
  print(md)
  machine.write_results(
      "step_speed", dict(steps=results, conv_parts=parts["gflops"]),
      "# Training step speed (batch 80, float32, forward + backward)\n\n"
      "Generated by `benchmarks/step_speed.py`.\n\n" + md)


if __name__ == "__main__":
  main()
