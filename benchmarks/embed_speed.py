#!/usr/bin/env python
"""Embedding throughput of ``msjax.embed``, with the input pipeline's ceiling beside it.

What is measured, in one process on this machine (images/s, the run's model with random
weights: the speed does not depend on them):

* ``pipeline``  the evaluation input pipeline alone (``data.pipeline.eval_dataset``:
                decode, resize, center crop, batch), every batch consumed and dropped:
                the most any embedding of these images can reach.
* ``model``     the embedding function alone (``train.make_embed_fn``) on one batch
                already on the device, waited for: the most the model can reach.
* ``embed``     ``msjax.embed.embed_split``: the two together, as
                ``python -m msjax.embed`` runs them (placement, the embedding, fetching
                the results, the progress line).

Sources: ``folder``, a tree of JPEG photos-sized files written once into a temporary
folder (``--images``, decoded by PIL), and ``synthetic``, the embedded default's test split
(rendered on the fly). Configs: ``synthetic`` (small CNN, 32 px: eval resize 36, crop 32
for the JPEGs) and, with ``--arch bninception``, ``configs/cub.py`` (BN-Inception, resize
256, crop 227), which takes minutes per hundred images on this CPU.

Usage::

    python benchmarks/embed_speed.py                 # small CNN; writes benchmarks/results/
    python benchmarks/embed_speed.py --arch bninception --images 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jpegs(directory, n, seed=0):
  """``n`` JPEG files of about 500 × 375 (benchmark photographs' size) in subfolders."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (94, 125, 3), dtype=np.uint8)
  for i in range(n):
    sub = os.path.join(directory, f"class{i % 50:03d}")
    os.makedirs(sub, exist_ok=True)
    pixels = np.roll(base, i, axis=1).repeat(4, axis=0).repeat(4, axis=1)[:375, :500]
    Image.fromarray(pixels).save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def make_run(arch):
  """A restored-run stand-in: the config's model with fresh weights on every device."""
  import jax

  from msjax import analysis, data, sharding, train
  from msjax.config import load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "synthetic.py" if arch == "small_cnn"
                                    else "cub.py"))
  if arch == "small_cnn":
    c.data.resize_to = 36  # the JPEGs are photographs; the synthetic images are 32 px
  c.model.pretrained = ""
  mesh = sharding.make_mesh()
  tx = train.build_optimizer(c.optim, c.train.num_steps)
  model, state = train.init_state(c, tx, mesh, seed=0)
  dataset = data.load_dataset(c.data) if arch == "small_cnn" else None
  return analysis.Run(c, model, state, dataset, mesh, 0), jax


def measure(run, split, batch_size):
  import jax

  from msjax import data as data_lib
  from msjax import embed, train
  from msjax.data import pipeline
  d = run.config.data
  transform = data_lib.image_transform(d, train=False)
  n = len(split)
  t0 = time.perf_counter()
  for _ in pipeline.eval_dataset(split, transform, batch_size=batch_size,
                                 num_workers=d.num_workers, num_threads=d.num_threads,
                                 prefetch=d.prefetch):
    pass
  pipeline_s = time.perf_counter() - t0
  batch = data_lib.to_global(next(iter(pipeline.eval_dataset(
      split, transform, batch_size=batch_size, num_workers=0))), run.mesh)
  fn = train.make_embed_fn(run.model, run.mesh)
  model_s = timing.median_seconds(fn, run.state, batch["image"], calls=5, warmup=1)
  embed.embed_split(run, split, batch_size=batch_size, progress=False)  # compiled now
  t0 = time.perf_counter()
  result = embed.embed_split(run, split, batch_size=batch_size, progress=False)
  embed_s = time.perf_counter() - t0
  assert len(result.paths) == n, (len(result.paths), n)
  return {"images": n, "batch_size": batch_size, "devices": jax.device_count(),
          "pipeline_images_per_s": n / pipeline_s,
          "model_images_per_s": batch_size / model_s,
          "embed_images_per_s": n / embed_s}


def markdown(meta, rows):
  lines = [
      "# Embedding throughput (`benchmarks/embed_speed.py`)", "",
      f"{meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}; {meta['date']}; msjax "
      f"git {meta['git_head'][:12]} ({meta['msjax_tree']}).", "",
      "| arch | source | images | batch | pipeline alone img/s | model alone img/s | "
      "`msjax.embed` img/s | of the ceiling |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ceiling = min(r["pipeline_images_per_s"], r["model_images_per_s"])
    lines.append(
        f"| {r['arch']} | {r['source']} | {r['images']:,} | {r['batch_size']} | "
        f"{r['pipeline_images_per_s']:,.0f} | {r['model_images_per_s']:,.0f} | "
        f"{r['embed_images_per_s']:,.0f} | {r['embed_images_per_s'] / ceiling:.0%} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=("small_cnn", "bninception"), default="small_cnn")
  p.add_argument("--images", type=int, default=2048, help="JPEG files in the folder")
  p.add_argument("--batch-size", type=int, default=256)
  args = p.parse_args(argv)
  run, jax = make_run(args.arch)
  from msjax import embed
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(tmp, args.images)
    sources = {"folder (JPEG)": embed.image_folder(tmp)}
    if run.dataset is not None:
      sources["synthetic test split"] = embed.dataset_split(run, "test")
    for name, split in sources.items():
      row = dict(arch=args.arch, source=name, **measure(run, split, args.batch_size))
      print(row, flush=True)
      rows.append(row)
  meta = machine.environment(jax=jax.__version__)
  md = markdown(meta, rows)
  print(md)
  if args.arch == "small_cnn" and args.images == 2048 and args.batch_size == 256:
    machine.write_results("embed_speed", dict(meta=meta, rows=rows), md)


if __name__ == "__main__":
  main()
