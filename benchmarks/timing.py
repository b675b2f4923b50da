"""How benchmarks/ time a call: each call waited for, the median of repeated calls."""

from __future__ import annotations

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
