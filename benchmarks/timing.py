"""How benchmarks/ time a call: each call waited for, the median of repeated calls."""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def wait(out):
  """Returns ``out`` once it is computed: JAX dispatches asynchronously, so its arrays
  (any pytree of them) are waited for; anything else (NumPy, PyTorch on the CPU) already
  is. JAX is not imported here, so a PyTorch-only worker stays free of it."""
  jax = sys.modules.get("jax")
  return jax.block_until_ready(out) if jax is not None else out


def call_seconds(fn, *args, calls: int, warmup: int = 0) -> list[float]:
  """Seconds of each of ``calls`` calls of ``fn(*args)``, each waited for, after
  ``warmup`` untimed calls (compilation, caches)."""
  for _ in range(warmup):
    wait(fn(*args))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    wait(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def median_seconds(fn, *args, calls: int, warmup: int = 1) -> float:
  """The median of ``call_seconds``."""
  return float(np.median(call_seconds(fn, *args, calls=calls, warmup=warmup)))


def busy_cpu_s() -> float:
  """CPU-seconds the whole machine has been busy (all cores), from /proc/stat: what a
  benchmark compares with its own CPU time to see whether something else ran."""
  with open("/proc/stat") as f:
    vals = [int(v) for v in f.readline().split()[1:9]]
  return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_s() -> float:
  """CPU-seconds this process has used."""
  t = os.times()
  return t.user + t.system


def wait_quiet(max_wait_s: float, limit: float):
  """Waits until other processes use at most ``limit`` cores (1 s samples), at most
  ``max_wait_s``; returns ``(seconds waited, last sampled load in cores)``."""
  t0 = time.monotonic()
  while True:
    b0 = busy_cpu_s()
    time.sleep(1.0)
    load = busy_cpu_s() - b0
    if load <= limit or time.monotonic() - t0 >= max_wait_s:
      return time.monotonic() - t0, load
