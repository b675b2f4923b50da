#!/usr/bin/env python
"""Pretrained weights by name: the time and memory of a first and a cached use.

What is measured, for a ViT-S/16 checkpoint of DINO's size and layout (a plain timm-key
state dict of 21.7M float32 values, ~87 MB, random values, written with ``torch.save``)
served from ``http.server`` on 127.0.0.1 in a thread of this process, so the network is a
loopback and the times are msjax's own work:

* ``msjax fetch, first use``  ``pretrained.fetch("vit_s16_dino", cache=<empty dir>)``
  with the name's address pointed at the local server and the file's real SHA-256 prefix
  as its ``hash_prefix`` (patched into ``PUBLISHED`` inside the measuring process):
  download + SHA-256, read (``torch_files``, no torch), convert, write the ``.npz``.
  Split in two from ``fetch``'s own log lines: download and hash / read, convert, write.
* ``msjax load``  ``create_backbone("vit_s16", pretrained=<the .npz>)``.
* ``msjax fetch, cached``  ``fetch`` again on the same cache: no request expected (the
  server counts the requests each measurement makes).
* ``torch.hub + timm, first use``  ``torch.hub.load_state_dict_from_url(url, model_dir=
  <empty dir>, check_hash=True)`` (download, SHA-256 prefix check against the file name
  ``dino_vits16-<8 hex>.pth``, ``torch.load``), ``timm.create_model(
  "vit_small_patch16_224", num_classes=0)`` and ``load_state_dict``: what a PyTorch user
  does for the same weights.
* ``torch.hub + timm, cached``  the same with the file already in ``model_dir``.

First use is ``fetch`` + ``load`` against the first torch row; a cached use (every later
run) is ``fetch, cached`` + ``load`` against the second. Every measurement runs in its
own subprocess (``timing.run_measurement``), ``--reps`` times (fresh empty caches for the
first-use rows); the table gives medians. Peak RSS is the child's ``ru_maxrss`` (imports
included); ``RSS before`` is its resident memory just before the measured call, so the
difference is what the call itself added at its peak.

Usage::

    python benchmarks/fetch_speed.py                  # writes benchmarks/results/fetch_speed.*
    python benchmarks/fetch_speed.py --reps 1 --no-write             # a smoke run
    python benchmarks/fetch_speed.py --worker make DIR               # only the file
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.server
import importlib.metadata
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

import machine  # benchmarks/machine.py, beside this script
import timing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # timm_ref: timm with the CPU torch

NAME, ARCH, TIMM_ARCH = "vit_s16_dino", "vit_s16", "vit_small_patch16_224"
SEED = 0


def current_rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- workers (each in its own subprocess) ---------------------------------------------------


def worker_make(directory: str) -> dict:
  """Writes a random ViT-S/16 state dict in DINO's layout (timm's keys, torch's shapes)
  to ``directory/dino_vits16-<first 8 hex of its SHA-256>.pth``."""
  import torch
  from flax import nnx

  from msjax import models
  from msjax.models import weights

  # msjax's variables name their torch keys; torch's layouts are the inverse of
  # weights' transposes (HWIO -> OIHW, [in, out] -> [out, in]).
  model = nnx.eval_shape(lambda: models.backbone_class(ARCH)(rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(SEED)
  state = {}
  for path, var in weights.flat_variables(model).items():
    shape = tuple(var.shape)
    if path.endswith("/kernel"):
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    state[weights.torch_key(path)] = torch.from_numpy(value)
  buf = io.BytesIO()
  torch.save(state, buf)
  data = buf.getvalue()
  sha = hashlib.sha256(data).hexdigest()
  path = os.path.join(directory, f"dino_vits16-{sha[:8]}.pth")
  with open(path, "wb") as f:
    f.write(data)
  return dict(file=path, sha256=sha, bytes=len(data), keys=len(state),
              values=int(sum(v.numel() for v in state.values())))


def worker_msjax_fetch(url: str, prefix: str, cache: str) -> dict:
  """``pretrained.fetch`` into ``cache``, timed; its log lines split the time."""
  t0 = time.perf_counter()
  import flax.nnx  # noqa: F401  (what fetch would import on the way, kept out of its time)

  from msjax.models import convert, pretrained, torch_files, weights  # noqa: F401
  imports_s = time.perf_counter() - t0
  pretrained.PUBLISHED[NAME] = dataclasses.replace(pretrained.PUBLISHED[NAME], url=url,
                                                   hash_prefix=prefix)
  events = []
  log = lambda msg: events.append((time.perf_counter(), msg))
  rss_before = current_rss_mib()
  t0 = time.perf_counter()
  path = pretrained.fetch(NAME, cache=cache, log=log)
  seconds = time.perf_counter() - t0
  out = dict(seconds=seconds, imports_s=imports_s, rss_before_mib=rss_before,
             npz=str(path), npz_bytes=os.path.getsize(path), log=[m for _, m in events])
  if len(events) == 3:  # downloading ... / MB in s, SHA-256 ... / converted ..., cached at
    out["download_s"] = events[1][0] - t0
    out["read_convert_write_s"] = events[2][0] - events[1][0]
  return out


def worker_msjax_load(npz: str) -> dict:
  import jax
  from flax import nnx

  from msjax import models
  rss_before = current_rss_mib()
  t0 = time.perf_counter()
  model = models.create_backbone(ARCH, rngs=nnx.Rngs(0), pretrained=npz)
  jax.block_until_ready(nnx.state(model))
  return dict(seconds=time.perf_counter() - t0, rss_before_mib=rss_before)


def worker_torch(url: str, cache: str) -> dict:
  from timm_ref import import_timm
  timm = import_timm(skip_if_missing=False)
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  rss_before = current_rss_mib()
  t0 = time.perf_counter()
  state = torch.hub.load_state_dict_from_url(url, model_dir=cache, check_hash=True,
                                             map_location="cpu", progress=False)
  t1 = time.perf_counter()
  model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0)
  t2 = time.perf_counter()
  model.load_state_dict(state)  # strict: the file must hold exactly timm's keys
  t3 = time.perf_counter()
  return dict(seconds=t3 - t0, hub_s=t1 - t0, create_s=t2 - t1, load_state_dict_s=t3 - t2,
              rss_before_mib=rss_before, torch=torch.__version__, timm=timm.__version__)


# --- the loopback server --------------------------------------------------------------------


class Server:
  """``http.server`` on 127.0.0.1 (a free port) serving ``directory`` from a thread, and
  counting the requests it answers."""

  def __init__(self, directory: str):
    server = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=directory, **kwargs)

      def send_head(self):
        with server.lock:
          server.requests += 1
        return super().send_head()

      def log_message(self, *args):  # quiet
        pass

    self.lock = threading.Lock()
    self.requests = 0
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, filename: str) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{filename}"

  def count(self) -> int:
    with self.lock:
      return self.requests

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


# --- the driver -----------------------------------------------------------------------------


def child_env() -> dict:
  env = dict(os.environ)
  for key in ("no_proxy", "NO_PROXY"):  # a configured proxy must not take the loopback
    env[key] = ",".join(x for x in (env.get(key, ""), "127.0.0.1") if x)
  return env


def measure(args, server, label, worker_args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", *worker_args]
  before = server.count() if server else 0
  res = timing.run_measurement(cmd, env=child_env(), cwd=REPO, timeout_s=args.timeout,
                               quiet_wait_s=args.quiet_wait, bg_limit=args.bg_limit)
  res["requests"] = (server.count() - before) if server else None
  res["row"] = label
  if res.get("status") is None:
    res["status"] = "ok"
  return res


ROWS = ("msjax fetch, first use", "msjax load", "msjax fetch, cached",
        "torch.hub + timm, first use", "torch.hub + timm, cached")


def median_of(runs, key):
  vals = [r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None]
  return float(np.median(vals)) if vals else None


def summarize(runs) -> dict:
  out = {}
  for row in ROWS:
    rs = [r for r in runs if r["row"] == row]
    s = dict(reps=len(rs), ok=sum(r.get("status") == "ok" for r in rs),
             requests=sorted({r["requests"] for r in rs}))
    for key in ("seconds", "peak_rss_mib", "rss_before_mib", "download_s",
                "read_convert_write_s", "hub_s", "create_s", "load_state_dict_s",
                "imports_s"):
      s[key] = median_of(rs, key)
    s["notes"] = sorted({r.get("note", "") for r in rs if r.get("status") != "ok"})
    out[row] = s
  return out


def ms(seconds):
  if seconds is None:
    return "-"
  return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(meta, made, summary, reps) -> str:
  gib = lambda mib: "-" if mib is None else f"{mib:,.0f} MiB"
  lines = [f"Machine: {meta['cpu']}, {meta['cpu_count']} cores; jax {meta['jax']}, torch "
           f"{meta['torch']}, timm {meta['timm']}; msjax {meta['git_head'][:12]} "
           f"({meta['msjax_tree']}).",
           "",
           f"Checkpoint: {made['keys']} tensors, {made['values']:,} float32 values, "
           f"{made['bytes'] / 1e6:.1f} MB (`torch.save`, zip format), served from "
           f"127.0.0.1; the msjax `.npz` is {meta.get('npz_mb', 0):.1f} MB. Median of "
           f"{reps} run(s), each in a fresh process.",
           "",
           "| step | time | peak RSS | RSS before | requests | parts |",
           "|---|---|---|---|---|---|"]
  for row in ROWS:
    s = summary[row]
    if not s["ok"]:
      lines.append(f"| {row} | failed | | | | {'; '.join(s['notes'])} |")
      continue
    parts = []
    if s.get("download_s") is not None:
      parts.append(f"download + SHA-256 {ms(s['download_s'])}, read + convert + write "
                   f"{ms(s['read_convert_write_s'])}")
    if s.get("hub_s") is not None:
      parts.append(f"hub (download, hash, torch.load) {ms(s['hub_s'])}, create "
                   f"{ms(s['create_s'])}, load_state_dict {ms(s['load_state_dict_s'])}")
    lines.append(f"| {row} | {ms(s['seconds'])} | {gib(s['peak_rss_mib'])} | "
                 f"{gib(s['rss_before_mib'])} | {', '.join(map(str, s['requests']))} | "
                 f"{'; '.join(parts)} |")
  def total(*rows):
    vals = [summary[r]["seconds"] for r in rows]
    return None if None in vals else sum(vals)
  first = total("msjax fetch, first use", "msjax load")
  cached = total("msjax fetch, cached", "msjax load")
  t_first = summary["torch.hub + timm, first use"]["seconds"]
  t_cached = summary["torch.hub + timm, cached"]["seconds"]
  lines += ["", "| use | msjax (fetch + load) | torch.hub + timm | torch / msjax |",
            "|---|---|---|---|"]
  for use, a, b in (("first (download)", first, t_first), ("cached", cached, t_cached)):
    ratio = f"{b / a:.2f}x" if a and b else "-"
    lines.append(f"| {use} | {ms(a)} | {ms(b)} | {ratio} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=3, help="runs of each measurement")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
  p.add_argument("--quiet-wait", type=float, default=30.0,
                 help="seconds to wait for idle CPUs before each subprocess")
  p.add_argument("--bg-limit", type=float, default=0.3,
                 help="cores other processes may use for the CPUs to count as idle")
  p.add_argument("--out", default=None,
                 help="write PATH.json and PATH.md (default benchmarks/results/fetch_speed)")
  p.add_argument("--no-write", action="store_true", help="print only")
  p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    kind, rest = args.worker[0], args.worker[1:]
    fn = {"make": worker_make, "msjax_fetch": worker_msjax_fetch,
          "msjax_load": worker_msjax_load, "torch": worker_torch}[kind]
    out = fn(*rest)
    out["peak_rss_in_process_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(out))
    return

  versions = {n: importlib.metadata.version(n) for n in ("jax", "flax", "torch", "timm")}
  meta = dict(machine.environment(**versions),
              command=" ".join(["python benchmarks/fetch_speed.py", *(argv or sys.argv[1:])]))
  tmp = tempfile.mkdtemp(prefix="msjax-fetch-speed-")
  server = None
  try:
    serve = os.path.join(tmp, "serve")
    os.makedirs(serve)
    made = measure(args, None, "make", ["make", serve])
    if made["status"] != "ok":
      raise SystemExit(f"could not write the checkpoint: {made.get('note')}")
    print(f"# {made['file']}: {made['bytes'] / 1e6:.1f} MB, SHA-256 {made['sha256']}",
          flush=True)
    server = Server(serve)
    url, prefix = server.url(os.path.basename(made["file"])), made["sha256"][:8]
    runs = []
    for rep in range(args.reps):
      cache = os.path.join(tmp, f"msjax-cache-{rep}")
      hub = os.path.join(tmp, f"hub-{rep}")
      plan = [("msjax fetch, first use", ["msjax_fetch", url, prefix, cache]),
              ("msjax load", ["msjax_load", os.path.join(cache, f"{NAME}.npz")]),
              ("msjax fetch, cached", ["msjax_fetch", url, prefix, cache]),
              ("torch.hub + timm, first use", ["torch", url, hub]),
              ("torch.hub + timm, cached", ["torch", url, hub])]
      for label, wargs in plan:
        res = measure(args, server, label, wargs)
        res["rep"] = rep
        runs.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "log"}), flush=True)
      if runs[-5].get("npz_bytes"):
        meta["npz_mb"] = runs[-5]["npz_bytes"] / 1e6
      shutil.rmtree(hub, ignore_errors=True)  # 87 MB each; the .npz caches are as large
      shutil.rmtree(cache, ignore_errors=True)
  finally:
    if server is not None:
      server.close()
    shutil.rmtree(tmp, ignore_errors=True)
  summary = summarize(runs)
  made = {k: v for k, v in made.items() if k in ("sha256", "bytes", "keys", "values")}
  md = markdown(meta, made, summary, args.reps)
  print("\n" + md)
  if args.no_write:
    return
  title = ("# Pretrained ViT-S/16 weights by name: fetch, convert and load "
           "(loopback server)\n\nGenerated by `benchmarks/fetch_speed.py`.\n\n")
  payload = dict(meta=meta, checkpoint=made, summary=summary, runs=runs)
  paths = machine.write_results("fetch_speed", payload, title + md, out=args.out)
  if args.out:
    print("wrote {} and {}".format(*paths))


if __name__ == "__main__":
  main()
