"""Shared by the learning benchmarks (``xbm_learning.py``, ``loss_table.py``): train arms
of the embedded default for a few seeds and report held-out Recall@1.

Each run is ``msjax.train.train_and_evaluate`` in a temporary workdir (the final
checkpoint is written there and dropped); what is kept per run is the final metrics, the
wall time (compile and final evaluation included) and the logged losses. Runs go
seed-major, so an interrupted benchmark still holds every arm for the first seeds and a
burst of load on the shared cores falls on all arms alike; the JSON is rewritten after
every run.
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


def synthetic_config(seed, steps):
  """``configs/synthetic.py`` for one seed, with the speed-only changes every arm shares:
  no untrained evaluation, telemetry, intermediate evaluation or checkpoints."""
  from msjax.config import load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "synthetic.py"))
  c.seed = seed
  c.train.update(num_steps=steps, log_every=50, eval_every=0, checkpoint_every=0,
                 eval_untrained=False, telemetry=False)
  return c


def train_once(c, arm, seed):
  """Trains ``c``; returns its final metrics, time and logged losses."""
  from msjax import metric_writers, train
  log = io.StringIO()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="msjax_learning_") as workdir:
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
  return dict(arm=arm, seed=seed, steps=c.train.num_steps,
              recall_at_1=float(final["recall@1"]),
              metrics={k: v for k, v in final.items() if isinstance(v, (int, float))},
              seconds=seconds, losses=losses, load_after=os.getloadavg()[0])


def raw_pixel_recall():
  from msjax import data as data_lib
  from msjax.data import synthetic
  c = synthetic_config(0, 1)
  return float(synthetic.raw_pixel_recall(data_lib.load_dataset(c.data).test)["recall@1"])


def summarise(runs, arms, describe):
  """Per arm: Recall@1 (%) mean ± sample std (``ddof=1``) over its seeds, and times."""
  rows = []
  for name in arms:
    mine = [r for r in runs if r["arm"] == name]
    if not mine:
      continue
    r1 = np.array([r["recall_at_1"] for r in mine]) * 100
    rows.append(dict(arm=name, setup=describe(name), seeds=[r["seed"] for r in mine],
                     recall_at_1=[float(x) for x in r1], mean=float(r1.mean()),
                     std=float(r1.std(ddof=1)) if len(r1) > 1 else 0.0,
                     seconds=float(sum(r["seconds"] for r in mine)),
                     seconds_per_run=float(np.mean([r["seconds"] for r in mine]))))
  return rows


def table(rows, raw, steps, first_column="arm"):
  lines = [f"Held-out Recall@1 (%), {steps} steps each, configs/synthetic.py; mean ± sample "
           "std over seeds", "",
           f"| {first_column} | setup | Recall@1 | per seed | time (all seeds) | s/run |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    seeds = ", ".join(f"{s}: {v:.1f}" for s, v in zip(r["seeds"], r["recall_at_1"]))
    lines.append(f"| {r['arm']} | {r['setup']} | {r['mean']:.1f} ± {r['std']:.1f} | "
                 f"{seeds} | {r['seconds']:.0f} s | {r['seconds_per_run']:.0f} |")
  if raw is not None:
    lines.append(f"| raw pixels | cosine on mean-centred pixels | {100 * raw:.1f} | | | |")
  return "\n".join(lines)


def run(*, arms, seeds, steps, make_config, describe, out, title, command, write=True,
        first_column="arm", extra_meta=None):
  """Trains every arm for every seed (seed-major) and writes ``<out>.json`` and ``.md``
  under ``benchmarks/results``; ``make_config(arm, seed, steps)`` builds each run."""
  sys.path.insert(0, REPO)
  import jax
  meta = dict(machine.environment(jax=jax.__version__), load_before=os.getloadavg()[0],
              steps=steps, seeds=seeds, arms={a: describe(a) for a in arms},
              config="configs/synthetic.py", command=command, **(extra_meta or {}))
  raw = raw_pixel_recall()
  print(f"raw pixels: Recall@1 {100 * raw:.1f}%", flush=True)
  path = os.path.join(RESULTS, f"{out}.json")
  runs = []
  t_all = time.perf_counter()
  for seed in seeds:
    for name in arms:
      print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} ({describe(name)}); load "
            f"average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
      r = train_once(make_config(name, seed, steps), name, seed)
      runs.append(r)
      last = r["losses"][-1] if r["losses"] else {}
      print(f"  {name} seed {seed}: Recall@1 {100 * r['recall_at_1']:.1f}%, "
            f"{r['seconds']:.0f} s, last losses {json.dumps(last)}", flush=True)
      if write:  # after every run, so an interrupted benchmark keeps its runs
        payload = dict(meta=dict(meta, load_after=os.getloadavg()[0],
                                 total_s=time.perf_counter() - t_all, complete=False),
                       raw_pixel_recall_at_1=raw, arms=summarise(runs, arms, describe),
                       runs=runs)
        with open(path, "w") as f:
          json.dump(payload, f, indent=1)
  rows = summarise(runs, arms, describe)
  meta.update(load_after=os.getloadavg()[0], total_s=time.perf_counter() - t_all,
              complete=True)
  text = table(rows, raw, steps, first_column)
  print(text)
  print(f"total {meta['total_s'] / 60:.1f} min; load average {meta['load_before']:.2f} "
        f"before, {meta['load_after']:.2f} after")
  if write:
    with open(path, "w") as f:
      json.dump(dict(meta=meta, raw_pixel_recall_at_1=raw, arms=rows, runs=runs), f,
                indent=1)
    with open(path[:-len(".json")] + ".md", "w") as f:
      f.write(f"# {title}\n\nGenerated by `{command}`.\n\n{text}\n")
    print(f"wrote {os.path.relpath(path, REPO)} and its .md")
  return rows


def main(argv, *, script, doc, flag, choices, defaults, out, make_config, describe,
         first_column="arm"):
  """The command line the learning benchmarks share: ``--<flag>`` picks arms among
  ``choices`` (default ``defaults``), ``--seeds``, ``--steps``, ``--no-write``, ``--out``."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument(f"--{flag}", default=",".join(defaults),
                 help=f"comma-separated, of {', '.join(choices)}")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--no-write", action="store_true", help="print only")
  p.add_argument("--out", default=out,
                 help="results name: benchmarks/results/<out>.json and .md")
  args = p.parse_args(argv)
  arms = [a for a in getattr(args, flag).split(",") if a]
  unknown = [a for a in arms if a not in choices]
  if unknown:
    p.error(f"unknown {flag} {unknown}; choose from {list(choices)}")
  command = " ".join([f"python benchmarks/{script}",
                      *(argv if argv is not None else sys.argv[1:])])
  return run(arms=arms, seeds=[int(s) for s in args.seeds.split(",")], steps=args.steps,
             make_config=make_config, describe=describe, out=args.out,
             title=doc.splitlines()[0], command=command, write=not args.no_write,
             first_column=first_column)
