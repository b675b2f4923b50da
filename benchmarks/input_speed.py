#!/usr/bin/env python
"""Training input pipeline throughput on benchmark-sized JPEGs.

What is measured, on this machine:

* ``stages``   one image at a time in one thread: read the file, decode the JPEG, resize
               the short side to 256, RandomResizedCrop 227 (crop + bilinear resize),
               flip, and the eval path's center crop: where a worker's time goes.
* ``msjax``    ``msjax.data.train_dataset`` (P×K = 16×5 batches of 227×227 uint8) with
               0 (in-process, 2 threads), 1 and 2 worker processes, with the training
               augmentation and without it (resize + center crop only): images/s over
               the batches after the first few.
* ``single``   the same with ``single_resize=True`` (the crop resampled straight from
               the decoded image: one resize per image instead of two).
* ``torch``    the same per-image PIL work in a ``torch.utils.data.DataLoader`` with the
               same worker counts and batch size (the pipeline the released PyTorch
               code uses, minus torchvision's thin PIL wrappers): the peer for the
               per-worker rate.
* ``need``     the images/s one host must deliver for a TPU v4-8 training BN-Inception
               at batch 80 and 1,000: the step's FLOPs from XLA's cost analysis of
               msjax's jitted forward+backward at 227×227, over the chips' bf16 peak at
               an assumed model-FLOPs utilisation (MFU), stated in the output.

Data: generated JPEGs of about 500×375 (quality 90; smooth colour fields plus texture;
the texture makes them ~90 KB, larger than most benchmark photographs, so decoding is,
if anything, dearer than on the real data), 16 classes × 20, in a temporary directory.

Usage::

    python benchmarks/input_speed.py             # full run, writes benchmarks/results/
    python benchmarks/input_speed.py --quick     # fewer batches (not written)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

import machine  # benchmarks/machine.py, beside this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from msjax.data import (ImageFiles, ImageTransform, PKSampler, make_split,  # noqa: E402
                        train_dataset, transforms)

CLASSES, PER_CLASS, P, K = 16, 20, 16, 5
TPU_V4_CHIP_BF16_FLOPS = 275e12  # per chip; a v4-8 has 4 chips (8 TensorCores)


def photo_like(rng, width=500, height=375) -> np.ndarray:
  """Smooth colour fields plus fine texture (photograph-sized JPEGs, a little larger)."""
  coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                    np.float32)
  texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
  return np.clip(base + texture, 0, 255).astype(np.uint8)


def write_dataset(root: str, seed=0):
  """``CLASSES × PER_CLASS`` JPEGs in class folders: the split and the file sizes."""
  rng = np.random.default_rng(seed)
  paths, labels, sizes = [], [], []
  for c in range(CLASSES):
    for i in range(PER_CLASS):
      w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
      rel = os.path.join(f"{c:03d}.class", f"{i:04d}.jpg")
      os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(photo_like(rng, w, h)).save(os.path.join(root, rel), "JPEG",
                                                  quality=90)
      paths.append(rel)
      labels.append(c)
      sizes.append(os.path.getsize(os.path.join(root, rel)))
  return make_split("train", ImageFiles(root, paths), labels), sizes


def stage_times(paths, reps=2) -> dict:
  """Milliseconds per image of each stage, one thread."""
  rng = np.random.default_rng(0)
  totals = dict(read=0.0, decode=0.0, resize256=0.0, random_resized_crop=0.0, flip=0.0,
                center_crop=0.0, to_array=0.0)
  n = 0
  for _ in range(reps):
    for path in paths:
      t0 = time.perf_counter()
      with open(path, "rb") as f:
        data = f.read()
      t1 = time.perf_counter()
      img = transforms.decode(data, path)
      t2 = time.perf_counter()
      img = transforms.resize_short_side(img, 256)
      t3 = time.perf_counter()
      box = transforms.random_resized_crop_box(*img.size, (0.16, 1.0), (3 / 4, 4 / 3), rng)
      crop = img.crop((box[0], box[1], box[0] + box[2], box[1] + box[3])).resize(
          (227, 227), Image.Resampling.BILINEAR)
      t4 = time.perf_counter()
      crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      t5 = time.perf_counter()
      box = transforms.center_crop_box(*img.size, 227)
      center = img.crop((box[0], box[1], box[0] + 227, box[1] + 227))
      center.load()
      t6 = time.perf_counter()
      np.asarray(crop, np.uint8)
      t7 = time.perf_counter()
      for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5,
                                t7 - t6)):
        totals[k] += dt
      n += 1
  return {k: 1e3 * v / n for k, v in totals.items()}


def images_per_s(iterator, batches, warmup) -> float:
  """Images/s over ``batches`` P×K batches after ``warmup`` (worker start-up) ones."""
  for _ in range(warmup):
    next(iterator)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * P * K / (time.perf_counter() - t0)


def msjax_rate(split, workers, augment, batches, warmup=3, single_resize=False) -> float:
  sampler = PKSampler(split.labels, P, K, seed=0)
  # Without augmentation: resize + center crop.
  t = ImageTransform(227, 256, train=augment, single_resize=single_resize)
  ds = train_dataset(split, sampler, t, num_steps=warmup + batches, seed=0,
                     num_workers=workers, num_threads=2 if workers == 0 else 1,
                     prefetch=4, process_index=0, process_count=1)
  return images_per_s(iter(ds), batches, warmup)


def torch_rate(split, workers, augment, batches, warmup=3) -> float | None:
  try:
    import torch
    from torch.utils.data import DataLoader, Dataset
  except ImportError:
    return None
  sampler = PKSampler(split.labels, P, K, seed=0)
  order = np.concatenate([sampler.batch(s) for s in range(warmup + batches)])
  t = ImageTransform(227, 256, train=augment)  # without: resize + center crop

  class Images(Dataset):
    def __len__(self):
      return len(order)

    def __getitem__(self, n):
      i = int(order[n])
      rng = np.random.default_rng(n)
      img = t(split.images.read(i), split.images.describe(i), rng)
      return torch.from_numpy(img), int(split.labels[i])

  loader = DataLoader(Images(), batch_size=P * K, num_workers=workers,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
  return images_per_s(iter(loader), batches, warmup)


def bninception_step_flops(batch=80) -> float:
  """XLA's FLOP count of msjax's BN-Inception forward+backward (227×227, 512-d head)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from msjax import losses, models
  model = models.create_model("bninception", 512, rngs=nnx.Rngs(0), frozen_bn=True)
  model.train()
  graphdef, state = nnx.split(model)

  def loss(state, x, y):
    emb = nnx.merge(graphdef, state)(x)
    return losses.ms_loss_from_embeddings(emb, y)

  x = jax.ShapeDtypeStruct((batch, 227, 227, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  cost = jax.jit(jax.grad(loss)).lower(state, x, y).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--mfu", type=float, default=0.5,
                      help="assumed model-FLOPs utilisation of the TPU step")
  args = parser.parse_args(argv)
  batches = 3 if args.quick else args.batches

  with tempfile.TemporaryDirectory() as root:
    split, sizes = write_dataset(root)
    stages = stage_times([split.images.describe(i) for i in range(0, len(split), 4)],
                         reps=1 if args.quick else 2)
    print(json.dumps({"jpeg_kb_mean": np.mean(sizes) / 1024, "stages_ms": stages}),
          flush=True)
    rows = []
    for augment in (True, False):
      for workers in (0, 1, 2):
        row = dict(augment=augment, workers=workers,
                   msjax=msjax_rate(split, workers, augment, batches),
                   torch=torch_rate(split, workers, augment, batches),
                   msjax_single_resize=msjax_rate(split, workers, augment, batches,
                                                  single_resize=True))
        rows.append(row)
        print(json.dumps(row), flush=True)

  flops = {b: bninception_step_flops(b) for b in (80, 1000)}
  chips = 4
  need = {b: chips * TPU_V4_CHIP_BF16_FLOPS * args.mfu / (flops[b] / b) for b in flops}
  best = max(r["msjax"] for r in rows if r["augment"])
  per_worker = next(r["msjax"] for r in rows if r["augment"] and r["workers"] == 1)
  per_worker_single = next(r["msjax_single_resize"] for r in rows
                           if r["augment"] and r["workers"] == 1)
  result = dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
      jpeg_kb_mean=float(np.mean(sizes) / 1024), stages_ms=stages, rows=rows,
      gflop_per_image={b: flops[b] / b / 1e9 for b in flops}, mfu=args.mfu,
      v4_8_images_per_s_needed=need, per_worker_images_per_s=per_worker,
      best_images_per_s=best,
      per_worker_single_resize_images_per_s=per_worker_single,
      workers_needed={b: need[b] / per_worker for b in need},
      workers_needed_single_resize={b: need[b] / per_worker_single for b in need})
  print(json.dumps(result, indent=1))
  if not args.quick:
    machine.write_results("input_speed", result, markdown(result))


