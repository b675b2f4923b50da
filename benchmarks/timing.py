"""How benchmarks/ time a call: each call waited for, the median of repeated calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
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


def run_measurement(cmd, *, env, cwd, timeout_s: float, quiet_wait_s: float,
                    bg_limit: float, sample_rss: bool = False) -> dict:
  """Runs one measurement ``cmd`` in its own process group after ``wait_quiet``: its last
  ``RESULT <json>`` line, with the child's wall time and peak RSS (``os.wait4``; also a
  ``psutil`` sampled peak with ``sample_rss``) and a status: ``timeout`` (killed after
  ``timeout_s``), ``oom`` (SIGKILL or an out-of-memory error) or ``error``."""
  waited, load = wait_quiet(quiet_wait_s, bg_limit)
  ps = None
  with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=cwd,
                            start_new_session=True)
    if sample_rss:
      import psutil
      try:
        ps = psutil.Process(proc.pid)
      except psutil.Error:
        ps = None
    sampled_peak = 0.0
    timed_out = False
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if ps is not None:
        try:
          sampled_peak = max(sampled_peak, ps.memory_info().rss / 2**20)
        except Exception:  # noqa: BLE001 - the child may have just exited
          pass
      if time.monotonic() - t0 > timeout_s:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        pid, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    fo.seek(0)
    fe.seek(0)
    stdout, stderr = fo.read(), fe.read()
  base = dict(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024.0,
              quiet_wait_s=round(waited, 1), bg_cores_at_start=round(load, 2))
  if sample_rss:
    base["sampled_rss_mib"] = sampled_peak
  if timed_out:
    return dict(base, status="timeout", note=f"killed after {timeout_s:.0f} s")
  results = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode == 0 and results:
    return dict(json.loads(results[-1]), **base)
  tail = stderr.strip().splitlines()[-3:]
  if proc.returncode == -signal.SIGKILL:
    status, note = "oom", "killed by SIGKILL (out of memory)"
  elif any("MemoryError" in t or "RESOURCE_EXHAUSTED" in t or "out of memory" in t.lower()
           for t in tail):
    status, note = "oom", tail[-1] if tail else ""
  else:
    status, note = "error", f"exit {proc.returncode}: " + (" | ".join(tail))
  return dict(base, status=status, note=note[-400:])
