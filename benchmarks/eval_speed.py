#!/usr/bin/env python
"""Retrieval evaluation on a Stanford-Online-Products-sized test set: msjax against faiss.

What is measured, side by side in one run on this machine:

* ``msjax``   ``msjax.evaluate.retrieval_metrics(emb, labels, ks=(1, 10, 100, 1000))``:
              exact Recall@{1,10,100,1000}, P@1, R-Precision and MAP@R, queries against
              each other (self excluded). Compiling is timed apart (first call).
* ``faiss``   faiss-cpu ``IndexFlatIP``: ``add`` + ``search(emb, k=1001)`` (1000
              neighbours after dropping the query itself), then the same metrics from
              the neighbour lists with vectorised NumPy. Time = search + metrics.
* ``pieces``  msjax's pass taken apart (matmul, counts, group maxima, top-R stage), each
              piece jitted alone: where its time goes.
* ``floor``   the matmul work every exact method does, at the best rate XLA reaches on
              this machine (``[4096, 512] × [512, N]`` row blocks or ``1024 × 1024``
              tiles): ``2·N²·D`` flops for the full similarity matrix, half of it when
              only the blocks on and above the diagonal are needed (msjax's symmetric
              pass).

Each runs in its own subprocess, so the peak RSS (``ru_maxrss`` of that child from
``os.wait4``) is per implementation; it includes the Python/JAX runtime and the
embeddings themselves (N·D·4 bytes = 118 MiB).

Data: N = 60,502 embeddings of dimension 512 in 11,316 classes with SOP's class sizes
(2 to 12 images, mean 5.35); each image is ``normalize(centre[label] + σ·noise)`` in a
random 64-dimensional subspace plus a little isotropic noise, with σ set so that
Recall@1 is about 0.75, as for a trained model. Both implementations must report the
same metric values; the run records the largest difference.

Usage::

    python benchmarks/eval_speed.py                 # full run, writes benchmarks/results/
    python benchmarks/eval_speed.py --n 15000       # a smaller set (not written)
    python benchmarks/eval_speed.py --worker msjax  # one measurement, prints RESULT json
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
N_SOP, CLASSES_SOP, D = 60502, 11316, 512
KS = (1, 10, 100, 1000)
SEED = 0


def class_sizes(n, classes, rng):
  """``classes`` sizes in [2, 12] summing to ``n`` (SOP: 60,502 images in 11,316)."""
  mean = n / classes
  if not 2 <= mean <= 12:
    raise ValueError(f"{n} images in {classes} classes cannot have sizes in [2, 12]")
  sizes = 2 + rng.binomial(10, (mean - 2) / 10, size=classes)
  while sizes.sum() != n:  # nudge random classes within [2, 12] to the exact total
    i = rng.integers(classes)
    step = 1 if sizes.sum() < n else -1
    if 2 <= sizes[i] + step <= 12:
      sizes[i] += step
  return sizes


def make_data(n=N_SOP, classes=None, d=D, sigma=1.0, seed=SEED):
  rng = np.random.default_rng(seed)
  classes = classes or max(1, round(n * CLASSES_SOP / N_SOP))
  labels = np.repeat(np.arange(classes), class_sizes(n, classes, rng))
  labels = labels[rng.permutation(n)]
  basis = np.linalg.qr(rng.normal(size=(d, 64)))[0].T  # [64, d], orthonormal rows
  centres = rng.normal(size=(classes, 64)) / 8.0
  x = (centres[labels] + sigma * rng.normal(size=(n, 64)) / 8.0) @ basis
  x += 0.02 * rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels.astype(np.int64)


def metrics_from_neighbours(nbr, labels, ks=KS):
  """The metrics of ``msjax.evaluate`` from ranked neighbour lists (self already removed)."""
  counts = np.bincount(labels)
  r = counts[labels] - 1
  has = r > 0
  rel = labels[nbr] == labels[:, None]
  any_rel = rel.any(axis=1)
  first = np.where(any_rel, rel.argmax(axis=1), nbr.shape[1])
  out = {f"recall@{k}": float(np.mean(first[has] < k)) for k in ks}
  out["precision@1"] = float(np.mean(first[has] == 0))
  width = int(r.max())
  top = rel[:, :width] & (np.arange(width)[None, :] < r[:, None])
  hits = top.sum(axis=1)
  prec = np.cumsum(top, axis=1) / np.arange(1, width + 1)
  ap = (prec * top).sum(axis=1) / np.maximum(r, 1)
  out["r_precision"] = float(np.mean(hits[has] / r[has]))
  out["map@r"] = float(np.mean(ap[has]))
  return out


# --- workers (each in its own subprocess) ----------------------------------------------------


def worker_msjax(x, labels, args):
  import jax
  from msjax.evaluate import retrieval_metrics
  kw = dict(ks=KS, tile_size=args.tile, group_size=args.group)
  t0 = time.perf_counter()
  retrieval_metrics(x, labels, **kw)
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    m = retrieval_metrics(x, labels, **kw)
    times.append(time.perf_counter() - t0)
  return dict(seconds=float(np.median(times)), times=times, first_call_s=first,
              metrics=m, device=str(jax.devices()[0].device_kind))


def worker_faiss(x, labels, args):
  import faiss
  times, m = [], None
  for _ in range(args.reps):
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nbr = index.search(x, KS[-1] + 1)
    # Drop the query itself wherever faiss put it; keep the first 1000 others.
    own = nbr == np.arange(len(x))[:, None]
    own[own.sum(axis=1) == 0, -1] = True
    nbr = nbr[~own].reshape(len(x), KS[-1])
    m = metrics_from_neighbours(nbr, labels)
    times.append(time.perf_counter() - t0)
  return dict(seconds=float(np.median(times)), times=times, metrics=m,
              threads=faiss.omp_get_max_threads())


def worker_floor(x, labels, args):
  """XLA's matmul rate here, at the better of two shapes: [4096, D] x [D, N] row blocks
  and the [1024, D] x [D, 1024] tiles msjax uses."""
  import jax
  import jax.numpy as jnp
  n, d = x.shape
  f = jax.jit(lambda q, g: jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST))
  rates = {}
  for name, q, g in (("rows_4096xN", x[:4096], x), ("tile_1024", x[:1024], x[1024:2048])):
    q, g = jnp.asarray(q), jnp.asarray(g)
    seconds = timing.median_seconds(f, q, g, calls=5 if name.startswith("rows") else 50)
    rates[name] = 2 * q.shape[0] * g.shape[0] * d / seconds / 1e9
  best = max(rates.values())
  full = 2 * n * n * d / (best * 1e9)
  return dict(seconds=full, half_s=full / 2, gflops=best, gflops_by_shape=rates)


def worker_pieces(x, labels, args):
  """msjax's pass, piece by piece at the default tile and group (each jitted alone):
  seconds per tile pair, times the number of pairs, and the final top-R stage."""
  import jax
  import jax.numpy as jnp
  from msjax import evaluate as E
  from msjax import knn
  n, d = x.shape
  tile = E.DEFAULT_TILE_SIZE
  rows = -(-n // tile) * tile
  group = knn.group_size(tile, rows, rows, None)
  pairs = (rows // tile) * (rows // tile + 1) // 2
  a, b = jnp.asarray(x[:tile]), jnp.asarray(x[tile:2 * tile])
  block = jnp.dot(a, b.T)
  ids = jnp.asarray(labels[:tile].astype(np.int32))
  s, i = block.max(axis=1), jnp.argmax(block, axis=1).astype(jnp.int32)

  def per_call(f, *xs, reps=30):
    f = jax.jit(f)
    jax.block_until_ready(f(*xs))
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(*xs)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps

  hi = jax.lax.Precision.HIGHEST
  pieces = {
      "matmul": per_call(lambda a, b: jnp.dot(a, b.T, precision=hi), a, b),
      "count (rows)": per_call(lambda t: E._count_before(t, 0, ids, ids, s, i, num_cols=n,
                                                         axis=1), block),
      "count (columns)": per_call(lambda t: E._count_before(t, 0, ids, ids, s, i,
                                                            num_cols=n, axis=0), block),
      "group maxima (rows)": per_call(lambda t: knn.group_max(t, 0, group=group,
                                                             num_cols=n, axis=1), block),
      "group maxima (columns)": per_call(lambda t: knn.group_max(t, 0, group=group,
                                                                num_cols=n, axis=0), block),
  }
  out = {k: v * pairs for k, v in pieces.items()}
  k = int(np.bincount(labels).max()) - 1
  table = jnp.asarray(np.random.default_rng(0).normal(size=(rows, rows // group)),
                      jnp.float32)
  out["top groups"] = per_call(lambda t: knn.top_indices(t, k + 1), table, reps=2)
  cand = jnp.asarray(np.random.default_rng(1).integers(0, n, (rows, (k + 1) * group)),
                     jnp.int32)
  g = jnp.asarray(x)

  def rescore(q, cand):
    def one(args):
      qq, c = args
      return jax.lax.top_k(jnp.einsum("d,cd->c", qq, g[c], precision=hi), k)[1]
    return jax.lax.map(one, (q, cand), batch_size=16)

  out["rescore top R"] = per_call(rescore, jnp.asarray(np.resize(x, (rows, d))), cand, reps=2)
  return dict(seconds=sum(out.values()), pieces=out, pairs=pairs, tile=tile, group=group)


WORKERS = {"msjax": worker_msjax, "faiss": worker_faiss, "floor": worker_floor,
           "pieces": worker_pieces}


def run_worker(impl, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--n", str(args.n),
         "--reps", str(args.reps)]
  if args.tile:
    cmd += ["--tile", str(args.tile)]
  if args.group:
    cmd += ["--group", str(args.group)]
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO)
  out, err = proc.communicate()
  wall = time.monotonic() - t0
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{impl} failed (exit {proc.returncode}):\n{err[-3000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  result.update(impl=impl, wall_s=wall)
  return result


def environment():
  import jax
  versions = dict(jax=jax.__version__)
  try:
    import faiss
    versions["faiss"] = faiss.__version__
  except ImportError:
    pass
  return machine.environment(**versions)


def markdown(meta, res):
  m, f, fl = res["msjax"], res["faiss"], res["floor"]
  keys = [f"recall@{k}" for k in KS] + ["precision@1", "r_precision", "map@r"]
  lines = [
      "# Retrieval evaluation speed: SOP-sized test set, CPU", "",
      f"{meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}, faiss "
      f"{meta.get('faiss', '?')}; {meta['date']}; msjax git {meta['git_head'][:12]} "
      f"({meta['msjax_tree']}). N={meta['n']}, D={D}, queries against each other. "
      "Generated by `benchmarks/eval_speed.py`.", "",
      "| impl | seconds | vs faiss | peak RSS |", "|---|---|---|---|",
      f"| msjax `retrieval_metrics` (Recall@1/10/100/1000 + P@1, R-Prec, MAP@R) | "
      f"{m['seconds']:.1f} s (first call {m['first_call_s']:.1f} s) | "
      f"{m['seconds'] / f['seconds']:.2f}x | {m['peak_rss_mib'] / 1024:.2f} GiB |",
      f"| faiss `IndexFlatIP` search k=1001 + the same metrics | {f['seconds']:.1f} s | "
      f"1.00x | {f['peak_rss_mib'] / 1024:.2f} GiB |",
      f"| matmul floor, full N×N ({fl['gflops']:.0f} GFLOP/s) | {fl['seconds']:.1f} s | "
      f"{fl['seconds'] / f['seconds']:.2f}x | |",
      f"| matmul floor, blocks on and above the diagonal | {fl['half_s']:.1f} s | "
      f"{fl['half_s'] / f['seconds']:.2f}x | |", "",
      "| metric | msjax | faiss |", "|---|---|---|",
  ]
  lines += [f"| {k} | {m['metrics'][k]:.6f} | {f['metrics'][k]:.6f} |" for k in keys]
  lines += ["", f"Largest difference between the two: {res['max_metric_diff']:.2e} "
            f"(one query of {meta['n']} is {1 / meta['n']:.1e})."]
  if "pieces" in res:
    pc = res["pieces"]
    lines += ["", f"Where msjax's time goes: each piece jitted alone at tile {pc['tile']}, "
              f"group {pc['group']}, times {pc['pairs']} tile pairs; the last two run once.",
              "", "| piece | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in pc["pieces"].items()]
    lines += [f"| sum | {pc['seconds']:.1f} |"]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=N_SOP)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--tile", type=int, default=None)
  p.add_argument("--group", type=int, default=None)
  p.add_argument("--impls", default="floor,pieces,msjax,faiss")
  p.add_argument("--worker", choices=sorted(WORKERS))
  args = p.parse_args(argv)
  if args.worker:
    x, labels = make_data(args.n)
    out = WORKERS[args.worker](x, labels, args)
    out["peak_rss_mib"] = __import__("resource").getrusage(
        __import__("resource").RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(out))
    return
  res = {}
  for impl in args.impls.split(","):
    res[impl] = run_worker(impl, args)
    print(impl, json.dumps({k: v for k, v in res[impl].items() if k != "times"}), flush=True)
  if {"msjax", "faiss", "floor"} <= res.keys():
    res["max_metric_diff"] = max(abs(res["msjax"]["metrics"][k] - res["faiss"]["metrics"][k])
                                 for k in res["faiss"]["metrics"])
    meta = dict(environment(), n=args.n)
    md = markdown(meta, res)
    print(md)
    if args.n == N_SOP and args.tile is None and args.group is None:
      machine.write_results("eval_speed", dict(meta=meta, results=res), md)


if __name__ == "__main__":
  main()