def markdown(r) -> str:
  lines = [f"Input pipeline, {r['machine']}, {r['date']}; JPEGs ~500×375, "
           f"{r['jpeg_kb_mean']:.0f} KB mean, P×K = 16×5 batches of 227×227.", "",
           "| stage (one thread) | ms/image |", "|---|---|"]
  lines += [f"| {k} | {v:.2f} |" for k, v in r["stages_ms"].items()]
  lines += ["", "| augmentation | workers | msjax img/s | torch DataLoader img/s | ratio | "
            "msjax single_resize img/s |", "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    t = row["torch"]
    ratio = f"{row['msjax'] / t:.2f}" if t else "—"
    lines.append(f"| {'train' if row['augment'] else 'resize+crop'} | {row['workers']} | "
                 f"{row['msjax']:.0f} | {t and f'{t:.0f}' or '—'} | {ratio} | "
                 f"{row['msjax_single_resize']:.0f} |")
  lines += ["", f"TPU v4-8 (4 chips × 275 TFLOP/s bf16) at {r['mfu']:.0%} MFU, "
            "BN-Inception forward+backward:"]
  for b, need in r["v4_8_images_per_s_needed"].items():
    lines.append(f"- batch {b}: {r['gflop_per_image'][b]:.1f} GFLOP/image → "
                 f"{need:,.0f} images/s → {r['workers_needed'][b]:.0f} workers at "
                 f"{r['per_worker_images_per_s']:.0f} images/s each "
                 f"({r['workers_needed_single_resize'][b]:.0f} with single_resize at "
                 f"{r['per_worker_single_resize_images_per_s']:.0f})")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
