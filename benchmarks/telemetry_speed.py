#!/usr/bin/env python
"""What the pair-weight telemetry costs the training loop.

The training loop calls ``telemetry.make_telemetry_fn``'s function once per logging step,
on the embeddings the step already returned. Measured in one process, on 1 device:

* ``synthetic``: the step of ``configs/synthetic.py`` (small CNN, P×K = 16×4, 64-d; random
  uint8 images on the device) against the telemetry of its embeddings, each waited for,
  median of the timed calls after warm-up. The overhead per logging step is their ratio;
  per step, that ratio divided by ``log_every``.
* ``loss at B``: at larger batches and 512-d (P×5, random unit embeddings), the telemetry
  against the part of the step it most resembles, the global-batch MS loss's value and
  gradient with respect to the embeddings (``losses.global_batch_loss`` in
  ``jax.shard_map``, as the step runs it). The network's forward and backward come on top
  of that in a real step, so the ratio is an upper bound on the overhead per logging step.

Usage::

    python benchmarks/telemetry_speed.py            # writes benchmarks/results/telemetry_speed.*
    python benchmarks/telemetry_speed.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  from msjax.config import load_config_file
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def synthetic(calls):
  import jax

  from msjax import sharding, telemetry, train
  c = load_config("synthetic")
  mesh = sharding.make_mesh(jax.devices()[:1])
  tx = train.build_optimizer(c.optim, c.train.num_steps)
  model, state = train.init_state(c, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, c.loss)
  p, k, size = c.data.classes_per_batch, c.data.images_per_class, c.data.image_size
  rng = np.random.default_rng(0)
  batched = sharding.batch_sharded(mesh)
  images = jax.device_put(rng.integers(0, 256, (p * k, size, size, 3), dtype=np.uint8),
                          batched)
  labels = jax.device_put(np.repeat(np.arange(p, dtype=np.int32), k), batched)
  tele = telemetry.make_telemetry_fn(mesh, c.loss.name, train.loss_kwargs(c.loss))

  holder = {"state": state}

  def one_step():
    holder["state"], out = step(holder["state"], images, labels)
    return out

  out = one_step()
  step_s = timing.median_seconds(one_step, warmup=3, calls=calls)
  tele_s = timing.median_seconds(tele, out["embeddings"], labels, warmup=3, calls=calls)
  return {"batch": p * k, "dim": c.model.embedding_dim, "step_s": step_s,
          "telemetry_s": tele_s, "per_log_step": tele_s / step_s,
          "log_every": c.train.log_every,
          "per_step_at_log_every": tele_s / step_s / c.train.log_every}


def loss_vs_telemetry(batch, dim, calls):
  import jax
  from jax.sharding import PartitionSpec

  from msjax import losses, sharding, telemetry, train
  from msjax import config as config_lib
  loss_cfg = config_lib.base_config().loss
  hp = train.loss_kwargs(loss_cfg)
  mesh = sharding.make_mesh(jax.devices()[:1])
  axis = sharding.BATCH_AXIS
  loss_fn = jax.shard_map(
      functools.partial(losses.global_batch_loss, axis_name=axis, loss="ms", **hp),
      mesh=mesh, in_specs=(PartitionSpec(axis), PartitionSpec(axis)),
      out_specs=PartitionSpec())
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  tele = telemetry.make_telemetry_fn(mesh, "ms", hp)
  rng = np.random.default_rng(1)
  p = batch // 5
  labels = np.repeat(np.arange(p, dtype=np.int32), 5)
  centres = rng.normal(size=(p, dim))
  emb = centres[labels] + 2.0 * rng.normal(size=(batch, dim))
  emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
  batched = sharding.batch_sharded(mesh)
  emb, labels = jax.device_put(emb, batched), jax.device_put(labels, batched)
  loss_s = timing.median_seconds(value_and_grad, emb, labels, warmup=2, calls=calls)
  tele_s = timing.median_seconds(tele, emb, labels, warmup=2, calls=calls)
  return {"batch": batch, "dim": dim, "loss_grad_s": loss_s, "telemetry_s": tele_s,
          "ratio": tele_s / loss_s}


def markdown(meta, syn, rows):
  lines = [
      "# Pair-weight telemetry cost (`benchmarks/telemetry_speed.py`)", "",
      f"{meta['cpu']}, {meta['cpu_count']} cores, jax {meta['jax']}, {meta['date']}, "
      f"commit {meta['git_head'][:10]} ({meta['msjax_tree']}). Medians, 1 device.", "",
      "| what | batch × dim | step or loss | telemetry | ratio |", "|---|---|---|---|---|",
      f"| synthetic training step | {syn['batch']} × {syn['dim']} | "
      f"{1e3 * syn['step_s']:.1f} ms (step) | {1e3 * syn['telemetry_s']:.2f} ms | "
      f"{syn['per_log_step']:.3f} per logging step, {syn['per_step_at_log_every']:.4f} per "
      f"step at log_every={syn['log_every']} |"]
  for r in rows:
    lines.append(f"| MS loss value + gradient | {r['batch']} × {r['dim']} | "
                 f"{1e3 * r['loss_grad_s']:.1f} ms (loss) | {1e3 * r['telemetry_s']:.1f} ms | "
                 f"{r['ratio']:.2f} of the loss alone |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  import jax
  calls = 5 if args.quick else 30
  syn = synthetic(calls)
  print(json.dumps(syn))
  rows = []
  for batch in ((80, 320) if args.quick else (80, 320, 1000)):
    rows.append(loss_vs_telemetry(batch, 512, max(3, calls // 3)))
    print(json.dumps(rows[-1]))
  meta = machine.environment(jax=jax.__version__)
  md = markdown(meta, syn, rows)
  print(md)
  if not args.quick:
    machine.write_results("telemetry_speed", {"environment": meta, "synthetic": syn,
                                              "loss": rows}, md, indent=2)


if __name__ == "__main__":
  main()
