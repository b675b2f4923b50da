#!/usr/bin/env python
"""Does a cross-batch memory make a small batch learn like a large one? (XBM, CVPR 2020)

The XBM paper's headline effect, on the embedded default (``configs/synthetic.py``:
128 generated training classes × 32 images, 64 held-out classes, ``small_cnn``, 64-d,
MS loss α=2, β=50, λ=0.5, ε=0.1, Adam lr 1e-3 constant, no weight decay). Every arm
trains with ``msjax.train.train_and_evaluate`` for the same number of steps and reports
Recall@1 on the held-out test classes (queries searching each other), for a few seeds
(``config.seed``: the initialisation and the P×K batch sampling; the images are fixed):

* ``small``             P×K = 8×4 = 32, no memory;
* ``small+xbm1024``     the same batch + XBM: 1,024 float32 entries (1/4 of the 4,096
                        training images, 32 batches), weight 1.0, joining after 100 steps;
* ``small+xbm256``      the same with 256 entries (8 batches: fresher, fewer pairs);
* ``small+xbm1024-w0.5`` the 1,024-entry memory at weight 0.5;
* ``large``             P×K = 32×4 = 128, no memory (4× the images per step).

The memory sizes, the weight, the start step (100 = a quarter of the run) and the two
batch shapes are this benchmark's choices; everything else is the config file's. Left
as in the config: 400 steps, flips only. Changed for speed only: no untrained
evaluation, no GPW telemetry, no intermediate evaluation or checkpoints
(``checkpoint_every=0``; the final one is written, into a temporary workdir).

What is reported per arm: Recall@1 mean ± std (the sample std over the seeds,
``ddof=1``), the per-seed values, and the wall time (sum
over seeds, each run's time includes its compile and final evaluation); per run, the
logged ``train/loss`` (``train/batch_loss`` and ``train/memory_loss`` with a memory)
every 50 steps. The raw-pixel baseline (cosine on mean-centred pixels,
``synthetic.raw_pixel_recall``) is the floor. The load average is recorded: the machine
is shared, and the times include whatever else ran.

Usage::

    python benchmarks/xbm_learning.py                  # all arms × seeds 0,1,2; writes
                                                       # benchmarks/results/xbm_learning.json
    python benchmarks/xbm_learning.py --arms small,small+xbm1024 --seeds 0 --no-write
    # the small batch at the large batch's images seen (results/xbm_learning_1600.*):
    python benchmarks/xbm_learning.py --steps 1600 --seeds 0,1,2 \
        --arms small,small+xbm1024,small+xbm1024-w0.5 --out xbm_learning_1600
    python benchmarks/xbm_learning.py --steps 100 --seeds 0 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
K = 4  # images per class in every batch, as in configs/synthetic.py

# name → (classes per batch, XBM settings or None)
ARMS = {
    "small": (8, None),
    "small+xbm1024": (8, dict(size=1024, weight=1.0, start_step=100)),
    "small+xbm256": (8, dict(size=256, weight=1.0, start_step=100)),
    "small+xbm1024-w0.5": (8, dict(size=1024, weight=0.5, start_step=100)),
    "large": (32, None),
}
DEFAULT_ARMS = ("small", "small+xbm1024", "small+xbm256", "large")


def arm_config(name, seed, steps):
  from msjax.config import load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "synthetic.py"))
  classes, xbm = ARMS[name]
  c.seed = seed
  c.data.classes_per_batch = classes
  c.data.images_per_class = K
  c.train.update(num_steps=steps, log_every=50, eval_every=0, checkpoint_every=0,
                 eval_untrained=False, telemetry=False)
  if xbm is not None:
    c.xbm.update(enabled=True, dtype="float32", block_size=0, **xbm)
  return c


def run_one(name, seed, steps):
  """Trains one arm for one seed; returns its final metrics, time and logged losses."""
  from msjax import metric_writers, train
  c = arm_config(name, seed, steps)
  log = io.StringIO()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="xbm_learning_") as workdir:
    try:
      with contextlib.redirect_stdout(log):
        final = train.train_and_evaluate(c, workdir)
    except Exception:
      print(log.getvalue()[-3000:], file=sys.stderr)
      raise
    seconds = time.perf_counter() - t0
    records = metric_writers.read_jsonl(os.path.join(workdir, metric_writers.JSONL_NAME))
  keys = ("train/loss", "train/batch_loss", "train/memory_loss")
  losses = [{"step": int(r["step"]), **{k.split("/")[1]: float(r[k]) for k in keys if k in r}}
            for r in records if "train/loss" in r]
  return dict(arm=name, seed=seed, steps=steps, recall_at_1=float(final["recall@1"]),
              metrics={k: v for k, v in final.items() if isinstance(v, (int, float))},
              seconds=seconds, losses=losses, load_after=os.getloadavg()[0])


def raw_pixel_recall():
  from msjax import data as data_lib
  from msjax.data import synthetic
  c = arm_config("small", 0, 1)
  return float(synthetic.raw_pixel_recall(data_lib.load_dataset(c.data).test)["recall@1"])


def describe(name):
  classes, xbm = ARMS[name]
  text = f"{classes}×{K} = {classes * K}"
  if xbm:
    text += (f" + XBM {xbm['size']:,} entries, weight {xbm['weight']:g}, from step "
             f"{xbm['start_step'] + 1}")
  return text


def summarise(runs, arms):
  rows = []
  for name in arms:
    mine = [r for r in runs if r["arm"] == name]
    if not mine:
      continue
    r1 = np.array([r["recall_at_1"] for r in mine]) * 100
    rows.append(dict(arm=name, setup=describe(name), batch=ARMS[name][0] * K,
                     xbm=ARMS[name][1], seeds=[r["seed"] for r in mine],
                     recall_at_1=[float(x) for x in r1], mean=float(r1.mean()),
                     std=float(r1.std(ddof=1)) if len(r1) > 1 else 0.0,
                     seconds=float(sum(r["seconds"] for r in mine)),
                     seconds_per_run=float(np.mean([r["seconds"] for r in mine]))))
  return rows


def table(rows, raw, steps):
  lines = [f"Held-out Recall@1 (%), {steps} steps each, configs/synthetic.py; mean ± sample "
           "std over seeds", "",
           "| arm | setup | Recall@1 | per seed | time (all seeds) | s/run |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    seeds = ", ".join(f"{s}: {v:.1f}" for s, v in zip(r["seeds"], r["recall_at_1"]))
    lines.append(f"| {r['arm']} | {r['setup']} | {r['mean']:.1f} ± {r['std']:.1f} | "
                 f"{seeds} | {r['seconds']:.0f} s | {r['seconds_per_run']:.0f} |")
  if raw is not None:
    lines.append(f"| raw pixels | cosine on mean-centred pixels | {100 * raw:.1f} | | | |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                 help=f"comma-separated, of {', '.join(ARMS)}")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--no-write", action="store_true", help="print only")
  p.add_argument("--out", default="xbm_learning",
                 help="results name: benchmarks/results/<out>.json and .md")
  args = p.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  sys.path.insert(0, REPO)
  import jax

  meta = dict(machine.environment(jax=jax.__version__), load_before=os.getloadavg()[0],
              steps=args.steps, seeds=seeds, arms={a: describe(a) for a in arms},
              config="configs/synthetic.py", command=" ".join(["python benchmarks/xbm_learning.py",
                                *(argv if argv is not None else sys.argv[1:])]))
  raw = raw_pixel_recall()
  print(f"raw pixels: Recall@1 {100 * raw:.1f}%", flush=True)
  out = os.path.join(RESULTS, f"{args.out}.json")
  runs = []
  t_all = time.perf_counter()
  # Seed-major order: an interrupted run still holds every arm for the first seeds, and
  # a burst of other load on the shared cores falls on all arms alike.
  for seed in seeds:
    for name in arms:
      print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} ({describe(name)}); load "
            f"average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
      r = run_one(name, seed, args.steps)
      runs.append(r)
      last = r["losses"][-1] if r["losses"] else {}
      print(f"  {name} seed {seed}: Recall@1 {100 * r['recall_at_1']:.1f}%, "
            f"{r['seconds']:.0f} s, last losses {json.dumps(last)}", flush=True)
      if not args.no_write:  # after every run, so an interrupted benchmark keeps its runs
        rows = summarise(runs, arms)
        payload = dict(meta=dict(meta, load_after=os.getloadavg()[0],
                                 total_s=time.perf_counter() - t_all, complete=False),
                       raw_pixel_recall_at_1=raw, arms=rows, runs=runs)
        with open(out, "w") as f:
          json.dump(payload, f, indent=1)
  rows = summarise(runs, arms)
  meta.update(load_after=os.getloadavg()[0], total_s=time.perf_counter() - t_all,
              complete=True)
  print(table(rows, raw, args.steps))
  print(f"total {meta['total_s'] / 60:.1f} min; load average {meta['load_before']:.2f} "
        f"before, {meta['load_after']:.2f} after")
  if not args.no_write:
    with open(out, "w") as f:
      json.dump(dict(meta=meta, raw_pixel_recall_at_1=raw, arms=rows, runs=runs), f, indent=1)
    with open(out[:-len(".json")] + ".md", "w") as f:
      f.write(f"# {__doc__.splitlines()[0]}\n\nGenerated by `{meta['command']}`.\n\n"
              f"{table(rows, raw, args.steps)}\n")
    print(f"wrote {os.path.relpath(out, REPO)} and its .md")


if __name__ == "__main__":
  main()
