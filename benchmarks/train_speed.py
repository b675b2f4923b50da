#!/usr/bin/env python
"""Full training-step speed: ``msjax.train.make_train_step`` as ``python -m msjax.main`` runs it.

The step measured is the whole jitted update: uint8 → normalised images, forward, the
global-batch MS loss (``losses.global_batch_loss`` inside ``jax.shard_map``), backward,
and the Adam update (``train.build_optimizer``), state donated. Compiling is timed apart
(``step.lower(...)`` = trace + lower, ``.compile()``); the steps are then run through
the compiled object, each one waited for (``block_until_ready`` on the new state and
the metrics), after some warm-up steps. s/step is the mean of the timed steps (the
median and the spread are in the JSON); steps/s = 1 / s/step, images/s = batch × steps/s;
"cores busy" is the process's CPU time over the wall time of the timed steps (XLA's
threads and the input threads together, out of ``os.cpu_count()``).

What is measured, each in its own subprocess:

* ``synthetic``    ``configs/synthetic.py`` (``small_cnn``, 32 px, P×K = 16×4 = 64, 64-d)
                   on 1 device: 50 steps after 3 warm-up, the batches already on the
                   device (4 real pipeline batches, cycled): the pure step.
* ``pipeline``     the same config end to end with its real input pipeline
                   (``GlobalBatches`` over ``train_batches``: images rendered on read,
                   2 threads in this process, the config's own settings) and the jitted
                   step called as the training loop calls it (no wait per step, one
                   ``block_until_ready`` at the end): s/step = wall time / steps, and the
                   time spent inside ``next(batches)``. Before that, the pipeline alone
                   (batches/s, nothing else running) and, after, the pure step again in
                   the same process, so the input overhead is read against a step timed
                   under the same conditions.
* ``sharded``      the synthetic step on 8 virtual CPU devices
                   (``jax_num_cpu_devices=8`` set before JAX starts), same global batch
                   of 64 (8 per device), same CPU cores, against the 1-device step: the
                   ratio is the cost of sharding (8 small convolutions instead of one
                   large, the BatchNorm and gradient all-reduces, the loss's all-gather).
                   A 1-device mesh inside the 8-device process is run as a control. The
                   compiled step's temporary memory per device (``train.step_memory``) is
                   reported for all three.
* ``bninception``  ``configs/cub.py`` (BN-Inception, 227 px, P×K = 16×5 = 80, 512-d,
                   frozen BatchNorm) with random weights (``model.pretrained=""``) and
                   random uint8 images (no data needed), float32, 1 device: 2 timed steps
                   after 1 warm-up (about a minute a step on a 2-core CPU). The compiled
                   step's FLOPs (XLA cost analysis) give the achieved GFLOP/s.
* ``gpu``          only where ``jax.devices()[0].platform == "gpu"``: the same BN-Inception
                   step in bfloat16 (``model.dtype="bfloat16"``) at batch 80 (16×5) and
                   1,000 (200×5) on one device, 10 timed steps after 2 warm-up, and the
                   model-FLOPs utilisation MFU = XLA cost-analysis FLOPs of the compiled
                   step / s/step / ``--peak-tflops`` (dense bf16 peak of the device;
                   default 989, H100/H200 SXM). Elsewhere it reports that it was skipped.

The machine's load average is recorded before and after: the timings include whatever
else runs on the same cores.

Usage::

    python benchmarks/train_speed.py                     # full run, writes benchmarks/results/
    python benchmarks/train_speed.py --quick             # fewer steps, BN-Inception at batch 10
    python benchmarks/train_speed.py --skip-bninception  # the synthetic parts only
    python benchmarks/train_speed.py --gpu-only          # on a GPU host: prints JSON
    python benchmarks/train_speed.py --gpu-only --peak-tflops 312   # e.g. an A100
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM


def load_config(name):
  from msjax.config import load_config_file
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def bninception_config(batch, dtype="float32"):
  """``configs/cub.py`` at ``batch`` = P × 5, random weights."""
  c = load_config("cub")
  if batch % c.data.images_per_class:
    raise ValueError(f"batch {batch} is not a multiple of K={c.data.images_per_class}")
  c.data.classes_per_batch = batch // c.data.images_per_class
  c.model.pretrained = ""
  c.model.dtype = dtype
  return c


# --- helpers run inside the workers -----------------------------------------------------------


def _cost_flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _memory(compiled):
  """What ``train.step_memory`` reports, from an already compiled step."""
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes)}


def _compile(step, state, images, labels):
  t0 = time.perf_counter()
  lowered = step.lower(state, images, labels)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, dict(lower_s=lower_s, compile_s=time.perf_counter() - t0)


def _time_steps(fn, state, batches, warmup, steps):
  """Runs ``warmup`` then ``steps`` steps, each waited for; returns the state and stats."""
  import jax
  losses = []
  for i in range(warmup):
    state, metrics = fn(state, *batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
  times = []
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = fn(state, *batches[(warmup + i) % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  return state, dict(_stats(times, losses), cores_busy=cpu)


def _stats(times, losses=()):
  t = np.asarray(times)
  out = dict(seconds=float(t.mean()), median_s=float(np.median(t)), min_s=float(t.min()),
             max_s=float(t.max()), steps=len(times), times=[float(x) for x in times])
  if len(losses):
    out.update(loss_first=losses[0], loss_last=losses[-1],
               finite=bool(np.all(np.isfinite(losses))))
  return out


def _synthetic_setup(mesh, batches_needed):
  """The synthetic config, its dataset, a fresh state and jitted step on ``mesh``."""
  from msjax import data as data_lib
  from msjax import train
  import jax
  c = load_config("synthetic")
  train.check_config(c, mesh.size, jax.process_count())
  t0 = time.perf_counter()
  ds = data_lib.load_dataset(c.data)
  load_s = time.perf_counter() - t0
  tx = train.build_optimizer(c.optim, c.train.num_steps)
  model, state = train.init_state(c, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, c.loss)
  host = [{k: np.array(v) for k, v in b.items()} for b in data_lib.train_batches(
      ds.train, c.data, seed=0, num_steps=batches_needed, process_index=0, process_count=1)]
  on_device = []
  for b in host:
    g = data_lib.to_global(b, mesh)
    on_device.append((g["image"], g["label"]))
  jax.block_until_ready(on_device)
  return c, ds, tx, state, step, on_device, load_s


# --- workers (each in its own subprocess) ----------------------------------------------------


def worker_synthetic(args):
  """The pure synthetic step on a mesh of ``args.mesh_size`` of ``args.devices`` devices."""
  import jax
  from msjax import sharding, train
  mesh = sharding.make_mesh(jax.devices()[:args.mesh_size or None])
  c, _, _, state, step, batches, load_s = _synthetic_setup(mesh, 4)
  compiled, ctimes = _compile(step, state, *batches[0])
  memory = train.step_memory(step, state, *batches[0])  # JAX's caches: no second compile
  state, st = _time_steps(compiled, state, batches, args.warmup, args.steps)
  batch = c.data.classes_per_batch * c.data.images_per_class
  return dict(st, **ctimes, memory=memory, flops=_cost_flops(compiled), batch=batch,
              mesh_devices=mesh.size, process_devices=jax.device_count(),
              per_device_batch=batch // mesh.size, dataset_load_s=load_s,
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend())


def worker_pipeline(args):
  """The synthetic config end to end: real input pipeline + jitted step, on 1 device."""
  import jax
  from msjax import data as data_lib
  from msjax import sharding
  mesh = sharding.make_mesh(jax.devices()[:1])
  c, ds, _, state, step, batches, load_s = _synthetic_setup(mesh, 4)
  batch = c.data.classes_per_batch * c.data.images_per_class

  def global_batches(n):
    return data_lib.GlobalBatches(data_lib.train_batches(ds.train, c.data, seed=1,
                                                         num_steps=n), mesh)

  # 1. The input pipeline alone: the first batch (thread start-up) excluded.
  it = global_batches(args.steps + 1)
  jax.block_until_ready(next(it))
  t0 = time.perf_counter()
  for b in it:
    jax.block_until_ready(b)
  input_s = (time.perf_counter() - t0) / args.steps
  it.close()

  # 2. End to end, as train_and_evaluate's loop: next(batches) → step, no wait per step.
  it = global_batches(args.warmup + args.steps)
  t0 = time.perf_counter()
  for _ in range(args.warmup):  # the first compiles
    b = next(it)
    state, metrics = step(state, b["image"], b["label"])
    jax.block_until_ready((state, metrics))
  first_s = time.perf_counter() - t0
  waits, losses = [], []
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(args.steps):
    t1 = time.perf_counter()
    b = next(it)
    waits.append(time.perf_counter() - t1)
    state, metrics = step(state, b["image"], b["label"])
    losses.append(metrics["loss"])
  jax.block_until_ready((state, metrics))
  e2e_s = (time.perf_counter() - t0) / args.steps
  cores_busy = (time.process_time() - cpu0) / (e2e_s * args.steps)
  it.close()
  losses = [float(l) for l in losses]

  # 3. The pure step again, in this process, with the jitted function the loop used.
  state, pure = _time_steps(step, state, batches, 1, args.steps)
  return dict(seconds=e2e_s, steps=args.steps, input_only_s=input_s, cores_busy=cores_busy,
              input_wait_s=float(np.sum(waits)) / args.steps,
              input_wait_max_s=float(np.max(waits)), warmup_with_compile_s=first_s,
              pure_same_process=pure, loss_first=losses[0], loss_last=losses[-1],
              finite=bool(np.all(np.isfinite(losses))), batch=batch, mesh_devices=1,
              process_devices=jax.device_count(), per_device_batch=batch,
              dataset_load_s=load_s, num_threads=c.data.num_threads,
              num_workers=c.data.num_workers, prefetch=c.data.prefetch,
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend())


def _bninception_step(batch, dtype, warmup, steps, seed=0):
  """BN-Inception (cub config, random weights) on random uint8 images, 1 device."""
  import jax
  from msjax import sharding, train
  c = bninception_config(batch, dtype)
  mesh = sharding.make_mesh(jax.devices()[:1])
  train.check_config(c, mesh.size, jax.process_count())
  tx = train.build_optimizer(c.optim, c.train.num_steps)
  t0 = time.perf_counter()
  model, state = train.init_state(c, tx, mesh, seed=0)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step = train.make_train_step(model, tx, mesh, c.loss)
  rng = np.random.default_rng(seed)
  size = c.data.image_size
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(c.data.classes_per_batch),
                     c.data.images_per_class).astype(np.int32)
  rng.shuffle(labels)  # P×K batches are not sorted by class
  shard = sharding.batch_sharded(mesh)
  x, y = jax.device_put(images, shard), jax.device_put(labels, shard)
  compiled, ctimes = _compile(step, state, x, y)
  flops = _cost_flops(compiled)
  state, st = _time_steps(compiled, state, [(x, y)], warmup, steps)
  return dict(st, **ctimes, init_s=init_s, flops=flops, memory=_memory(compiled),
              gflops_per_s=flops / st["seconds"] / 1e9 if flops else None, batch=batch,
              image_size=size, dtype=dtype, mesh_devices=1, process_devices=jax.device_count(),
              per_device_batch=batch, device=str(jax.devices()[0].device_kind),
              backend=jax.default_backend())


def worker_bninception(args):
  return _bninception_step(args.batch, "float32", args.warmup, args.steps)


def worker_gpu(args):
  import jax
  platform_ = jax.devices()[0].platform
  if platform_ != "gpu" and not args.allow_cpu:
    return dict(skipped=f"no GPU (jax.devices()[0].platform == {platform_!r})", seconds=0.0)
  out = _bninception_step(args.batch, "bfloat16", args.warmup, args.steps)
  try:
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_device_bytes"] = int(stats.get("peak_bytes_in_use", 0)) or None
  except Exception:  # not every backend reports it
    pass
  return out


WORKERS = {"synthetic": worker_synthetic, "pipeline": worker_pipeline,
           "bninception": worker_bninception, "gpu": worker_gpu}


def run_worker(name, *, devices=1, mesh_size=0, steps, warmup, batch=0, allow_cpu=False,
               verbose=True):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--devices",
         str(devices), "--mesh-size", str(mesh_size), "--steps", str(steps), "--warmup",
         str(warmup), "--batch", str(batch)]
  if allow_cpu:
    cmd.append("--allow-cpu")
  if verbose:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: devices={devices} mesh={mesh_size or devices}"
          f" batch={batch or 'config'} warmup={warmup} steps={steps}; load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
  t0 = time.monotonic()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  wall = time.monotonic() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  res = json.loads(lines[-1][len("RESULT "):])
  res.update(worker=name, wall_s=wall)
  if res.get("seconds"):
    res["steps_per_s"] = 1.0 / res["seconds"]
    res["images_per_s"] = res["batch"] / res["seconds"]
  return res


def environment():
  import jax  # the version only: the parent never starts a backend (a GPU stays free)
  return machine.environment(jax=jax.__version__)


# --- report -----------------------------------------------------------------------------------


def _mib(b):
  return f"{b / 2**20:.1f}" if b is not None else ""


def _row(name, r, *, compile_=True, temp=True, note=""):
  comp = f"{r['lower_s'] + r['compile_s']:.1f}" if compile_ and "compile_s" in r else ""
  mem = _mib(r["memory"]["temp_bytes"]) if temp and "memory" in r else ""
  busy = f"{r['cores_busy']:.2f}" if "cores_busy" in r else ""
  return (f"| {name} | {r['mesh_devices']} | {r['batch']} | {comp} | {r['seconds']:.4g} | "
          f"{r['steps_per_s']:.3g} | {r['images_per_s']:.3g} | {busy} | {mem} | {note} |")


def markdown(meta, res, peak_tflops):
  lines = [
      "# Full training step speed (`make_train_step`: normalise, forward, global-batch MS "
      "loss, backward, Adam)", "",
      f"{meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}; {meta['date']}; msjax "
      f"git {meta['git_head'][:12]} ({meta['msjax_tree']}). Load average (1 min) "
      f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after: other work shared "
      "these cores, so the times include its interference. Generated by "
      "`benchmarks/train_speed.py`.", "",
      "compile = trace + lower + XLA compile of the step (s); s/step = mean of the timed "
      "steps, each waited for (end to end: wall time / steps); cores busy = process CPU "
      f"time / wall time over those steps (of {meta['cpu_count']}); temp = the compiled "
      "step's temporary buffers per device (`train.step_memory`).", "",
      "| measurement | devices | batch | compile s | s/step | steps/s | images/s | "
      "cores busy | temp MiB/device | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
  s1, pipe = res.get("synthetic_1"), res.get("pipeline")
  if s1:
    lines.append(_row("synthetic small_cnn 32 px, data on device", s1,
                      note=f"median {s1['median_s']:.4g} s over {s1['steps']} steps; "
                           f"{s1['flops'] / 1e9:.2f} GFLOP/step"))
  if pipe:
    ps = pipe["pure_same_process"]
    lines.append(_row(
        "synthetic, end to end (`GlobalBatches` over `train_batches`)", pipe, compile_=False,
        temp=False,
        note=f"pure step in the same process {ps['seconds']:.4g} s → input overhead "
             f"{pipe['seconds'] / ps['seconds'] - 1:+.0%}; `next(batches)` "
             f"{pipe['input_wait_s'] * 1e3:.1f} ms/step; pipeline alone "
             f"{pipe['input_only_s'] * 1e3:.1f} ms/batch "
             f"({pipe['batch'] / pipe['input_only_s']:.0f} images/s, "
             f"{pipe['num_threads']} threads, {pipe['num_workers']} workers)"))
  s8, s18 = res.get("synthetic_8"), res.get("synthetic_1of8")
  if s8:
    note = (f"median {s8['median_s']:.4g} s; {s8['per_device_batch']} per device, "
            f"{s8['flops'] / 1e9:.2f} GFLOP/step per device")
    if s1:  # medians: a burst of other work on the cores moves a mean more
      note += (f"; **{s8['median_s'] / s1['median_s']:.2f}x** the 1-device step's time "
               f"(medians; means {s8['seconds'] / s1['seconds']:.2f}x")
      if s18:
        note += f"; vs the control below {s8['median_s'] / s18['median_s']:.2f}x"
      note += (f"), temp/device "
               f"{s8['memory']['temp_bytes'] / s1['memory']['temp_bytes']:.2f}x")
    lines.append(_row("synthetic, 8 virtual CPU devices", s8, note=note))
  if s18:
    lines.append(_row("synthetic, 1-device mesh in the 8-device process (control)", s18,
                      note=f"median {s18['median_s']:.4g} s"))
  bn = res.get("bninception")
  if bn:
    note = (f"{bn['dtype']}, {bn['image_size']} px, random weights and images; "
            f"{bn['flops'] / 1e9:.0f} GFLOP/step, {bn['gflops_per_s']:.1f} GFLOP/s; "
            f"steps {', '.join(f'{t:.1f}' for t in bn['times'])} s")
    ref = os.path.join(RESULTS, "step_speed.json")
    if os.path.exists(ref) and bn["batch"] == 80:
      with open(ref) as f:
        fb = next((r for r in json.load(f)["steps"]
                   if r["impl"] == "msjax" and r["arch"] == "bninception"), None)
      if fb:
        note += f"; forward+backward alone (step_speed.py) {fb['seconds']:.1f} s"
    lines.append(_row("BN-Inception (cub config)", bn, note=note))
  gpu = res.get("gpu", [])
  if gpu and "skipped" in gpu[0]:
    lines += ["", f"GPU part (BN-Inception bf16 at batch 80 and 1,000, MFU): skipped, "
              f"{gpu[0]['skipped']}. On a GPU host: `python benchmarks/train_speed.py "
              "--gpu-only [--peak-tflops N]`."]
  elif gpu:
    lines += ["", f"GPU, BN-Inception bfloat16, peak {peak_tflops:g} TFLOP/s:", "",
              "| batch | compile s | s/step | images/s | TFLOP/step | TFLOP/s | MFU | "
              "temp GiB |", "|---|---|---|---|---|---|---|---|"]
    for g in gpu:
      lines.append(f"| {g['batch']} | {g['lower_s'] + g['compile_s']:.1f} | "
                   f"{g['seconds']:.4g} | {g['images_per_s']:.0f} | {g['flops'] / 1e12:.2f} | "
                   f"{g['flops'] / g['seconds'] / 1e12:.1f} | {g['mfu']:.1%} | "
                   f"{g['memory']['temp_bytes'] / 2**30:.2f} |")
  return "\n".join(lines) + "\n"


def run_gpu(args, verbose=True):
  out = []
  for batch in [int(b) for b in args.gpu_batches.split(",")]:
    r = run_worker("gpu", steps=args.gpu_steps, warmup=args.gpu_warmup, batch=batch,
                   allow_cpu=args.allow_cpu, verbose=verbose)
    if "skipped" in r:
      return [r]
    r["peak_tflops"] = args.peak_tflops
    r["mfu"] = r["flops"] / r["seconds"] / (args.peak_tflops * 1e12) if r["flops"] else None
    out.append(r)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="10 synthetic steps, BN-Inception at batch 10; nothing written")
  p.add_argument("--skip-bninception", action="store_true")
  p.add_argument("--skip-sharded", action="store_true")
  p.add_argument("--gpu-only", action="store_true",
                 help="only the GPU part; prints its JSON (skipped without a GPU)")
  p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                 help="the device's dense bf16 peak, for MFU (default: H100/H200, 989)")
  p.add_argument("--gpu-batches", default="80,1000")
  p.add_argument("--gpu-steps", type=int, default=10)
  p.add_argument("--gpu-warmup", type=int, default=2)
  p.add_argument("--allow-cpu", action="store_true",
                 help="run the GPU part on whatever device there is (to test it)")
  # Worker-only arguments.
  p.add_argument("--worker", choices=sorted(WORKERS))
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--mesh-size", type=int, default=0)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--batch", type=int, default=0)
  args = p.parse_args(argv)

  if args.worker:
    import jax
    if args.devices > 1:  # before anything starts a backend
      jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, REPO)
    out = WORKERS[args.worker](args)
    out["peak_rss_mib"] = __import__("resource").getrusage(
        __import__("resource").RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(out))
    return

  if args.gpu_only:
    print(json.dumps(dict(peak_tflops=args.peak_tflops, gpu=run_gpu(args)), indent=1))
    return

  steps, warmup = (10, 2) if args.quick else (args.steps, args.warmup)
  load_before = os.getloadavg()[0]
  res = {}

  def show(key, r):
    res[key] = r
    print(key, json.dumps({k: v for k, v in r.items()
                           if k not in ("times", "pure_same_process")}), flush=True)

  show("synthetic_1", run_worker("synthetic", steps=steps, warmup=warmup))
  show("pipeline", run_worker("pipeline", steps=steps, warmup=warmup))
  if not args.skip_sharded:
    show("synthetic_8", run_worker("synthetic", devices=8, steps=steps, warmup=warmup))
    show("synthetic_1of8", run_worker("synthetic", devices=8, mesh_size=1, steps=steps,
                                      warmup=warmup))
  if not args.skip_bninception:
    # Quick: batch 10 (2 classes × 5) and one timed step, to check the path only.
    show("bninception", run_worker("bninception", steps=1 if args.quick else 2, warmup=1,
                                   batch=10 if args.quick else 80))
  if args.quick:
    args.gpu_steps, args.gpu_warmup = 2, 1
  res["gpu"] = run_gpu(args)
  print("gpu", json.dumps(res["gpu"]), flush=True)

  meta = dict(environment(), load_before=load_before, load_after=os.getloadavg()[0],
              quick=args.quick, peak_tflops=args.peak_tflops)
  md = markdown(meta, res, args.peak_tflops)
  print(md)
  if not args.quick and not args.skip_bninception and not args.skip_sharded:
    machine.write_results("train_speed", dict(meta=meta, results=res), md)


if __name__ == "__main__":
  main()
